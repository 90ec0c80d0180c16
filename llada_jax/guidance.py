"""Classifier-free guidance for masked-diffusion LMs, shared by the sampler and the likelihood.

The unconditional branch sees the same canvas with the prompt masked: every position of
`prompt_BxT` (the sampler's: the prompt region's non-mask positions, left pads included; the
likelihood's: the valid non-target positions) becomes the mask token. With weight w the guided
logits are ``uncond + (w + 1) * (cond - uncond)``; w = 0 is no guidance. Both branches run as one
model call on 2B rows, the conditional ones first.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def model_rows(
    x_BxT: jax.Array, valid_BxT: jax.Array, prompt_BxT: jax.Array, mask_id: int, cfg_scale: float
) -> tuple[jax.Array, jax.Array]:
    """The model's input (tokens, valid) for the canvas `x_BxT`: (x_BxT, valid_BxT) when w = 0,
    else the 2B rows ((x; x with the prompt masked), (valid; valid)).

    x_BxT: (B, T) int32 canvas (or a window of it, W positions). valid_BxT: (B, L) bool
    key-padding mask (L need not be T: a window pass takes the whole canvas's). prompt_BxT:
    (B, T) bool, the positions the unconditional branch masks. mask_id: the mask token id.
    cfg_scale: guidance weight w >= 0 (static).
    """
    if cfg_scale == 0:
        return x_BxT, valid_BxT
    uncond_BxT = jnp.where(prompt_BxT, mask_id, x_BxT)
    return jnp.concatenate([x_BxT, uncond_BxT]), jnp.concatenate([valid_BxT, valid_BxT])


def guide(logits_2BxTxV: jax.Array, cfg_scale: float) -> jax.Array:
    """Guided logits (B, T, V) from the model's logits on `model_rows`' 2B rows (conditional
    first): ``uncond + (w + 1) * (cond - uncond)``."""
    cond_BxTxV, uncond_BxTxV = jnp.split(logits_2BxTxV, 2)
    return uncond_BxTxV + (cfg_scale + 1) * (cond_BxTxV - uncond_BxTxV)

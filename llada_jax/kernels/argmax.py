"""The sampler's argmax over the vocabulary, computed as max reductions.

`jnp.argmax` lowers to a reduction over (value, index) pairs, which XLA:CPU runs one element at a
time; plain max reductions are vectorized. `argmax` finds the same index in two short stages:
the vocabulary is cut into chunks of `CHUNK`, the first chunk holding the maximum is found from
the chunks' maxima, and the first position of the maximum inside that chunk is read off. It
is a formulation, not a platform kernel: every backend runs it.

Letters in names: V vocabulary, C chunks, W positions per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 128


def _first_maximum(x: jax.Array, maximum: jax.Array) -> jax.Array:
    """Index (int32) of the first entry of x (..., N) equal to `maximum` (...), or NaN as
    `jnp.argmax` counts NaN the maximum."""
    hit = (x == maximum[..., None]) | jnp.isnan(x)
    size = x.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


def argmax(x_xV: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1): x (..., V) -> (...) int32, the first index of the maximum, also
    when it ties (0 when every entry is -inf, the first NaN where there are NaNs)."""
    vocab = x_xV.shape[-1]
    pad = -vocab % CHUNK
    if pad:  # -inf columns at the end are never the first maximum
        x_xV = jnp.pad(x_xV, [(0, 0)] * (x_xV.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    x_xCxW = x_xV.reshape(*x_xV.shape[:-1], -1, CHUNK)
    chunk_max_xC = jnp.max(x_xCxW, axis=-1)  # NaN where the chunk holds one
    max_x = jnp.max(chunk_max_xC, axis=-1)
    chunk_x = _first_maximum(chunk_max_xC, max_x)
    x_xW = jnp.take_along_axis(x_xCxW, chunk_x[..., None, None], axis=-2)[..., 0, :]
    return chunk_x * CHUNK + _first_maximum(x_xW, max_x)

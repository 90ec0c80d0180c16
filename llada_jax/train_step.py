"""The pure, jitted training step: noise the batch, forward, masked-diffusion loss, AdamW update.

`train_step(params, opt_state, batch, step) -> (params, opt_state, metrics)`; the PRNG key is
the run's seed with the step folded in, so masks depend only on (seed, step), not on sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llada_jax import diffusion, optim, sharding
from llada_jax.kernels.attention import Blocks

PyTree = Any
OBJECTIVES = ("pretrain", "sft")
SFT_COUNTS = ("sft_dropped", "sft_truncated")  # pairs per step, from the SFT pipeline
StepFn = Callable[[PyTree, PyTree, dict[str, jax.Array], jax.Array], tuple[PyTree, PyTree, dict]]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step needs besides arrays (static under jit)."""

    diffusion: diffusion.DiffusionConfig
    grad_accum: int
    seed: int
    objective: str = "pretrain"  # "pretrain" | "sft"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"train.objective={self.objective!r} is invalid; valid choices: {OBJECTIVES}"
            )


def model_logits(model: Any, noised: dict[str, jax.Array], block_size: int = 0) -> jax.Array:
    """The model's logits (B, L, V) on a noised batch (`noise`'s output).

    A block-diffusion model (block_size > 0) runs on the noised rows and their clean copies side
    by side, (B, 2L), under `attention.Blocks(block_size, clean_copy=True)`: each noised block
    sees itself and the clean blocks before it. The clean copy keeps a prompt that CFG dropout
    masked masked, so the dropped prompt is not seen through it. The output head runs on the
    noised half only.
    """
    inputs, valid, segments = noised["inputs"], noised["valid"], noised.get("segment_ids")
    # Training batches pad at the end only (filler rows, random lengths, SFT rows).
    if not block_size:
        return model(inputs, valid, segments, valid_prefix=True)
    clean = jnp.where(noised["is_masked"], noised["targets"], inputs)
    twice = lambda a, b: None if a is None else jnp.concatenate([a, b], axis=1)
    hidden_Bx2LxD, _ = model.hidden(
        twice(inputs, clean),
        twice(valid, valid),
        twice(segments, segments),
        blocks=Blocks(block_size, clean_copy=True),
    )
    return model.head(hidden_Bx2LxD[:, : inputs.shape[1]])


def loss_fn(
    graphdef: nnx.GraphDef,
    params: PyTree,
    noised: dict[str, jax.Array],
    loss_weight: str = "elbo",
    block_size: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss () float32 and aux of the model on an already-noised (micro)batch (`noise`'s
    output, (B, L) arrays): SFT when it has a response mask. loss_weight="none" trains on the
    mean masked cross-entropy instead (not a bound). block_size: `model_logits`'."""
    logits = model_logits(nnx.merge(graphdef, params), noised, block_size)
    if "response_mask" in noised:
        loss, aux = diffusion.sft_loss(logits, noised, noised["response_mask"])
    else:
        loss, aux = diffusion.pretrain_loss(logits, noised)
    return (aux["masked_ce"] if loss_weight == "none" else loss), aux


def noise(key: jax.Array, batch: dict[str, jax.Array], cfg: StepConfig) -> dict[str, jax.Array]:
    """The global batch noised for one step (stratified t spans the whole global batch).

    batch: tokens (B, L); optional segment_ids (B, L) (packed documents or SFT pairs) and valid
    (B, L) (filler rows); for SFT prompt_mask (B, L), True on prompt tokens, never masked.
    Paired and complementary masking train on the first B/2 rows, each twice.
    """
    if cfg.diffusion.masking != "independent":
        keys = ("tokens", "valid", "segment_ids", "prompt_mask")
        batch = {**batch, **diffusion.pair_rows({k: batch[k] for k in keys if k in batch})}
    prompt_mask = batch["prompt_mask"] if cfg.objective == "sft" else None
    noised = diffusion.noise_batch(
        key, batch["tokens"], cfg.diffusion, prompt_mask=prompt_mask, valid=batch.get("valid")
    )
    if "segment_ids" in batch:
        noised["segment_ids"] = batch["segment_ids"]
    if prompt_mask is not None:
        noised["response_mask"] = noised["valid"] & ~prompt_mask
    return noised


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    cfg: StepConfig,
) -> StepFn:
    """The un-jitted step function (params, opt_state, batch, step () int) -> (params,
    opt_state, metrics of () scalars): noise the batch with the key of (seed, step), average the
    gradients over cfg.grad_accum microbatches, update, and skip the update on a NaN/Inf loss
    or gradient norm. `step_jit_options` gives its shardings and donation."""
    loss_weight, block_size = cfg.diffusion.loss_weight, cfg.diffusion.block_size
    grad_fn = jax.value_and_grad(
        lambda p, b: loss_fn(graphdef, p, b, loss_weight, block_size), has_aux=True
    )

    def train_step(
        params: PyTree, opt_state: PyTree, batch: dict[str, jax.Array], step: jax.Array
    ) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
        """One step as `make_train_step` says: (params, opt_state, batch, step) -> (params,
        opt_state, metrics), the old state kept on a non-finite loss or gradient norm."""
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        noised = noise(key, batch, cfg)
        loss, aux, grads = optim.accumulate_gradients(grad_fn, params, noised, cfg.grad_accum)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A NaN/Inf loss or gradient skips the update, so it never reaches the state (or a
        # checkpoint); the host loop counts skips and stops after too many in a row.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = dict(
            loss=loss,
            grad_norm=grad_norm,
            lr=lr_schedule(step),
            num_valid=jnp.sum(noised["valid"]),
            skipped=(~finite).astype(jnp.int32),
            **aux,
            **{k: jnp.sum(batch[k]) for k in SFT_COUNTS if k in batch},
        )
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    return train_step


def step_jit_options(params: PyTree, opt_state: PyTree, mesh: Mesh) -> dict[str, Any]:
    """`jax.jit`'s keyword arguments for the train step: params and optimizer state donated and
    kept on their own shardings, the batch split over the data-parallel axes, the key and the
    metrics replicated."""
    state_shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    batch = sharding.batch_sharding(mesh)  # a prefix: every batch array is split the same way
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    return dict(
        in_shardings=(*state_shardings, batch, replicated),
        out_shardings=(*state_shardings, replicated),
        donate_argnums=(0, 1),
    )

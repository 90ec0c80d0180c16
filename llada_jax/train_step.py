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

PyTree = Any
StepFn = Callable[[PyTree, PyTree, dict[str, jax.Array], jax.Array], tuple[PyTree, PyTree, dict]]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step needs besides arrays (static under jit)."""

    diffusion: diffusion.DiffusionConfig
    grad_accum: int
    seed: int


def loss_fn(graphdef: nnx.GraphDef, params: PyTree, noised: dict[str, jax.Array]
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pretraining loss of the model on an already-noised (micro)batch."""
    model = nnx.merge(graphdef, params)
    logits = model(noised["inputs"], noised["valid"])
    return diffusion.pretrain_loss(logits, noised)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, cfg: StepConfig) -> StepFn:
    """The un-jitted step function; `jit_train_step` compiles it with shardings and donation."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, b), has_aux=True)

    def train_step(params: PyTree, opt_state: PyTree, batch: dict[str, jax.Array],
                   step: jax.Array) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        # Noise the whole global batch at once: stratified t spans the global batch.
        noised = diffusion.noise_batch(key, batch["tokens"], cfg.diffusion)
        loss, aux, grads = optim.accumulate_gradients(grad_fn, params, noised, cfg.grad_accum)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), lr=lr_schedule(step),
                       num_valid=jnp.sum(noised["valid"]), **aux)
        return params, opt_state, metrics

    return train_step


def jit_train_step(step_fn: StepFn, params: PyTree, opt_state: PyTree, mesh: Mesh) -> StepFn:
    """jit with params / optimizer state donated and kept on their own shardings."""
    state_shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    batch = {"tokens": sharding.batch_sharding(mesh)}
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step_fn, in_shardings=(*state_shardings, batch, replicated),
                   out_shardings=(*state_shardings, replicated), donate_argnums=(0, 1))

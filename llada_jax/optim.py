"""Optimizer, learning-rate schedules and gradient accumulation.

The optimizer is global-norm clipping followed by AdamW, with a learning-rate
schedule and a weight-decay mask. Everything is read from the ``optim``
section of the config (``OptimConfig``: its keys and defaults; checked when the optimizer is
made).

Schedules (``step`` is optax's update count, 0 for the first update):

* ``constant``: linear warmup 0 -> lr over ``warmup_steps``, then lr.
* ``cosine``: linear warmup 0 -> lr, then cosine decay lr -> final_lr reached
  at ``total_steps``.
* ``wsd`` (warmup-stable-decay): warmup 0 -> lr; hold; at each
  ``(step_i, lr_i)`` in ``lr_drops`` the held value becomes ``lr_i`` (for
  steps >= step_i); over the last ``decay_steps`` steps before ``total_steps``
  linear decay from the held value to ``final_lr``. With ``decay_steps == 0``
  there is no decay phase. LLaDA 8B (seq 4096, global batch 1280, i.e.
  5,242,880 tokens per step, 2.3T tokens) is ``lr=4e-4, warmup_steps=2000,
  lr_drops=((round(1.2e12 / 5242880), 1e-4),), decay_steps=round(0.3e12 /
  5242880), final_lr=1e-5`` with ``total_steps=round(2.3e12 / 5242880)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import optax

from llada_jax.sections import setting

PyTree = Any
GradFn = Callable[[PyTree, PyTree], tuple[tuple[jax.Array, PyTree], PyTree]]

SCHEDULES = ("wsd", "cosine", "constant")
WEIGHT_DECAY_ON = ("matrices", "all")
NO_DECAY_NAMES = ("scale", "bias")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `optim` config section (LLaDA's settings by default). `make_optimizer` and
    `make_lr_schedule` read it (or its ConfigDict) and check it."""

    SECTION: ClassVar[str] = "optim"

    lr: float = setting(4e-4, "peak learning rate")
    schedule: str = setting("wsd", "learning-rate schedule (module docstring)", SCHEDULES)
    warmup_steps: int = setting(100, "linear warmup from 0, in steps (LLaDA-8B: 2000)")
    final_lr: float = setting(1e-5, "learning rate at the last step")
    decay_steps: int = setting(0, "wsd: linear decay to final_lr over the last decay_steps steps")
    lr_drops: tuple = setting((), "wsd: ((step, lr), ...) held from each step on")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay")
    weight_decay_on: str = setting(
        "matrices", "what decays (matrices: not norms or biases)", WEIGHT_DECAY_ON
    )
    b1: float = setting(0.9, "Adam beta1")
    b2: float = setting(0.95, "Adam beta2")
    eps: float = setting(1e-8, "Adam epsilon")
    clip_norm: float = setting(1.0, "global gradient-norm clip; 0 disables it")
    grad_accum: int = setting(1, "micro-batches per step (the batch is split, the step the same)")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Returns ``value`` as an int, or raises if not an integer >= minimum. ``name``: the key
    in the optim section, or a dotted key of another section."""
    try:
        ok = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        ok = False
    if not ok or value < minimum:
        key = name if "." in name else f"optim.{name}"
        raise ValueError(f"{key}={value!r} is invalid; valid: an integer >= {minimum}")
    return int(value)


def _check_nonneg(name: str, value: Any) -> float:
    """Returns ``value`` as a float, or raises if negative or not finite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"optim.{name}={value!r} is invalid; valid: a finite number >= 0")
    return number


def _check_drops(drops: Sequence[Any], start: int, end: int) -> tuple[tuple[int, float], ...]:
    """Validates wsd ``lr_drops``: increasing steps inside [start, end)."""
    out: list[tuple[int, float]] = []
    for drop in drops:
        if len(drop) != 2:
            raise ValueError(f"optim.lr_drops entry {drop!r} is invalid; valid: a (step, lr) pair")
        step = _check_int("lr_drops step", drop[0], 0)
        lr = _check_nonneg("lr_drops lr", drop[1])
        if not start <= step < end:
            raise ValueError(
                f"optim.lr_drops step {step} is invalid; valid: a step of the stable phase, "
                f"optim.warmup_steps ({start}) <= step < train.steps - optim.decay_steps ({end})"
            )
        if out and step <= out[-1][0]:
            raise ValueError(
                f"optim.lr_drops={tuple(drops)!r} is invalid; valid: strictly "
                f"increasing steps (step {step} follows {out[-1][0]})"
            )
        out.append((step, lr))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def _warmup(step: jax.Array, lr: float, warmup_steps: int) -> jax.Array:
    """Linear 0 -> lr over ``warmup_steps`` (lr at and after the end)."""
    if warmup_steps == 0:
        return jnp.full_like(step, lr)
    return lr * jnp.minimum(step / warmup_steps, 1.0)


def _constant(lr: float, warmup_steps: int) -> optax.Schedule:
    """Warmup, then constant ``lr``."""

    def schedule(count: jax.Array) -> jax.Array:
        """The learning rate at step `count`, () float32: warmup, then lr."""
        return _warmup(jnp.asarray(count, jnp.float32), lr, warmup_steps)

    return schedule


def _cosine(lr: float, final_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Warmup, then cosine decay lr -> final_lr at ``total_steps``."""
    length = max(total_steps - warmup_steps, 1)

    def schedule(count: jax.Array) -> jax.Array:
        """The learning rate at step `count`, () float32: warmup, then cosine decay to final_lr."""
        step = jnp.asarray(count, jnp.float32)
        frac = jnp.clip((step - warmup_steps) / length, 0.0, 1.0)
        cos = final_lr + (lr - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < warmup_steps, _warmup(step, lr, warmup_steps), cos)

    return schedule


def _wsd(
    lr: float,
    final_lr: float,
    warmup_steps: int,
    decay_steps: int,
    drops: tuple[tuple[int, float], ...],
    total_steps: int,
) -> optax.Schedule:
    """Warmup, stable with step drops, final linear decay to ``final_lr``."""
    decay_start = total_steps - decay_steps
    held_at_decay = drops[-1][1] if drops else lr

    def schedule(count: jax.Array) -> jax.Array:
        """The learning rate at step `count`, () float32: warmup, lr with its drops, then linear
        decay to final_lr over the last decay_steps."""
        step = jnp.asarray(count, jnp.float32)
        held = jnp.full_like(step, lr)
        for drop_step, drop_lr in drops:
            held = jnp.where(step >= drop_step, drop_lr, held)
        value = jnp.where(step < warmup_steps, _warmup(step, lr, warmup_steps), held)
        if decay_steps == 0:
            return value
        frac = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
        decay = held_at_decay + (final_lr - held_at_decay) * frac
        return jnp.where(step >= decay_start, decay, value)

    return schedule


def make_lr_schedule(c: Any, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule described in the module docstring: a function of the update
    count returning the float32 learning rate. c: the ``optim`` ConfigDict (fields: lr,
    schedule, warmup_steps, final_lr, decay_steps, lr_drops); total_steps: optimizer steps of
    the whole run. Raises ValueError on an unknown schedule or inconsistent step counts."""
    name = c["schedule"]
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule={name!r} is invalid; valid choices: {SCHEDULES}")
    total_steps = _check_int("train.steps", total_steps, 1)
    warmup = _check_int("warmup_steps", c["warmup_steps"], 0)
    lr = _check_nonneg("lr", c["lr"])
    final_lr = _check_nonneg("final_lr", c["final_lr"])
    drops = tuple(c["lr_drops"] or ())
    if name != "wsd" and drops:
        raise ValueError(
            f"optim.lr_drops={drops!r} is invalid with optim.schedule={name!r}; valid: () "
            f"(drops belong to the 'wsd' schedule)"
        )
    if warmup > total_steps:
        raise ValueError(
            f"optim.warmup_steps={warmup} is invalid; valid: <= train.steps ({total_steps})"
        )
    if name == "constant":
        return _constant(lr, warmup)
    if name == "cosine":
        return _cosine(lr, final_lr, warmup, total_steps)
    decay = _check_int("decay_steps", c["decay_steps"], 0)
    if warmup + decay > total_steps:
        raise ValueError(
            f"optim.warmup_steps + optim.decay_steps = {warmup} + {decay} = "
            f"{warmup + decay} is invalid; valid: <= train.steps ({total_steps})"
        )
    drops = _check_drops(drops, warmup, total_steps - decay)
    return _wsd(lr, final_lr, warmup, decay, drops, total_steps)


# --------------------------------------------------------------------------------------------
# Weight-decay mask
# --------------------------------------------------------------------------------------------


def _param_name(path: tuple[Any, ...]) -> str:
    """Name of a parameter from its key path.

    nnx.State paths end in ``GetAttrKey('value')`` (the Variable's payload);
    that entry is skipped so the name is e.g. ``kernel`` or ``scale``.
    """
    for key in reversed(path):
        if isinstance(key, jax.tree_util.GetAttrKey):
            if key.name == "value":
                continue
            return key.name
        if isinstance(key, jax.tree_util.DictKey):
            return str(key.key)
        if isinstance(key, jax.tree_util.SequenceKey):
            return str(key.idx)
    return ""


def decay_mask(params: PyTree, weight_decay_on: str = "matrices") -> PyTree:
    """Which parameters get weight decay: a pytree of Python bools with the structure of
    ``params`` (a pytree of arrays, e.g. ``nnx.split(model, nnx.Param)[1]``).

    Decides by name, not ndim, because scanned layers give norm scales a leading layer axis.
    weight_decay_on ``"matrices"``: every parameter except those named ``scale`` (RMSNorm
    scales); linear ``kernel`` and ``embedding`` are decayed. ``"all"``: every parameter.
    """
    _check_weight_decay_on(weight_decay_on)
    if weight_decay_on == "all":
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _param_name(path) not in NO_DECAY_NAMES, params
    )


def _check_weight_decay_on(on: str) -> None:
    if on not in WEIGHT_DECAY_ON:
        raise ValueError(
            f"optim.weight_decay_on={on!r} is invalid; valid choices: {WEIGHT_DECAY_ON}"
        )


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def make_optimizer(c: Any, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the configured schedule and mask, as one optax
    transformation. c: the ``optim`` ConfigDict (see the module docstring); total_steps:
    optimizer steps of the whole run. The learning rate at a step is
    ``make_lr_schedule(c, total_steps)(step)`` (for logging). Raises ValueError on any invalid
    key of the section, ``grad_accum`` (read by the training step) included."""
    _check_int("grad_accum", c["grad_accum"], 1)
    schedule = make_lr_schedule(c, total_steps)
    on = c["weight_decay_on"]
    _check_weight_decay_on(on)
    for name in ("b1", "b2"):
        value = float(c[name])
        if not 0.0 <= value < 1.0:
            raise ValueError(f"optim.{name}={value!r} is invalid; valid: 0 <= {name} < 1")
    clip = c["clip_norm"]
    adamw = optax.adamw(
        schedule,
        b1=float(c["b1"]),
        b2=float(c["b2"]),
        eps=_check_nonneg("eps", c["eps"]),
        weight_decay=_check_nonneg("weight_decay", c["weight_decay"]),
        mask=functools.partial(decay_mask, weight_decay_on=on),
    )
    # Clipping stays in the chain when off (an infinite norm), so that the optimizer state has
    # the same structure for every clip_norm and a run can resume with another one.
    max_norm = _check_nonneg("clip_norm", clip) if clip else float("inf")
    return optax.chain(optax.clip_by_global_norm(max_norm), adamw)


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------


def _split_microbatches(batch: PyTree, num_microbatches: int) -> PyTree:
    """Reshapes every leaf (B, ...) to (num_microbatches, B // n, ...).

    Microbatch j takes rows j, j + n, j + 2n, ... (strided), so a batch
    sharded along axis 0 keeps every microbatch spread over all devices.
    """
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"batch leading dims {sorted(sizes, key=str)} are invalid: expected every "
            "leaf to have the same leading batch dimension."
        )
    (size,) = sizes
    if size % num_microbatches:
        raise ValueError(
            f"batch size {size} is not divisible by num_microbatches={num_microbatches}."
        )

    def split(x: jax.Array) -> jax.Array:
        """One leaf (B, ...) -> (n, B // n, ...), microbatch j its rows j, j + n, j + 2n, ...."""
        x = x.reshape(size // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _acc_dtype(dtype: Any) -> Any:
    """Accumulation dtype: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def accumulate_gradients(
    grad_fn: GradFn, params: PyTree, batch: PyTree, num_microbatches: int
) -> tuple[jax.Array, PyTree, PyTree]:
    """``(loss, aux, grads)``, each the mean over microbatches, via ``jax.lax.scan``.

    grad_fn: ``grad_fn(params, microbatch) -> ((loss, aux), grads)``, params passed unchanged to
    every call; batch: a pytree of arrays with a common leading batch dim B, split into
    num_microbatches = n >= 1 with B % n == 0 (n == 1 calls grad_fn once). Sums are kept in (at
    least) float32; float leaves are cast back to their dtype and integer leaves are returned as
    float32 means.
    """
    n = _check_int("num_microbatches", num_microbatches, 1)
    if n == 1:
        _split_microbatches(batch, 1)
        (loss, aux), grads = grad_fn(params, batch)
        return loss, aux, grads
    micro = _split_microbatches(batch, n)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _acc_dtype(s.dtype)), shapes)

    def body(acc: PyTree, mb: PyTree) -> tuple[PyTree, None]:
        """The running sums `acc` (at least float32) plus microbatch `mb`'s ((loss, aux), grads)."""
        out = grad_fn(params, mb)
        return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, out), None

    total, _ = jax.lax.scan(body, zeros, micro)

    def mean(s: jax.ShapeDtypeStruct, x: jax.Array) -> jax.Array:
        """A sum over the n microbatches -> its mean, float leaves cast back to their dtype."""
        out_dtype = s.dtype if jnp.issubdtype(s.dtype, jnp.inexact) else x.dtype
        return (x / n).astype(out_dtype)

    (loss, aux), grads = jax.tree.map(mean, shapes, total)
    return loss, aux, grads

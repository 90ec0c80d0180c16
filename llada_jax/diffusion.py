"""Forward (noising) process and losses of masked-diffusion language models (LLaDA).

Everything here is a pure function of arrays and PRNG keys: no model, no global state. All
functions are jit-able with static shapes; ``DiffusionConfig`` is a frozen (hashable) dataclass,
so it can be passed as a static argument.

Notation (shapes):
    B: global batch size, L: sequence length, V: vocabulary size.

Schedules are written as the keep-probability ``alpha(t)`` (``alpha(0) = 1``, ``alpha(1) = 0``);
the mask probability at time ``t`` is ``1 - alpha(t)`` and the continuous-time ELBO weight is
``w(t) = -alpha'(t) / (1 - alpha(t))``:

    linear:      alpha = 1 - t             1 - alpha = t              w = 1 / t
    cosine:      alpha = cos(pi t / 2)     1 - alpha = 2 sin^2(pi t/4) w = (pi/2) cot(pi t / 4)
    polynomial:  alpha = 1 - t^k           1 - alpha = t^k            w = k / t

(The cosine forms are the algebraically identical, numerically stable rewrites of
``1 - cos(pi t/2)`` and ``(pi/2) sin(pi t/2) / (1 - cos(pi t/2))``.)

The eps floor, LLaDA's way: a time ``t`` in [0, 1) is mapped to ``t' = eps + (t_max - eps) t``
(``t_max = 1`` by default); the mask probability is ``p = 1 - alpha(t')`` and the loss weight
``w(t')``. For the linear schedule this is exactly LLaDA: ``p = (1 - eps) t + eps`` and weight
``1 / p``. As in LLaDA, the constant Jacobian ``dt'/dt = t_max - eps`` is dropped from the
weight (a constant factor on the loss: 0.999 for the default range).

Variants of the estimator, for ablations (the held-out bound of the evaluation job is the same
for all of them):

    t_density="bell": t ~ Beta(2, 2) (density q(t) = 6 t (1 - t)) instead of U[0, 1), and the
        weight multiplied by 1 / q(t), so the loss still estimates the same ELBO.
    t_max < 1 or a large eps: mask rates clipped to [eps, t_max] (BD3-LM's [beta, omega]); the
        loss then leaves part of the ELBO out and is not a bound.
    loss_weight="none": the mean cross-entropy over masked tokens, without the ELBO weight; not
        a bound.
    masking="paired": each sequence of the first half of the batch twice, with independent
        masks (the compute of a full batch on half the distinct sequences).
    masking="complementary": the same pairs, the second copy masking exactly the maskable
        tokens the first leaves visible (mask rate 1 - p), with the weight that keeps each copy
        an unbiased estimate of the ELBO.

``bound_note(cfg)`` says whether the training loss is an estimate of the ELBO.

Block diffusion (``block_size`` b > 0, BD3-LM): each row is cut into blocks of b tokens and each
block is noised with its own t; the model predicts block k's masked tokens from its noised
block and the clean blocks before it, so the loss (each block's ELBO weight times its masked
cross-entropy, normalised as above) estimates the NELBO of an autoregressive chain of blocks.
The model sees the noised row and its clean copy side by side (train_step.model_logits and
``kernels.attention.Blocks``). b = L is the full-sequence model with the same draws; b = 1 is an
autoregressive model (each block is one token, always masked).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.sections import check_choices, setting

SCHEDULES = ("linear", "cosine", "polynomial")
T_SAMPLING = ("iid", "stratified")
T_DENSITIES = ("uniform", "bell")
LOSS_WEIGHTS = ("elbo", "none")
MASKINGS = ("independent", "paired", "complementary")
# The largest eps floor whose loss still counts as a bound (LLaDA's is 1e-3): the part of the
# ELBO it leaves out is that small a share of the time range. Above it the range counts as clipped.
BOUND_EPS = 1e-2

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Settings of the forward process and of the training objective."""

    SECTION: ClassVar[str] = "diffusion"

    mask_id: int  # the mask token's id (the tokenizer's special ids; not a config key)
    schedule: str = setting("linear", "mask-rate schedule alpha(t)", SCHEDULES)
    power: float = setting(2.0, "exponent k of the polynomial schedule alpha = 1 - t^k; > 0")
    eps: float = setting(1e-3, "floor of the diffusion time: t' = eps + (t_max - eps) t")
    t_max: float = setting(1.0, "top of the diffusion time; < 1 clips the mask rates (not a bound)")
    t_sampling: str = setting(
        "iid", "how t is drawn: iid (LLaDA), stratified (antithetic over the batch)", T_SAMPLING
    )
    t_density: str = setting(
        "uniform", "t's density: uniform, bell (Beta(2, 2), importance-weighted)", T_DENSITIES
    )
    loss_weight: str = setting(
        "elbo",
        "elbo (the bound's weight) | none (mean masked cross-entropy: not a bound)",
        LOSS_WEIGHTS,
    )
    masking: str = setting("independent", "how rows are masked (module docstring)", MASKINGS)
    # Shapes stay static: the cut is the `valid` mask.
    random_length_prob: float = setting(
        0.01, "share of batches cut to a length U{1..L} (LLaDA: 1%)"
    )
    cfg_prompt_dropout: float = setting(
        0.0, "SFT: share of prompts masked whole (for classifier-free guidance)"
    )
    block_size: int = setting(
        0,
        "block diffusion: tokens per block, each with its own t, denoised given the clean "
        "earlier blocks (0: LLaDA's full-sequence model)",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not _is_real(self.power) or not (math.isfinite(self.power) and self.power > 0):
            raise ValueError(
                f"diffusion.power={self.power!r} is invalid; valid: a finite number > 0"
            )
        if not _is_real(self.t_max) or not (0.0 < self.t_max <= 1.0):
            raise ValueError(
                f"diffusion.t_max={self.t_max!r} is invalid; valid: a number with 0 < t_max <= 1"
            )
        if not _is_real(self.eps) or not (0.0 < self.eps < self.t_max):
            raise ValueError(
                f"diffusion.eps={self.eps!r} is invalid; valid: a number with 0 < eps < t_max "
                f"(t_max={self.t_max!r})"
            )
        for name in ("random_length_prob", "cfg_prompt_dropout"):
            v = getattr(self, name)
            if not _is_real(v) or not (0.0 <= v <= 1.0):
                raise ValueError(
                    f"diffusion.{name}={v!r} is invalid; valid: a probability in [0, 1]"
                )
        if not _is_int(self.block_size) or self.block_size < 0:
            raise ValueError(
                f"diffusion.block_size={self.block_size!r} is invalid; valid: an integer >= 0 "
                "(0: the full-sequence model)"
            )
        if not _is_int(self.mask_id) or self.mask_id < 0:
            raise ValueError(
                f"the tokenizer's mask id {self.mask_id!r} is invalid; "
                "valid: a non-negative integer token id"
            )
        # Normalize numpy scalars to Python numbers (stable hashing as a static jit argument).
        object.__setattr__(self, "mask_id", int(self.mask_id))
        object.__setattr__(self, "block_size", int(self.block_size))
        for name in ("power", "eps", "t_max", "random_length_prob", "cfg_prompt_dropout"):
            object.__setattr__(self, name, float(getattr(self, name)))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def bound_note(cfg: DiffusionConfig) -> Optional[str]:
    """None when the training loss estimates the ELBO (a bound on the NLL); else why it is not."""
    if cfg.loss_weight == "none":
        return "unweighted masked cross-entropy: not a bound"
    if cfg.t_max < 1.0 or cfg.eps > BOUND_EPS:
        return f"mask rates clipped to t in [{cfg.eps:g}, {cfg.t_max:g}]: not a bound"
    return None


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def alpha(t: Array, cfg: DiffusionConfig) -> Array:
    """Keep-probability alpha(t) of the schedule. t: any shape, float in [0, 1] -> same shape."""
    t = jnp.asarray(t, jnp.float32)
    if cfg.schedule == "linear":
        return 1.0 - t
    if cfg.schedule == "cosine":
        return jnp.cos(0.5 * jnp.pi * t)
    if cfg.schedule == "polynomial":
        return 1.0 - t**cfg.power
    raise ValueError(f"unknown schedule {cfg.schedule!r}; valid choices: {SCHEDULES}")


def mask_prob(t: Array, cfg: DiffusionConfig) -> Array:
    """Mask probability 1 - alpha(t), computed without cancellation. t: any shape -> same."""
    t = jnp.asarray(t, jnp.float32)
    if cfg.schedule == "linear":
        return t
    if cfg.schedule == "cosine":
        return 2.0 * jnp.sin(0.25 * jnp.pi * t) ** 2  # = 1 - cos(pi t / 2)
    if cfg.schedule == "polynomial":
        return t**cfg.power
    raise ValueError(f"unknown schedule {cfg.schedule!r}; valid choices: {SCHEDULES}")


def elbo_weight(t: Array, cfg: DiffusionConfig) -> Array:
    """ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)), analytic. t: any shape, in (0, 1] -> same.

    linear: 1/t; cosine: (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) cot(pi t/4);
    polynomial: k t^(k-1) / t^k = k/t. Infinite at t = 0 (use the eps floor).
    """
    t = jnp.asarray(t, jnp.float32)
    if cfg.schedule == "linear":
        return 1.0 / t
    if cfg.schedule == "cosine":
        x = 0.25 * jnp.pi * t
        return 0.5 * jnp.pi * jnp.cos(x) / jnp.sin(x)
    if cfg.schedule == "polynomial":
        return cfg.power / t
    raise ValueError(f"unknown schedule {cfg.schedule!r}; valid choices: {SCHEDULES}")


def time_of(p: Array, cfg: DiffusionConfig) -> Array:
    """Inverse of mask_prob: the time t with 1 - alpha(t) = p. p: any shape in [0, 1] -> same."""
    p = jnp.asarray(p, jnp.float32)
    if cfg.schedule == "linear":
        return p
    if cfg.schedule == "cosine":
        return 4.0 / jnp.pi * jnp.arcsin(jnp.sqrt(0.5 * p))  # inverts 2 sin^2(pi t / 4)
    if cfg.schedule == "polynomial":
        return p ** (1.0 / cfg.power)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; valid choices: {SCHEDULES}")


def apply_eps_floor(t: Array, eps: float, t_max: float = 1.0) -> Array:
    """t in [0, 1) -> t' = eps + (t_max - eps) t in [eps, t_max). Any shape."""
    return eps + (t_max - eps) * jnp.asarray(t, jnp.float32)


def time_range(cfg: DiffusionConfig) -> tuple[float, float]:
    """The range [eps, top) of t'. Complementary masking lowers the top so that the second
    copy's mask rate 1 - p stays at or above the first's floor p(eps)."""
    if cfg.masking != "complementary":
        return cfg.eps, cfg.t_max
    with jax.ensure_compile_time_eval():  # constants of the config, also under jit
        top = float(time_of(1.0 - mask_prob(cfg.eps, cfg), cfg))
    return cfg.eps, min(cfg.t_max, top)


def noise_level(t: Array, cfg: DiffusionConfig) -> tuple[Array, Array]:
    """Raw time t (B,) in [0, 1) -> (p, w): mask probability 1 - alpha(t') and weight w(t'), both
    (B,) float32, with t' = eps + (top - eps) t (``time_range``). The Jacobian is dropped (as in
    LLaDA). Linear schedule: p = (1 - eps) t + eps, w = 1 / p (LLaDA exactly).
    """
    tp = apply_eps_floor(t, *time_range(cfg))
    return mask_prob(tp, cfg), elbo_weight(tp, cfg)


# --------------------------------------------------------------------------------------------
# Sampling the forward process
# --------------------------------------------------------------------------------------------


def sample_t(key: Array, batch_size: int, method: str = "iid") -> Array:
    """Diffusion times for a global batch. Returns (batch_size,) float32 in [0, 1).

    "iid": independent U[0, 1) (LLaDA). "stratified": antithetic over the whole batch,
    t_i = (u + i / B) mod 1 with a single u ~ U[0, 1) (MDLM / BD3-LM variance reduction).
    """
    if method == "iid":
        return jax.random.uniform(key, (batch_size,), jnp.float32)
    if method == "stratified":
        u = jax.random.uniform(key, (), jnp.float32)
        offsets = jnp.arange(batch_size, dtype=jnp.float32) / batch_size
        t = jnp.mod(u + offsets, 1.0)
        # Guard against float rounding landing exactly on 1.0.
        return jnp.where(t >= 1.0, t - 1.0, t)
    raise ValueError(f"sample_t: method={method!r} is invalid; valid choices: {T_SAMPLING}")


def bell_time(u: Array) -> tuple[Array, Array]:
    """Uniform u in [0, 1) -> (t, 1 / q(t)): t ~ Beta(2, 2) by inverting its CDF 3t^2 - 2t^3, and
    the importance weight for its density q(t) = 6 t (1 - t). Any shape, float32."""
    u = jnp.asarray(u, jnp.float32)
    t = 0.5 - jnp.sin(jnp.arcsin(1.0 - 2.0 * u) / 3.0)
    t = jnp.clip(t, 0.0, 1.0 - 2.0**-24)
    return t, 1.0 / jnp.maximum(6.0 * t * (1.0 - t), 1e-12)


def per_position(x: Array, length: int) -> Array:
    """A per-row (B,) or per-block (B, K) quantity at every position of its row or block:
    (B, length), block k covering positions [k length / K, (k + 1) length / K)."""
    x = jnp.asarray(x)
    if x.ndim == 1:
        return jnp.broadcast_to(x[:, None], (x.shape[0], length))
    return jnp.repeat(x, length // x.shape[1], axis=1, total_repeat_length=length)


def forward_mask(
    key: Array, tokens: Array, p: Array, maskable: Array, mask_id: int
) -> tuple[Array, Array]:
    """Independently replaces each maskable token of the clean tokens x0 (B, L) int32 by
    ``mask_id`` with probability p: per sequence (B,) or per block (B, K) float -> inputs x_t
    (B, L) int32 and is_masked (B, L) bool; inputs == mask_id where is_masked. maskable: (B, L)
    bool, False positions are never masked."""
    u = jax.random.uniform(key, tokens.shape, jnp.float32)
    is_masked = (u < per_position(jnp.asarray(p, jnp.float32), tokens.shape[1])) & maskable
    inputs = jnp.where(is_masked, jnp.asarray(mask_id, tokens.dtype), tokens)
    return inputs.astype(jnp.int32), is_masked


def pair_rows(batch: dict[str, Array]) -> dict[str, Array]:
    """For masking="paired" | "complementary": every (B, ...) array's first B/2 rows, twice
    (row i + B/2 is a copy of row i). B must be even."""

    def twice(x: Array) -> Array:
        """The first B/2 rows of `x` (B, ...), twice: (B, ...)."""
        half = x[: x.shape[0] // 2]
        return jnp.concatenate([half, half], axis=0)

    return {k: twice(jnp.asarray(v)) for k, v in batch.items()}


def noise_batch(
    key: Array,
    tokens: Array,
    cfg: DiffusionConfig,
    *,
    prompt_mask: Optional[Array] = None,
    valid: Optional[Array] = None,
) -> dict[str, Array]:
    """Noises a global batch of clean sequences, tokens (B, L) int32, for one training step.

    key: the PRNG key (the caller folds in the step). For masking="complementary" row i + B/2 of
    tokens must be a copy of row i (``pair_rows``), and it gets the complementary mask. cfg is
    static under jit. prompt_mask: optional (B, L) bool, True at SFT prompt positions: never
    masked; with probability cfg.cfg_prompt_dropout per sequence the whole (valid) prompt is
    replaced by mask_id in ``inputs`` (still excluded from ``is_masked`` and the loss). valid:
    optional (B, L) bool, positions that exist (default all True).

    -> a dict of inputs (B, L) int32 (x_t, the model input), targets (B, L) int32 (= tokens),
    is_masked (B, L) bool (positions noised by the forward process: the loss positions), weight
    (B,) float32 (the ELBO weight w(t') per sequence, times 1 / q(t) for the bell density), p
    (B,) float32 (mask probability per sequence) and valid (B, L) bool (existing positions: the
    attention key-padding mask and the loss mask). With cfg.block_size = b > 0 each block of b
    positions draws its own t (stratified over all B * L / b blocks) and weight and p are
    (B, L / b), per block. With probability cfg.random_length_prob (one
    draw per batch) a length l ~ U{1..L} is drawn and positions >= l are made invalid for every
    sequence.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    B, L = tokens.shape
    k_t, k_mask, k_gate, k_len, k_cfg = jax.random.split(key, 5)

    valid = jnp.ones((B, L), bool) if valid is None else jnp.asarray(valid, bool)
    if cfg.random_length_prob > 0.0:
        cut_batch = jax.random.uniform(k_gate, (), jnp.float32) < cfg.random_length_prob
        length = jax.random.randint(k_len, (), 1, L + 1)
        keep = jnp.arange(L) < length
        valid = valid & jnp.where(cut_batch, keep, True)[None, :]

    prompt = jnp.zeros((B, L), bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    maskable = valid & ~prompt

    complementary = cfg.masking == "complementary"
    K = L // cfg.block_size if cfg.block_size else 1
    rows = B // 2 if complementary else B
    t = sample_t(k_t, rows * K, cfg.t_sampling).reshape(rows, K)
    importance = 1.0
    if cfg.t_density == "bell":
        t, importance = bell_time(t)
    p, weight = noise_level(t, cfg)
    weight = weight * importance
    if complementary:
        # Copy 2 masks what copy 1 leaves visible: rate 1 - p. Each copy's weight is
        # (dp/dt') / (rate * q(t)), the ELBO integrand over that copy's rate.
        first = jax.random.uniform(k_mask, (B // 2, L), jnp.float32) < per_position(p, L)
        is_masked = jnp.concatenate([first, ~first], axis=0) & maskable
        weight = jnp.concatenate([weight, weight * p / (1.0 - p)])
        p = jnp.concatenate([p, 1.0 - p])
        inputs = jnp.where(is_masked, jnp.int32(cfg.mask_id), tokens)
    else:
        inputs, is_masked = forward_mask(k_mask, tokens, p, maskable, cfg.mask_id)

    if prompt_mask is not None and cfg.cfg_prompt_dropout > 0.0:
        drop = jax.random.uniform(k_cfg, (B,), jnp.float32) < cfg.cfg_prompt_dropout
        inputs = jnp.where(drop[:, None] & prompt & valid, jnp.int32(cfg.mask_id), inputs)

    per_row = (lambda x: x[:, 0]) if not cfg.block_size else (lambda x: x)
    return {
        "inputs": inputs,
        "targets": tokens,
        "is_masked": is_masked,
        "weight": per_row(weight).astype(jnp.float32),
        "p": per_row(p).astype(jnp.float32),
        "valid": valid,
    }


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Token cross-entropy -log softmax(logits)[target], in float32.

    logits: (B, L, V) any float dtype (e.g. bfloat16); targets: (B, L) int -> (B, L) float32.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - tgt


def _weight_BxL(batch: dict[str, Array]) -> Array:
    """The loss weight of every position (B, L) float32: its row's, or its block's."""
    return per_position(batch["weight"].astype(jnp.float32), batch["targets"].shape[1])


def _masked_aux(ce: Array, loss_mask: Array) -> dict[str, Array]:
    num_masked = jnp.sum(loss_mask.astype(jnp.int32))
    masked_ce = jnp.sum(jnp.where(loss_mask, ce, 0.0)) / jnp.maximum(num_masked, 1)
    return {"num_masked": num_masked, "masked_ce": masked_ce}


def pretrain_loss(logits: Array, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Pretraining loss (unbiased per-token negative ELBO, LLaDA).

    sum over masked valid positions of CE * weight[b], divided by the number of valid positions
    (B * L normally; B * l for a random-length batch).

    logits (B, L, V) float; batch: the output of ``noise_batch`` (uses targets, is_masked,
    weight, valid) -> loss () float32 and aux {"num_masked": () int32, "masked_ce": () float32
    (mean unweighted CE over masked tokens)}.
    """
    ce = cross_entropy(logits, batch["targets"])
    valid = batch["valid"].astype(bool)
    loss_mask = batch["is_masked"].astype(bool) & valid
    weighted = jnp.where(loss_mask, ce * _weight_BxL(batch), 0.0)
    num_valid = jnp.sum(valid.astype(jnp.float32))
    loss = jnp.sum(weighted) / jnp.maximum(num_valid, 1.0)
    return loss, _masked_aux(ce, loss_mask)


def sft_loss(
    logits: Array, batch: dict[str, Array], response_mask: Array
) -> tuple[Array, dict[str, Array]]:
    """SFT loss (LLaDA): per pair, sum over masked response tokens of CE * weight divided by
    that pair's answer length, then the mean over the pairs of the batch.

    Unpacked rows (no "segment_ids" in ``batch``): a row is one pair, so the loss is the mean over
    the B rows of sum(CE * weight over masked response tokens) / answer_length(row).

    Packed rows (``batch["segment_ids"]`` (B, L) int, 1, 2, 3 ... per pair within a row, 0 = no
    pair): normalization is per pair (segment) and the loss is the mean over ALL pairs of the batch
    (pairs, not rows). A pair exists if at least one position of its row carries its id (whether
    or not valid, so a pair cut away by a random-length batch still counts, with 0, exactly like a
    row in the unpacked case). Positions with segment id 0 are never in the loss. With one pair per
    row (segment id 1 everywhere) this equals the unpacked loss (up to float summation order).
    Implemented with static shapes: a segment_sum over B * (L + 1) (row, segment) slots.

    logits (B, L, V) float; batch: the output of ``noise_batch`` (uses targets, is_masked,
    weight, valid), optionally with "segment_ids" (B, L) int32 in [0, L] added by the caller;
    response_mask: (B, L) bool, True at response positions (non-prompt; EOS padding included, it
    is part of the response). Answer length = sum(response_mask & valid) per pair, floored at 1.
    -> loss () float32 and aux {"num_masked", "masked_ce"} as in ``pretrain_loss``.
    """
    ce = cross_entropy(logits, batch["targets"])
    response = jnp.asarray(response_mask, bool) & batch["valid"].astype(bool)
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        loss_mask = batch["is_masked"].astype(bool) & response
        weighted = jnp.where(loss_mask, ce * _weight_BxL(batch), 0.0)
        answer_len = jnp.maximum(jnp.sum(response.astype(jnp.float32), axis=1), 1.0)
        loss = jnp.mean(jnp.sum(weighted, axis=1) / answer_len)
        return loss, _masked_aux(ce, loss_mask)

    B, L = ce.shape
    seg = jnp.asarray(segment_ids, jnp.int32)
    in_pair = seg > 0
    response = response & in_pair
    loss_mask = batch["is_masked"].astype(bool) & response
    weighted = jnp.where(loss_mask, ce * _weight_BxL(batch), 0.0)
    # (row, segment) slot b * (L + 1) + s; segment 0 slots are unused (all data there is 0).
    num_slots = B * (L + 1)
    slot = (jnp.arange(B, dtype=jnp.int32)[:, None] * (L + 1) + jnp.clip(seg, 0, L)).reshape(-1)
    pair_sum = jax.ops.segment_sum(weighted.reshape(-1), slot, num_segments=num_slots)
    pair_len = jax.ops.segment_sum(
        response.astype(jnp.float32).reshape(-1), slot, num_segments=num_slots
    )
    present = (
        jax.ops.segment_sum(in_pair.astype(jnp.float32).reshape(-1), slot, num_segments=num_slots)
        > 0
    )
    per_pair = jnp.where(present, pair_sum / jnp.maximum(pair_len, 1.0), 0.0)
    num_pairs = jnp.sum(present.astype(jnp.float32))
    loss = jnp.sum(per_pair) / jnp.maximum(num_pairs, 1.0)
    return loss, _masked_aux(ce, loss_mask)

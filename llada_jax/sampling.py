"""Reverse-process sampler for masked-diffusion LMs (LLaDA ``generate.py`` semantics).

The sampler works on a fixed canvas ``[prompt | gen_length mask tokens]`` and is a pure,
jit-able function built from ``jax.lax`` loops, so every shape is static.

Semantics (see LLaDA's ``generate.py``):

* Semi-autoregressive blocks: the generated region is split into ``gen_length // block_length``
  blocks that are denoised left to right; each block gets ``steps // num_blocks`` steps, and
  positions after the current block are never committed.
* Per block and per row, the number of masked tokens in the block (counted at the start of the
  block) is spread evenly over the block's steps, the remainder going to the first steps
  (:func:`num_transfer_tokens`).
* Each step runs the model on the whole canvas, draws ``x0 = argmax(logits / T + Gumbel)``
  (plain argmax for ``T == 0``), scores every candidate (a masked position before the end of
  the current block, so mask tokens inside the prompt compete too) by the softmax probability
  of ``x0`` (``"low_confidence"``) or ``U(0, 1)`` (``"random"``), and commits the top-k
  candidates of each row. Committed tokens are never remasked.

Classifier-free guidance (``cfg_scale`` w > 0, :mod:`llada_jax.guidance`): the unconditional
branch is the same canvas with every non-mask position of the prompt region (left pads included)
masked; logits = uncond + (w + 1) * (cond - uncond). Both branches run as one batch of 2B rows,
one model call per step.

Confidence-threshold decoding (``threshold``, Fast-dLLM) replaces the fixed per-step counts: each
step commits, in every row whose block still has masks, the most confident masked token of the
block and every other one whose confidence is at least the threshold (:func:`threshold_count`);
a block ends when it has no masks left, so ``steps`` is unused and the returned nfe counts the
model calls actually run. Only the block's masks compete.

K/V caches (``kv_cache``, Fast-dLLM's): each block's first step is a full pass that caches every
layer's keys and values; its later steps recompute only a window (:func:`window_pass`):
"prefix", the generated region (the prompt's keys and values cached); "dual", the block alone
(the prompt's, the earlier blocks' and the later masks' cached). Only the window's masks compete
in those steps. Exact for a one-layer model, approximate otherwise (deeper keys depend on every
token); "none": every step a full pass.

As in the reference, a token equal to ``mask_id`` proposed by the model is committed like any
other token (its position stays masked); a trained model never proposes it.

The code follows the loop: :func:`generate` runs the blocks left to right, each block its steps
(`_decode_block`); a step is a model call (:func:`full_pass` or :func:`window_pass`), the
proposal (:func:`propose`: x0 and its confidences), the pick (how many tokens to commit:
:func:`num_transfer_tokens`' schedule or :func:`threshold_count`) and the commit
(:func:`commit`: the top-k candidates take their proposals). Fixed-step and threshold decoding
share all of it but the pick and when a block ends. Settings are checked once, when their
:class:`SampleSettings` is built.

Only candidates need logits, so a model given as a ``SamplerModel`` runs its output head (the
vocabulary projection, then the draw and the softmax) on the current block's positions alone;
on the whole canvas only while masks before the block compete (an infilling template's, or a
mask token the model proposed and committed). The tokens are the same as computing every
position's logits; the transformer itself still runs on the whole canvas every step, since
every position's keys and values change with each commit.

EOS options: ``ban_eos`` sets the EOS logit to -inf before ``x0`` is drawn, so EOS is never
proposed. ``eos_zero_confidence`` does what the reference's ``confidence_eos_eot_inf`` does: after
``x0`` is drawn, the end-of-turn logit is set to -inf before the confidence softmax, and at
temperature 0 the EOS logit too (the reference writes into its noisy logits, which are the logits
themselves only at temperature 0). A proposed EOS or end-of-turn token then has confidence 0 and
is committed last, and the other tokens' probabilities are renormalized without them.

Precision: ``x0 = argmax(logits / T + g)`` with g standard Gumbel is the reference's
``argmax(exp(logits) / (-log u)^T)`` in its additive form, which cannot overflow. The reference
draws u in float64 because the low-precision forms of that ratio lose the noise's tail. Here g is
float64 when ``jax_enable_x64`` is on, else float32 drawn in JAX's high-dynamic-range mode, whose
largest value is about 32 instead of 16: a position's draw can differ from an exact one only when
one of its V Gumbels would exceed 32, with probability about V e^-32 (2e-9 for V = 126464).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax import guidance
from llada_jax.guidance import LogitsFn
from llada_jax.kernels.argmax import argmax
from llada_jax.sections import SettingError, check_choices, setting
from llada_jax.special_ids import SpecialIds

REMASKING_STRATEGIES = ("low_confidence", "random")
KV_CACHES = ("none", "prefix", "dual")


def num_transfer_tokens(mask_count: jax.Array, steps: int) -> jax.Array:
    """Number of tokens to commit at each step of a block, (B, steps) int32: row `b` sums to
    `mask_count[b]`, each step getting `mask_count // steps` tokens and the first
    `mask_count % steps` steps one more (LLaDA's `get_num_transfer_tokens`).

    mask_count: (B,) int, the number of masked tokens in the block for each row.
    steps: the number of denoising steps of the block (static).
    """
    mask_count = jnp.asarray(mask_count, jnp.int32)
    base = mask_count // steps
    remainder = mask_count % steps
    extra = jnp.arange(steps, dtype=jnp.int32)[None, :] < remainder[:, None]
    return base[:, None] + extra.astype(jnp.int32)


def select_top_k_mask(confidence: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean mask (B, T) of the `k[b]` highest-confidence positions in each row.

    Uses ranks (argsort of a stable descending argsort), so exactly `min(k[b], T)` positions are
    selected per row even when confidences tie; ties go to the lower position index.
    confidence: (B, T) float; non-candidates should be -inf.
    k: (B,) int, the number of positions to select per row.
    """
    order = jnp.argsort(-confidence, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return rank < jnp.asarray(k, jnp.int32)[:, None]


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """Token ids (B, T) int32 drawn as `argmax(logits / temperature + Gumbel)`; plain argmax when
    `temperature == 0`. The noise is float64 under `jax_enable_x64`, else float32 in
    high-dynamic-range mode (see the module docstring).

    logits: (B, T, V) float.
    key: PRNG key (unused when `temperature == 0`).
    temperature: static Python float >= 0.
    """
    if temperature > 0:
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        gumbel = jax.random.gumbel(key, logits.shape, dtype, mode="high")
        logits = logits.astype(dtype) / temperature + gumbel
    return argmax(logits)


def token_confidence(
    logits: jax.Array,
    x0: jax.Array,
    key: jax.Array,
    remasking: str,
    zero_ids: tuple[int, ...] = (),
) -> jax.Array:
    """Confidence (B, T) float32 of each proposed token.

    logits: (B, T, V) float.
    x0: (B, T) int32, the proposed tokens.
    key: PRNG key (used by "random").
    remasking: "low_confidence" (the softmax probability of `x0`) or "random" (U(0, 1)).
    zero_ids: token ids whose logits are -inf in that softmax (confidence 0 when proposed).
    """
    if remasking == "low_confidence":
        logits = logits.astype(jnp.float32)
        if zero_ids:
            logits = logits.at[..., list(zero_ids)].set(-jnp.inf)
        # softmax(logits)[x0], computed for x0 alone: exp(l - max) / sum(exp(l - max)).
        top = jnp.max(logits, axis=-1, keepdims=True)
        total = jnp.sum(jnp.exp(logits - top), axis=-1)
        chosen = jnp.take_along_axis(logits, x0[..., None], axis=-1)
        return jnp.exp(chosen - top)[..., 0] / total
    if remasking == "random":
        return jax.random.uniform(key, x0.shape, jnp.float32)
    raise ValueError(f"remasking must be one of {REMASKING_STRATEGIES}, got {remasking!r}")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How the reverse process runs: the `sample` config section's sampler keys, tools/sample.py's
    flags and lm-eval's model args. Checked when built (SettingError naming the key)."""

    SECTION: ClassVar[str] = "sample"

    gen_length: int = setting(64, "generated tokens per prompt")
    steps: int = setting(64, "sampling steps (model calls) for the whole generation")
    block_length: int = setting(64, "semi-autoregressive block; divides gen_length")
    temperature: float = setting(0.0, "0: greedy; > 0: Gumbel-max sampling")
    remasking: str = setting("low_confidence", "which proposals wait", REMASKING_STRATEGIES)
    cfg_scale: float = setting(0.0, "classifier-free guidance weight w; 0: none")
    threshold: float = setting(
        0.0, "commit every token this confident per step instead of `steps` (Fast-dLLM); 0: off"
    )
    ban_eos: bool = setting(False, "EOS is never proposed (its logit is -inf)")
    eos_zero_confidence: bool = setting(
        False, "proposed end-of-turn (and at temperature 0 EOS) tokens are committed last"
    )
    kv_cache: str = setting("none", "K/V reused across a block's steps (Fast-dLLM)", KV_CACHES)

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("gen_length", "steps", "block_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self._refuse(f"{{p}}{name}={value!r} is invalid; valid: a positive integer")
        if self.gen_length % self.block_length:
            self._refuse(
                f"{{p}}block_length={self.block_length} does not divide "
                f"{{p}}gen_length={self.gen_length}"
            )
        if self.steps % self.num_blocks:
            self._refuse(
                f"{{p}}steps={self.steps} is not divisible by the number of blocks, "
                f"{self.num_blocks} ({{p}}gen_length={self.gen_length} / "
                f"{{p}}block_length={self.block_length})"
            )
        for name in ("temperature", "cfg_scale"):
            if not getattr(self, name) >= 0:  # NaN too
                self._refuse(
                    f"{{p}}{name}={getattr(self, name)!r} is invalid; valid: a number >= 0"
                )
        if not 0 <= self.threshold <= 1:
            self._refuse(
                f"{{p}}threshold={self.threshold!r} is invalid; valid: 0 < threshold <= 1, or 0 "
                "(off)"
            )

    def _refuse(self, template: str) -> None:
        raise SettingError(self.SECTION, template)

    @property
    def num_blocks(self) -> int:
        """Semi-autoregressive blocks of the generation."""
        return self.gen_length // self.block_length


def propose(
    logits_BxWxV: jax.Array,
    key: jax.Array,
    *,
    temperature: float,
    remasking: str,
    ban_id: int | None = None,
    zero_ids: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """The model's proposal for W positions: tokens x0 (B, W) int32 and their confidences
    (B, W) float32.

    logits_BxWxV: (B, W, V) float, guided already with CFG.
    key: PRNG key of this step (split into the Gumbel key and the "random" key).
    temperature: static, >= 0; 0 is greedy argmax (:func:`sample_tokens`).
    remasking: "low_confidence" or "random" (:func:`token_confidence`).
    ban_id: a token id (EOS with `ban_eos`) whose logit is -inf before x0 is drawn.
    zero_ids: token ids whose logits are -inf in the confidence softmax only.
    """
    if ban_id is not None:
        logits_BxWxV = logits_BxWxV.at[..., ban_id].set(-jnp.inf)
    gumbel_key, remask_key = jax.random.split(key)
    x0_BxW = sample_tokens(logits_BxWxV, gumbel_key, temperature)
    return x0_BxW, token_confidence(logits_BxWxV, x0_BxW, remask_key, remasking, zero_ids)


def threshold_count(
    confidence_BxT: jax.Array, candidates_BxT: jax.Array, threshold: float
) -> jax.Array:
    """The threshold rule (Fast-dLLM): how many tokens a step commits in each row, (B,) int32: the
    number of candidates whose confidence is at least `threshold`, and at least 1. The top-k of
    :func:`commit` then takes exactly those, or the most confident candidate alone when none
    reaches the threshold.

    confidence_BxT: (B, T) float32, the proposal confidences.
    candidates_BxT: (B, T) bool, the positions that may be committed.
    threshold: static, 0 < threshold <= 1.
    """
    reached_B = jnp.sum(candidates_BxT & (confidence_BxT >= threshold), axis=-1)
    return jnp.maximum(reached_B, 1).astype(jnp.int32)


def commit(
    x_BxT: jax.Array,
    x0_BxT: jax.Array,
    confidence_BxT: jax.Array,
    candidates_BxT: jax.Array,
    k_B: jax.Array,
) -> jax.Array:
    """One step's commit: the canvas after it, (B, T) int32, in which the `k_B[b]` most confident
    candidates of each row take their proposals and every other position keeps its token.

    x_BxT: (B, T) int32, the canvas.
    x0_BxT: (B, T) int32, the proposed tokens.
    confidence_BxT: (B, T) float32 (any value off the candidates).
    candidates_BxT: (B, T) bool, the positions that may be committed (masked ones).
    k_B: (B,) int, the tokens to commit per row (fewer when a row has fewer candidates).
    """
    confidence_BxT = jnp.where(candidates_BxT, confidence_BxT, -jnp.inf)
    chosen_BxT = select_top_k_mask(confidence_BxT, k_B) & candidates_BxT
    return jnp.where(chosen_BxT, x0_BxT, x_BxT)


class SamplerModel(NamedTuple):
    """The model as the sampler runs it: the pass over the canvas apart from the output head, so
    that the head (the vocabulary projection, the draw and the softmax after it) runs only on
    the positions that can be committed.

    body: (tokens (B, T), valid (B, T)) -> (hidden (B, T, ...), cache): the pass over the canvas
      up to the head; cache is every layer's keys and values for the K/V caches, else None.
    head: hidden (B, W, ...) -> logits (B, W, V), position by position.
    window: for the K/V caches, (tokens (B, W), valid (B, T), cache, start) -> hidden (B, W, ...)
      of the positions [start, start + W), every other position's keys and values taken from
      `cache`; None without them.
    """

    body: Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]
    head: Callable[[jax.Array], jax.Array]
    window: Callable[[jax.Array, jax.Array, Any, jax.Array], jax.Array] | None = None


def logits_model(logits_fn: LogitsFn) -> SamplerModel:
    """A (tokens, valid) -> logits function as a SamplerModel: its hidden state is the logits,
    its head the identity."""
    return SamplerModel(body=lambda tokens, valid: (logits_fn(tokens, valid), None), head=_same)


def _same(x: jax.Array) -> jax.Array:
    return x


def full_pass(
    model: SamplerModel,
    x_BxT: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    mask_id: int,
    cfg_scale: float,
) -> tuple[jax.Array, Any]:
    """The model's body on the whole canvas (and its unconditional copy with CFG): (hidden
    (R, T, ...), cache), R = B, or 2B with CFG; cache as `model.body` gives it.

    x_BxT, valid_BxT: (B, T), the canvas and its key-padding mask.
    prompt_BxT: (B, T) bool, what CFG's unconditional rows mask (:mod:`llada_jax.guidance`).
    """
    return model.body(*guidance.model_rows(x_BxT, valid_BxT, prompt_BxT, mask_id, cfg_scale))


def window_pass(
    model: SamplerModel,
    x_BxT: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    cache: Any,
    start: jax.Array,
    width: int,
    mask_id: int,
    cfg_scale: float,
) -> jax.Array:
    """The cached window pass (Fast-dLLM's K/V caches): the hidden state (R, width, ...), R = B or
    2B with CFG, of the positions [start, start + width), recomputed with every other position's
    keys and values taken from `cache` (a full pass's).

    x_BxT, valid_BxT, prompt_BxT: (B, T) as :func:`full_pass`.
    cache: `model.body`'s cache from the block's first (full) pass.
    start: int32 scalar, the window's first position; `width` static.
    """
    x_BxW = jax.lax.dynamic_slice_in_dim(x_BxT, start, width, axis=1)
    prompt_BxW = jax.lax.dynamic_slice_in_dim(prompt_BxT, start, width, axis=1)
    rows = guidance.model_rows(x_BxW, valid_BxT, prompt_BxW, mask_id, cfg_scale)
    return model.window(*rows, cache, start)


def _place(
    x_BxT: jax.Array, x0_BxW: jax.Array, confidence_BxW: jax.Array, start: jax.Array | int
) -> tuple[jax.Array, jax.Array]:
    """A window's proposal (B, W) at `start` on the canvas: x0 (B, T), x elsewhere, and
    confidence (B, T) float32, -inf elsewhere."""
    x0_BxT = jax.lax.dynamic_update_slice_in_dim(x_BxT, x0_BxW, start, axis=1)
    confidence_BxT = jnp.full(x_BxT.shape, -jnp.inf, jnp.float32)
    confidence_BxT = jax.lax.dynamic_update_slice_in_dim(confidence_BxT, confidence_BxW, start, 1)
    return x0_BxT, confidence_BxT


class StepRule(NamedTuple):
    """How a denoising step proposes and commits tokens: the static settings it reads, the same
    in this sampler and the block-diffusion one (block_sampling.py)."""

    mask_id: int
    steps_per_block: int  # fixed-step decoding's steps per block
    threshold: float | None  # threshold decoding when set
    cfg_scale: float
    temperature: float
    remasking: str
    ban_id: int | None  # EOS with ban_eos
    zero_ids: tuple[int, ...]  # zero-confidence ids with eos_zero_confidence

    @classmethod
    def of(cls, settings: SampleSettings, ids: SpecialIds) -> StepRule:
        """The rule of these sample settings and special ids."""
        s = settings
        return cls(
            mask_id=ids.mask_id,
            steps_per_block=s.steps // s.num_blocks,
            threshold=s.threshold or None,
            cfg_scale=s.cfg_scale,
            temperature=s.temperature,
            remasking=s.remasking,
            ban_id=ids.eos_id if s.ban_eos else None,
            zero_ids=zero_confidence_ids(s, ids),
        )

    def propose(self, logits_BxWxV: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`propose` (x0, confidence: (B, W)) with this rule's sampling settings."""
        return propose(
            logits_BxWxV,
            key,
            temperature=self.temperature,
            remasking=self.remasking,
            ban_id=self.ban_id,
            zero_ids=self.zero_ids,
        )


class _Decoding(NamedTuple):
    """One `generate` call's static settings, as the loop's parts read them."""

    model: SamplerModel
    rule: StepRule
    prompt_len: int
    gen_length: int
    block_length: int
    kv_cache: str


def _propose_on_canvas(
    d: _Decoding,
    key: jax.Array,
    hidden_RxWxH: jax.Array,
    offset: jax.Array | int,
    x_BxT: jax.Array,
    block_start: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The proposal (x0, confidence: (B, T)) from the hidden state (R, W, ...) of the positions
    [offset, offset + W), R = B or 2B with CFG (guided here). The head runs on the block alone,
    or on the whole window while masks before the block compete (fixed-step decoding) and some
    are in it; confidence is -inf wherever it did not run."""

    def at(hidden: jax.Array, start: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """The head (guided with CFG) and its proposal on the hidden state (R, W, ...) of the
        positions from `start` -> (x0, confidence) (B, T), placed on the canvas."""
        logits = d.model.head(hidden)
        if d.rule.cfg_scale > 0:
            logits = guidance.guide(logits, d.rule.cfg_scale)
        x0_BxW, confidence_BxW = d.rule.propose(logits, key)
        return _place(x_BxT, x0_BxW, confidence_BxW, start)

    def block_only() -> tuple[jax.Array, jax.Array]:
        """`at` on the block's positions alone, sliced from the hidden state."""
        hidden = jax.lax.dynamic_slice_in_dim(hidden_RxWxH, block_start - offset, d.block_length, 1)
        return at(hidden, block_start)

    if d.rule.threshold is not None or hidden_RxWxH.shape[1] == d.block_length:
        return block_only()
    positions_T = jnp.arange(x_BxT.shape[1], dtype=jnp.int32)
    before_block_T = (positions_T >= offset) & (positions_T < block_start)
    some_earlier = jnp.any((x_BxT == d.rule.mask_id) & before_block_T[None, :])
    return jax.lax.cond(some_earlier, lambda: at(hidden_RxWxH, offset), block_only)


def _denoise(
    d: _Decoding,
    key: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    x_BxT: jax.Array,
    step: jax.Array,
    block_start: jax.Array,
    cache: Any,
    full: bool,
) -> tuple[jax.Array, jax.Array, Any]:
    """One model call and its proposal: (x0 (B, T), confidence (B, T), cache). `full`: a pass
    over the canvas, returning its cache; else the cached window pass with `cache` ("dual": the
    block; "prefix": the generated region). `step` (int32) numbers the call for its key."""
    if full:
        hidden, cache = full_pass(
            d.model, x_BxT, valid_BxT, prompt_BxT, d.rule.mask_id, d.rule.cfg_scale
        )
        offset = 0
    else:
        offset = block_start if d.kv_cache == "dual" else jnp.int32(d.prompt_len)
        width = d.block_length if d.kv_cache == "dual" else d.gen_length
        hidden = window_pass(
            d.model,
            x_BxT,
            valid_BxT,
            prompt_BxT,
            cache,
            offset,
            width,
            d.rule.mask_id,
            d.rule.cfg_scale,
        )
    key = jax.random.fold_in(key, step)
    return (*_propose_on_canvas(d, key, hidden, offset, x_BxT, block_start), cache)


def _pick(
    d: _Decoding,
    schedule_BxS: jax.Array | None,
    taken: jax.Array | int,
    confidence_BxT: jax.Array,
    candidates_BxT: jax.Array,
) -> jax.Array:
    """How many tokens step `taken` of the block commits per row, (B,) int32: the fixed
    schedule's (:func:`num_transfer_tokens`, `schedule_BxS`) or the threshold rule's."""
    if d.rule.threshold is None:
        return schedule_BxS[:, taken]
    return threshold_count(confidence_BxT, candidates_BxT, d.rule.threshold)


def _decode_block(
    d: _Decoding,
    key: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    block: jax.Array,
    carry: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Block `block` denoised: a full pass, then steps (window passes with a K/V cache) until
    the block is done: after its `steps_per_block` steps, or with a threshold when it has no
    masks left. carry: (canvas (B, T) int32, model calls so far int32)."""
    x_BxT, nfe = carry
    block_start = d.prompt_len + block * d.block_length
    positions_T = jnp.arange(x_BxT.shape[1], dtype=jnp.int32)
    in_block_T = (positions_T >= block_start) & (positions_T < block_start + d.block_length)
    schedule_BxS = None
    if d.rule.threshold is None:
        # The block's masked tokens scheduled over its steps, counted at its start, while every
        # mask before its end competes (mask tokens inside the prompt, infilling templates,
        # included): as the reference does, a block can thus end with masks left.
        reach_T = positions_T < block_start + d.block_length
        masked_B = jnp.sum((x_BxT == d.rule.mask_id) & in_block_T[None, :], axis=-1)
        schedule_BxS = num_transfer_tokens(masked_B, d.rule.steps_per_block)
    else:  # only the block's masks compete
        reach_T = in_block_T

    def step(x_BxT, nfe, taken, cache, full):
        """One step: a model call (a full pass if `full`, else the cached window pass) and the
        commit of its most confident candidates -> (canvas (B, T) int32, cache)."""
        x0_BxT, confidence_BxT, cache = _denoise(
            d, key, valid_BxT, prompt_BxT, x_BxT, nfe, block_start, cache, full
        )
        candidates_BxT = (x_BxT == d.rule.mask_id) & reach_T[None, :]
        k_B = _pick(d, schedule_BxS, taken, confidence_BxT, candidates_BxT)
        return commit(x_BxT, x0_BxT, confidence_BxT, candidates_BxT, k_B), cache

    x_BxT, cache = step(x_BxT, nfe, 0, None, full=True)

    def unfinished(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """Whether the block takes another step: fewer than steps_per_block taken, or with a
        threshold, masks left in it (and fewer than block_length steps)."""
        x_BxT, _, taken = state
        if d.rule.threshold is None:
            return taken < d.rule.steps_per_block
        # Every step commits at least one token per unfinished row, so block_length steps end
        # the block; the bound also ends it should a NaN confidence commit nothing.
        masks_left = jnp.any((x_BxT == d.rule.mask_id) & in_block_T[None, :])
        return masks_left & (taken < d.block_length)

    def next_step(state: tuple[jax.Array, jax.Array, jax.Array]):
        """(canvas (B, T), model calls, steps taken) after one more step, a window pass unless
        kv_cache is "none"."""
        x_BxT, nfe, taken = state
        x_BxT, _ = step(x_BxT, nfe, taken, cache, full=d.kv_cache == "none")
        return x_BxT, nfe + 1, taken + 1

    x_BxT, nfe, _ = jax.lax.while_loop(unfinished, next_step, (x_BxT, nfe + 1, jnp.int32(1)))
    return x_BxT, nfe


def initial_canvas(
    prompt_BxP: jax.Array, prompt_valid_BxP: jax.Array, gen_length: int, mask_id: int
) -> tuple[jax.Array, jax.Array]:
    """The canvas (B, T = P + gen_length) int32, the prompt then masks, and its key-padding mask
    (B, T) bool, the prompt's then True."""
    generated = (prompt_BxP.shape[0], gen_length)
    canvas_BxT = jnp.concatenate([prompt_BxP, jnp.full(generated, mask_id, jnp.int32)], axis=1)
    valid_BxT = jnp.concatenate([prompt_valid_BxP, jnp.ones(generated, jnp.bool_)], axis=1)
    return canvas_BxT, valid_BxT


def check_inputs(
    prompt: jax.Array, prompt_valid: jax.Array, settings: SampleSettings, ids: SpecialIds
) -> None:
    """Raises ValueError unless the prompt arrays and the ids fit the settings (which check
    themselves when built); the block sampler's check too."""
    if prompt.ndim != 2 or prompt_valid.shape != prompt.shape:
        raise ValueError(
            f"prompt must be (B, Lp) with prompt_valid of the same shape, got "
            f"{prompt.shape} and {prompt_valid.shape}"
        )
    if ids.mask_id < 0:
        raise ValueError("sampling needs a mask id")
    if settings.ban_eos and ids.eos_id < 0:
        raise ValueError("ban_eos=True requires an EOS id")
    if settings.eos_zero_confidence and (ids.eos_id < 0 or ids.eot_id < 0):
        raise ValueError("eos_zero_confidence=True requires EOS and end-of-turn ids")


def zero_confidence_ids(settings: SampleSettings, ids: SpecialIds) -> tuple[int, ...]:
    """The ids `propose` gives confidence 0 (its `zero_ids`): with eos_zero_confidence the
    end-of-turn id, and at temperature 0 EOS too (module docstring); else none."""
    if not settings.eos_zero_confidence:
        return ()
    return (ids.eot_id, ids.eos_id) if settings.temperature == 0 else (ids.eot_id,)


def _check_call(
    model: SamplerModel,
    prompt: jax.Array,
    prompt_valid: jax.Array,
    settings: SampleSettings,
    ids: SpecialIds,
) -> None:
    """Raises ValueError unless the arrays, the ids and the model fit the settings."""
    check_inputs(prompt, prompt_valid, settings, ids)
    if settings.kv_cache != "none" and model.window is None:
        raise ValueError(f"kv_cache={settings.kv_cache!r} needs a SamplerModel with a window pass")


def generate(
    model: LogitsFn | SamplerModel,
    prompt: jax.Array,
    prompt_valid: jax.Array,
    key: jax.Array,
    settings: SampleSettings,
    ids: SpecialIds,
) -> tuple[jax.Array, jax.Array]:
    """Samples `settings.gen_length` tokens after `prompt` with the LLaDA reverse process: the
    blocks left to right, each denoised in steps of propose, pick and commit.

    Pure and jit-able (`model`, `settings` and `ids` static under `jax.jit`).
    model: `(tokens (B, T) int32, valid (B, T) bool) -> logits (B, T, V)`, `valid` the key-padding
      mask; or a `SamplerModel` (its head then runs only where tokens can be committed; one with
      a window pass for a `kv_cache` other than "none").
    prompt: (B, P) int32, left-padded; prompt_valid: (B, P) bool, False on the left pads.
    key: PRNG key (the Gumbel noise at temperature > 0, and "random" remasking).
    ids: the mask id, and the EOS and end-of-turn ids `ban_eos` and `eos_zero_confidence` read.
    Returns (canvas (B, T = P + gen_length) int32: the prompt unchanged, then the generated
    tokens; nfe: int32 scalar, the model calls run, full or window passes).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    prompt_valid = jnp.asarray(prompt_valid, jnp.bool_)
    if not isinstance(model, SamplerModel):
        model = logits_model(model)
    _check_call(model, prompt, prompt_valid, settings, ids)
    s = settings
    d = _Decoding(
        model=model,
        rule=StepRule.of(s, ids),
        prompt_len=prompt.shape[1],
        gen_length=s.gen_length,
        block_length=s.block_length,
        kv_cache=s.kv_cache,
    )
    canvas, valid = initial_canvas(prompt, prompt_valid, s.gen_length, ids.mask_id)
    prompt_index = canvas != ids.mask_id  # at the start: the prompt region's non-mask positions
    block_fn = functools.partial(_decode_block, d, key, valid, prompt_index)
    return jax.lax.fori_loop(0, s.num_blocks, block_fn, (canvas, jnp.int32(0)))

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

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.kernels.argmax import argmax

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]

REMASKING_STRATEGIES = ("low_confidence", "random")
KV_CACHES = ("none", "prefix", "dual")


def num_transfer_tokens(mask_count: jax.Array, steps: int) -> jax.Array:
    """Number of tokens to commit at each step of a block.

    Args:
      mask_count: (B,) int, number of masked tokens in the block for each row.
      steps: number of denoising steps of the block (static).

    Returns:
      (B, steps) int32; row ``b`` sums to ``mask_count[b]``. Each step gets
      ``mask_count // steps`` tokens and the first ``mask_count % steps`` steps get one more
      (LLaDA's ``get_num_transfer_tokens``).
    """
    mask_count = jnp.asarray(mask_count, jnp.int32)
    base = mask_count // steps
    remainder = mask_count % steps
    extra = jnp.arange(steps, dtype=jnp.int32)[None, :] < remainder[:, None]
    return base[:, None] + extra.astype(jnp.int32)


def select_top_k_mask(confidence: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean mask of the ``k[b]`` highest-confidence positions in each row.

    Uses ranks (argsort of a stable descending argsort), so exactly ``min(k[b], T)`` positions are
    selected per row even when confidences tie; ties go to the lower position index.

    Args:
      confidence: (B, T) float; non-candidates should be ``-inf``.
      k: (B,) int, number of positions to select per row.

    Returns:
      (B, T) bool.
    """
    order = jnp.argsort(-confidence, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return rank < jnp.asarray(k, jnp.int32)[:, None]


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """``argmax(logits / temperature + Gumbel)``; plain argmax when ``temperature == 0``.

    Args:
      logits: (B, T, V) float.
      key: PRNG key (unused when ``temperature == 0``).
      temperature: static Python float >= 0.

    Returns:
      (B, T) int32 token ids. The noise is float64 under ``jax_enable_x64``, else float32 in
      high-dynamic-range mode (see the module docstring).
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
    """Confidence of each proposed token.

    Args:
      logits: (B, T, V) float.
      x0: (B, T) int32 proposed tokens.
      key: PRNG key (used by ``"random"``).
      remasking: ``"low_confidence"`` (softmax probability of ``x0``) or ``"random"`` (U(0, 1)).
      zero_ids: token ids whose logits are -inf in that softmax (confidence 0 when proposed).

    Returns:
      (B, T) float32.
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


def check_settings(
    gen_length: int,
    steps: int,
    block_length: int,
    temperature: float,
    remasking: str,
    prefix: str = "",
    cfg_scale: float = 0.0,
    threshold: float | None = None,
    kv_cache: str = "none",
) -> None:
    """Raises ValueError (one line naming the setting as `prefix` + its name, e.g. the config
    key `sample.block_length`) unless the settings describe a sampler this module can run."""
    p = prefix
    for name, value in (
        ("gen_length", gen_length),
        ("steps", steps),
        ("block_length", block_length),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{p}{name}={value!r} is invalid; valid: a positive integer")
    if gen_length % block_length != 0:
        raise ValueError(
            f"{p}block_length={block_length} does not divide {p}gen_length={gen_length}"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(
            f"{p}steps={steps} is not divisible by the number of blocks, {num_blocks} "
            f"({p}gen_length={gen_length} / {p}block_length={block_length})"
        )
    if remasking not in REMASKING_STRATEGIES:
        raise ValueError(
            f"{p}remasking={remasking!r} is invalid; valid choices: {REMASKING_STRATEGIES}"
        )
    if temperature < 0:
        raise ValueError(f"{p}temperature={temperature!r} is invalid; valid: a number >= 0")
    if cfg_scale < 0:
        raise ValueError(f"{p}cfg_scale={cfg_scale!r} is invalid; valid: a number >= 0")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"{p}threshold={threshold!r} is invalid; valid: 0 < threshold <= 1")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"{p}kv_cache={kv_cache!r} is invalid; valid choices: {KV_CACHES}")


def _validate(
    prompt: jax.Array,
    prompt_valid: jax.Array,
    gen_length: int,
    steps: int,
    block_length: int,
    temperature: float,
    remasking: str,
    eos_id: int | None,
    ban_eos: bool,
    cfg_scale: float,
    threshold: float | None,
    eot_id: int | None,
    eos_zero_confidence: bool,
) -> None:
    if prompt.ndim != 2 or prompt_valid.shape != prompt.shape:
        raise ValueError(
            f"prompt must be (B, Lp) with prompt_valid of the same shape, got "
            f"{prompt.shape} and {prompt_valid.shape}"
        )
    check_settings(
        gen_length,
        steps,
        block_length,
        temperature,
        remasking,
        cfg_scale=cfg_scale,
        threshold=threshold,
    )
    if ban_eos and eos_id is None:
        raise ValueError("ban_eos=True requires eos_id")
    if eos_zero_confidence and (eos_id is None or eot_id is None):
        raise ValueError("eos_zero_confidence=True requires eos_id and eot_id")


def guided_logits(
    logits_fn: LogitsFn,
    x: jax.Array,
    valid: jax.Array,
    prompt_index: jax.Array,
    mask_id: int,
    cfg_scale: float,
) -> jax.Array:
    """logits_fn(x, valid) (B, T, V), guided when cfg_scale > 0 by the unconditional canvas
    (x with `prompt_index` (B, T) masked), both computed in one call on 2B rows."""
    logits = logits_fn(*_model_rows(x, valid, prompt_index, mask_id, cfg_scale))
    return _guide(logits, cfg_scale) if cfg_scale > 0 else logits


def _model_rows(
    x: jax.Array, valid: jax.Array, prompt_index: jax.Array, mask_id: int, cfg_scale: float
) -> tuple[jax.Array, jax.Array]:
    """The model's input (tokens, valid) for canvas x: x and valid (B rows), or with CFG the
    2B rows (x; x with prompt_index masked) and (valid; valid)."""
    if cfg_scale == 0:
        return x, valid
    uncond = jnp.where(prompt_index, mask_id, x)
    return jnp.concatenate([x, uncond]), jnp.concatenate([valid, valid])


def _guide(both_logits: jax.Array, cfg_scale: float) -> jax.Array:
    cond_logits, uncond_logits = jnp.split(both_logits, 2)
    return uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)


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


def generate(
    model: LogitsFn | SamplerModel,
    prompt: jax.Array,
    prompt_valid: jax.Array,
    key: jax.Array,
    *,
    gen_length: int,
    steps: int,
    block_length: int,
    mask_id: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    eos_id: int | None = None,
    ban_eos: bool = False,
    cfg_scale: float = 0.0,
    threshold: float | None = None,
    eot_id: int | None = None,
    eos_zero_confidence: bool = False,
    kv_cache: str = "none",
) -> tuple[jax.Array, jax.Array]:
    """Sample ``gen_length`` tokens after ``prompt`` with the LLaDA reverse process.

    Pure and jit-able (keyword arguments and ``model`` must be static under ``jax.jit``).

    Args:
      model: ``(tokens (B, T) int32, valid (B, T) bool) -> logits (B, T, V)``, ``valid`` the
        key-padding mask; or a ``SamplerModel`` (its head then runs only where tokens can be
        committed; one with a window pass for ``kv_cache`` other than "none").
      prompt: (B, Lp) int32, left-padded.
      prompt_valid: (B, Lp) bool, False on the left pads.
      key: PRNG key (used for Gumbel noise when ``temperature > 0`` and for ``"random"``).
      gen_length: number of generated tokens; ``T = Lp + gen_length``.
      steps: total number of denoising steps (= model calls).
      block_length: semi-autoregressive block size; must divide ``gen_length``, and the number of
        blocks must divide ``steps``.
      mask_id: id of the mask token.
      temperature: Gumbel-max temperature; 0 is greedy argmax.
      remasking: ``"low_confidence"`` or ``"random"``.
      eos_id: EOS id, needed for ``ban_eos`` and ``eos_zero_confidence``.
      ban_eos: if True the EOS logit is set to ``-inf`` before sampling.
      cfg_scale: classifier-free guidance weight w (0: none). The unconditional branch is the
        same canvas with every non-mask position of the prompt region (left pads included)
        masked; logits = uncond + (w + 1) * (cond - uncond). Both branches run as one batch of
        2B rows, one model call per step.
      threshold: confidence-threshold parallel decoding (Fast-dLLM) instead of the fixed
        per-step counts: each step commits, in every row whose block still has masks, the most
        confident masked token of the block and every other one whose confidence is at least
        `threshold`; a block ends when it has no masks left. `steps` is then unused, and the
        returned nfe counts the model calls actually run.
      eot_id: end-of-turn id, needed for ``eos_zero_confidence``.
      eos_zero_confidence: end-of-turn (and at temperature 0 EOS) proposals get confidence 0
        (see the module docstring).
      kv_cache: Fast-dLLM's caches. Each block's first step is a full pass that caches every
        layer's keys and values; its later steps recompute only a window: "prefix", the
        generated region (the prompt's keys and values cached); "dual", the block alone (the
        prompt's, the earlier blocks' and the later masks' cached). Only the window's masks
        compete in those steps. Exact for a one-layer model, approximate otherwise (deeper
        keys depend on every token); "none": every step a full pass.

    Returns:
      ``(canvas, nfe)``: canvas (B, T) int32 with the prompt unchanged and the generated tokens
      after it; nfe int32 scalar, the number of model calls (full or window passes).

    Note:
      As in the reference, a token equal to ``mask_id`` proposed by the model is committed like
      any other token; a trained model never proposes it.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    prompt_valid = jnp.asarray(prompt_valid, jnp.bool_)
    _validate(
        prompt,
        prompt_valid,
        gen_length,
        steps,
        block_length,
        temperature,
        remasking,
        eos_id,
        ban_eos,
        cfg_scale,
        threshold,
        eot_id,
        eos_zero_confidence,
    )
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache={kv_cache!r} is invalid; valid choices: {KV_CACHES}")
    if not isinstance(model, SamplerModel):
        model = logits_model(model)
    if kv_cache != "none" and model.window is None:
        raise ValueError(f"kv_cache={kv_cache!r} needs a SamplerModel with a window pass")

    batch, prompt_len = prompt.shape
    total_len = prompt_len + gen_length
    num_blocks = gen_length // block_length
    canvas = jnp.concatenate([prompt, jnp.full((batch, gen_length), mask_id, jnp.int32)], axis=1)
    valid = jnp.concatenate([prompt_valid, jnp.ones((batch, gen_length), jnp.bool_)], axis=1)
    positions = jnp.arange(total_len, dtype=jnp.int32)
    prompt_index = canvas != mask_id  # at the start: the prompt region's non-mask positions
    zero_ids = ()
    if eos_zero_confidence:
        zero_ids = (eot_id, eos_id) if temperature == 0 else (eot_id,)
    width = {"prefix": gen_length, "dual": block_length}.get(kv_cache, total_len)

    def propose(hidden: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x0 and its confidence (B, W) from the hidden state of W positions (of 2B rows with
        CFG, guided here)."""
        logits = model.head(hidden)
        if cfg_scale > 0:
            logits = _guide(logits, cfg_scale)
        if ban_eos:
            logits = logits.at[..., eos_id].set(-jnp.inf)
        gumbel_key, remask_key = jax.random.split(jax.random.fold_in(key, step))
        x0 = sample_tokens(logits, gumbel_key, temperature)
        return x0, token_confidence(logits, x0, remask_key, remasking, zero_ids)

    def placed(x: jax.Array, x0_w: jax.Array, conf_w: jax.Array, start: jax.Array):
        """x0 and confidence (B, T) of a window's (B, W) at `start`: x and -inf elsewhere."""
        x0 = jax.lax.dynamic_update_slice_in_dim(x, x0_w, start, axis=1)
        conf = jnp.full(x.shape, -jnp.inf, jnp.float32)
        return x0, jax.lax.dynamic_update_slice_in_dim(conf, conf_w, start, axis=1)

    def proposals(
        x: jax.Array,
        hidden: jax.Array,
        offset: jax.Array | int,
        step: jax.Array,
        block_start: jax.Array,
        earlier: bool,
    ) -> tuple[jax.Array, jax.Array]:
        """x0 and confidence (B, T) from the hidden state (B, W, ...) of the positions [offset,
        offset + W). The head runs on the block alone, unless `earlier` masks (before the
        block: inside the prompt, or proposed as tokens by the model) compete and there are
        some in the window."""

        def block_only() -> tuple[jax.Array, jax.Array]:
            hidden_w = jax.lax.dynamic_slice_in_dim(hidden, block_start - offset, block_length, 1)
            return placed(x, *propose(hidden_w, step), block_start)

        def whole_window() -> tuple[jax.Array, jax.Array]:
            return placed(x, *propose(hidden, step), offset)

        if not earlier or hidden.shape[1] == block_length:
            return block_only()
        before_block = (positions >= offset) & (positions < block_start)
        some_earlier = jnp.any((x == mask_id) & before_block[None, :])
        return jax.lax.cond(some_earlier, whole_window, block_only)

    def full_pass(
        x: jax.Array, step: jax.Array, block_start: jax.Array, earlier: bool
    ) -> tuple[jax.Array, jax.Array, Any]:
        """x0 and confidence (B, T) from a pass over the canvas, and the cache (None without
        kv_cache)."""
        hidden, cache = model.body(*_model_rows(x, valid, prompt_index, mask_id, cfg_scale))
        return (*proposals(x, hidden, 0, step, block_start, earlier), cache)

    def window_pass(
        x: jax.Array, step: jax.Array, block_start: jax.Array, cache: Any, earlier: bool
    ) -> tuple[jax.Array, jax.Array]:
        """x0 and confidence (B, T) from a window pass (-inf confidence outside the window)."""
        start = block_start if kv_cache == "dual" else jnp.int32(prompt_len)
        x_w = jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)
        p_w = jax.lax.dynamic_slice_in_dim(prompt_index, start, width, axis=1)
        hidden_w = model.window(*_model_rows(x_w, valid, p_w, mask_id, cfg_scale), cache, start)
        return proposals(x, hidden_w, start, step, block_start, earlier)

    if threshold is not None:  # only the block's masks compete
        return _threshold_decode(
            canvas,
            prompt_len,
            block_length,
            num_blocks,
            mask_id,
            threshold,
            functools.partial(full_pass, earlier=False),
            functools.partial(window_pass, earlier=False) if kv_cache != "none" else None,
        )

    steps_per_block = steps // num_blocks

    def block_fn(block: jax.Array, x: jax.Array) -> jax.Array:
        block_start = prompt_len + block * block_length
        block_end = block_start + block_length
        in_block = (positions >= block_start) & (positions < block_end)  # (T,)
        # The block's masked tokens scheduled over its steps, counted at its start, while every
        # mask before its end competes (mask tokens inside the prompt, infilling templates,
        # included): as the reference does, a block can thus end with masks left.
        schedule = num_transfer_tokens(
            jnp.sum((x == mask_id) & in_block[None, :], axis=-1), steps_per_block
        )
        first = block * steps_per_block

        def commit(x: jax.Array, x0: jax.Array, confidence: jax.Array, inner: jax.Array):
            candidates = (x == mask_id) & (positions < block_end)[None, :]
            confidence = jnp.where(candidates, confidence, -jnp.inf)
            chosen = select_top_k_mask(confidence, schedule[:, inner]) & candidates
            return jnp.where(chosen, x0, x)

        x0, confidence, cache = full_pass(x, first, block_start, earlier=True)
        x = commit(x, x0, confidence, 0)

        def step_fn(inner: jax.Array, x: jax.Array) -> jax.Array:
            if kv_cache == "none":
                x0, confidence, _ = full_pass(x, first + inner, block_start, earlier=True)
            else:
                x0, confidence = window_pass(x, first + inner, block_start, cache, earlier=True)
            return commit(x, x0, confidence, inner)

        return jax.lax.fori_loop(1, steps_per_block, step_fn, x)

    canvas = jax.lax.fori_loop(0, num_blocks, block_fn, canvas)
    return canvas, jnp.asarray(steps, jnp.int32)


def _threshold_decode(
    canvas: jax.Array,
    prompt_len: int,
    block_length: int,
    num_blocks: int,
    mask_id: int,
    threshold: float,
    full_pass: Callable[..., tuple[jax.Array, jax.Array, Any]],
    window_pass: Callable[..., tuple[jax.Array, jax.Array]] | None,
) -> tuple[jax.Array, jax.Array]:
    """Blocks left to right, each a full pass, then (window) passes until it has no masks;
    returns the canvas (B, T) and the model calls run (int32)."""
    positions = jnp.arange(canvas.shape[1], dtype=jnp.int32)

    def block_fn(block: jax.Array, carry: tuple[jax.Array, jax.Array]):
        start = prompt_len + block * block_length
        in_block = (positions >= start) & (positions < start + block_length)

        def commit(x: jax.Array, x0: jax.Array, confidence: jax.Array) -> jax.Array:
            candidates = (x == mask_id) & in_block[None, :]
            confidence = jnp.where(candidates, confidence, -jnp.inf)
            top1 = select_top_k_mask(confidence, jnp.ones(x.shape[:1], jnp.int32))
            return jnp.where((top1 | (confidence >= threshold)) & candidates, x0, x)

        x, nfe = carry
        x0, confidence, cache = full_pass(x, nfe, start)
        x = commit(x, x0, confidence)

        # Every step commits at least one token per unfinished row, so block_length steps end
        # the block; the bound also ends it should a NaN confidence commit nothing.
        def unfinished(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            x, _, taken = state
            return jnp.any((x == mask_id) & in_block[None, :]) & (taken < block_length)

        def step(state: tuple[jax.Array, jax.Array, jax.Array]):
            x, nfe, taken = state
            if window_pass is None:
                x0, confidence, _ = full_pass(x, nfe, start)
            else:
                x0, confidence = window_pass(x, nfe, start, cache)
            return commit(x, x0, confidence), nfe + 1, taken + 1

        x, nfe, _ = jax.lax.while_loop(unfinished, step, (x, nfe + 1, jnp.int32(1)))
        return x, nfe

    return jax.lax.fori_loop(0, num_blocks, block_fn, (canvas, jnp.int32(0)))

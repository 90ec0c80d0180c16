"""The reverse process of a block-diffusion model (``diffusion.block_size`` b > 0, BD3-LM style):
the generation is denoised block by block, each block given the prompt and the clean blocks
before it, with an exact K/V cache and a variable length.

Canvas: ``[prompt | gen_length masks]``, the prompt left-padded (key-masked pads) to P' = a
multiple of b, at least b, so that the generation starts at a block boundary; the prompt's own
blocks are thus counted back from its end. The model attends block-causally
(``attention.Blocks(b)``, no clean copy): each block sees itself and the blocks before it.

Why the cache is exact: under that pattern no key of a block depends on a later block, so the
keys and values of the prompt and of every committed block never change once computed. They are
computed once each: the prompt's in one pass (:func:`_prompt_cache`), a committed block's in one
clean window pass (:func:`_cache_block`, run when the next block starts: none is wasted after
the last block). Each denoising step of block k then runs the block's b tokens alone as a window
over the cache (`Transformer.window`), its valid keys the real prompt, the committed blocks and
the block itself: the keys the full canvas's pass under ``Blocks(b)`` gives the block's queries,
with the same values. Cost per step: one window of b tokens through every layer, attending to
the P' + (k + 1) b keys before the block's end, and the output head on the b tokens only.
``cache=False`` recomputes the whole canvas under ``Blocks(b)`` at every step (keys after the
current block invalid): the reference the cache equals. The two differ only by float rounding
(the same sums over matmuls of other shapes, about 1e-6 in float32 logits), so their tokens are
the same unless two candidates' confidences tie to that precision.

Within a block it is LLaDA's process (:mod:`llada_jax.sampling`: propose, commit, the fixed
per-step counts over ``steps // num_blocks`` steps or the confidence threshold; temperature,
low-confidence or random remasking, CFG with the prompt masked in the unconditional rows, which
have their own cache rows; ``ban_eos``, ``eos_zero_confidence``). Only the block's masks compete
(mask tokens inside the prompt are context, never filled). The key of each step is the key with
the step's number folded in, as in the LLaDA sampler.

Variable length: ``gen_length`` is a cap. A row stops in the block in which an EOS or
end-of-turn token is committed: once the block is done, every position after the first such
token of its generation is set to EOS (the block's rest and the later blocks, so that the row
has no masks left). The block loop ends when every row has stopped or after the last block; a
batch whose rows all stopped early runs no further model call. A row that stopped while others
go on keeps its tokens: its later blocks, all EOS, take part in the batch's passes and commit
nothing. nfe counts the denoising steps run (the model calls that propose tokens, one per step
for the whole batch, as the LLaDA sampler counts them); the cache adds one prompt pass and one
clean window pass per committed block that another follows.

Letters in names: B batch, R model rows (B, or 2B with CFG), P prompt, T canvas, W window (the
block, b), V vocabulary, D hidden.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax import guidance, sampling
from llada_jax.kernels.attention import Blocks
from llada_jax.sampling import SampleSettings
from llada_jax.special_ids import SpecialIds

# The model's keys and values (model.KVCache, (n_layers, R, T, K, H) each). The type is not
# imported: the method layer does not load the model's runner imports (sharding).
KVCache = Any


class BlockModel(NamedTuple):
    """A block-diffusion model as the block sampler runs it.

    block_size: b, the tokens per block it was trained with.
    body: (tokens (R, L) int32, valid (R, L) bool) -> (hidden (R, L, D), KVCache of every layer,
      (n_layers, R, L, K, H) each), the pass under ``Blocks(block_size)``.
    head: hidden (R, W, D) -> logits (R, W, V), position by position.
    window: (tokens (R, W), valid (R, T), cache (n_layers, R, T, K, H), start) -> (hidden
      (R, W, D), the window's KVCache (n_layers, R, W, K, H)): the positions [start, start + W)
      attending to their own keys and the cache's at the other valid keys.
    """

    block_size: int
    body: Callable[[jax.Array, jax.Array], tuple[jax.Array, KVCache]]
    head: Callable[[jax.Array], jax.Array]
    window: Callable[[jax.Array, jax.Array, KVCache, jax.Array], tuple[jax.Array, KVCache]]


def from_transformer(model: Callable[[], Any], block_size: int) -> BlockModel:
    """The BlockModel of a `model.Transformer` trained with blocks of `block_size`; `model()`
    returns it (called where each pass runs, so that a graph can be merged inside the loop)."""
    blocks = Blocks(block_size)
    return BlockModel(
        block_size=block_size,
        body=lambda tokens, valid: model().hidden(tokens, valid, return_cache=True, blocks=blocks),
        head=lambda hidden: model().head(hidden),
        window=lambda tokens, valid, cache, start: model().window(
            tokens, valid, cache, start, return_kv=True
        ),
    )


def block_settings(settings: SampleSettings, block_size: int) -> SampleSettings:
    """`settings` for a model trained with blocks of `block_size`: its block_length is the
    model's (whatever was set); steps are then per generation, ``steps // (gen_length / b)`` a
    block. Raises ValueError (one line) when gen_length or steps do not fit those blocks."""
    try:
        return dataclasses.replace(settings, block_length=block_size)
    except ValueError as e:
        raise ValueError(
            f"a block-diffusion model samples blocks of its diffusion.block_size={block_size} "
            f"tokens (sample.block_length / --block_length is taken from it): {e}"
        ) from None


class _Decoding(NamedTuple):
    """One `generate_blocks` call's static settings, as the loop's parts read them."""

    model: BlockModel
    cache: bool  # the exact K/V cache; False: the full canvas at every step
    rule: sampling.StepRule
    prompt_len: int  # P', the left-padded prompt's width, a multiple of the block
    gen_length: int
    stop_ids: tuple[int, ...]  # EOS and end-of-turn: a row ends after either
    fill_id: int  # what follows a row's end: EOS (end-of-turn without an EOS id)

    @property
    def width(self) -> int:
        """b, the block (the window of each step)."""
        return self.model.block_size

    @property
    def num_blocks(self) -> int:
        """Blocks of the generation at its cap."""
        return self.gen_length // self.width


def _visible(d: _Decoding, valid_BxT: jax.Array, block_start: jax.Array) -> jax.Array:
    """The valid keys (B, T) of a pass for the block at `block_start`: the real prompt, the
    committed blocks and the block; nothing after it."""
    positions_T = jnp.arange(valid_BxT.shape[1], dtype=jnp.int32)
    return valid_BxT & (positions_T < block_start + d.width)[None, :]


def _window_rows(
    d: _Decoding,
    x_BxT: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    block_start: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The model rows (tokens (R, W), valid (R, T)) of the window pass over the block at
    `block_start` (with CFG, its unconditional copy: `guidance.model_rows`)."""
    x_BxW = jax.lax.dynamic_slice_in_dim(x_BxT, block_start, d.width, axis=1)
    prompt_BxW = jax.lax.dynamic_slice_in_dim(prompt_BxT, block_start, d.width, axis=1)
    visible_BxT = _visible(d, valid_BxT, block_start)
    return guidance.model_rows(x_BxW, visible_BxT, prompt_BxW, d.rule.mask_id, d.rule.cfg_scale)


def _prompt_cache(
    d: _Decoding, x_BxT: jax.Array, valid_BxT: jax.Array, prompt_BxT: jax.Array
) -> KVCache:
    """Every layer's keys and values of the prompt's blocks, one pass under ``Blocks(b)``, in a
    cache of the canvas's length: (n_layers, R, T, K, H) each, zeros after the prompt."""
    p = d.prompt_len
    rows = guidance.model_rows(
        x_BxT[:, :p], valid_BxT[:, :p], prompt_BxT[:, :p], d.rule.mask_id, d.rule.cfg_scale
    )
    _, cache = d.model.body(*rows)
    grow = lambda c: jnp.pad(c, [(0, 0), (0, 0), (0, d.gen_length)] + [(0, 0)] * (c.ndim - 3))
    return jax.tree.map(grow, cache)


def _cache_block(
    d: _Decoding,
    x_BxT: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    cache: KVCache,
    block_start: jax.Array,
) -> KVCache:
    """`cache` with the committed block at `block_start` written in: its keys and values from
    one clean window pass over the cache."""
    rows = _window_rows(d, x_BxT, valid_BxT, prompt_BxT, block_start)
    _, kv = d.model.window(*rows, cache, block_start)
    write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, block_start, axis=2)
    return jax.tree.map(write, cache, kv)


def _block_logits(
    d: _Decoding,
    x_BxT: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    cache: KVCache | None,
    block_start: jax.Array,
) -> jax.Array:
    """The logits (B, W, V) of the block at `block_start` (guided with CFG): the window pass
    over the cache, or without it the pass over the whole canvas under ``Blocks(b)``."""
    if d.cache:
        hidden_RxWxD, _ = d.model.window(
            *_window_rows(d, x_BxT, valid_BxT, prompt_BxT, block_start), cache, block_start
        )
    else:
        visible_BxT = _visible(d, valid_BxT, block_start)
        rows = guidance.model_rows(x_BxT, visible_BxT, prompt_BxT, d.rule.mask_id, d.rule.cfg_scale)
        hidden_RxTxD, _ = d.model.body(*rows)
        hidden_RxWxD = jax.lax.dynamic_slice_in_dim(hidden_RxTxD, block_start, d.width, axis=1)
    logits_RxWxV = d.model.head(hidden_RxWxD)
    return guidance.guide(logits_RxWxV, d.rule.cfg_scale) if d.rule.cfg_scale > 0 else logits_RxWxV


def _denoise_block(
    d: _Decoding,
    key: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    cache: KVCache | None,
    block_start: jax.Array,
    x_BxT: jax.Array,
    nfe: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The block at `block_start` denoised: its `steps_per_block` steps, or with a threshold
    until it has no masks left (at most b steps). -> (canvas (B, T) int32, steps so far int32)."""
    block_of = lambda x: jax.lax.dynamic_slice_in_dim(x, block_start, d.width, axis=1)
    masked_BxW = block_of(x_BxT) == d.rule.mask_id
    schedule_BxS = sampling.num_transfer_tokens(jnp.sum(masked_BxW, -1), d.rule.steps_per_block)

    def step(state: tuple[jax.Array, jax.Array, jax.Array]):
        """One step: a model call, its proposal and the commit -> (canvas, nfe, steps taken)."""
        x_BxT, nfe, taken = state
        logits_BxWxV = _block_logits(d, x_BxT, valid_BxT, prompt_BxT, cache, block_start)
        x0_BxW, confidence_BxW = d.rule.propose(logits_BxWxV, jax.random.fold_in(key, nfe))
        x_BxW = block_of(x_BxT)
        candidates_BxW = x_BxW == d.rule.mask_id
        if d.rule.threshold is None:
            k_B = schedule_BxS[:, taken]
        else:
            k_B = sampling.threshold_count(confidence_BxW, candidates_BxW, d.rule.threshold)
        x_BxW = sampling.commit(x_BxW, x0_BxW, confidence_BxW, candidates_BxW, k_B)
        x_BxT = jax.lax.dynamic_update_slice_in_dim(x_BxT, x_BxW, block_start, axis=1)
        return x_BxT, nfe + 1, taken + 1

    def unfinished(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """Another step: fewer than steps_per_block taken, or with a threshold masks left (and
        fewer than b steps, should a NaN confidence commit nothing)."""
        x_BxT, _, taken = state
        if d.rule.threshold is None:
            return taken < d.rule.steps_per_block
        return jnp.any(block_of(x_BxT) == d.rule.mask_id) & (taken < d.width)

    x_BxT, nfe, _ = jax.lax.while_loop(unfinished, step, (x_BxT, nfe, jnp.int32(0)))
    return x_BxT, nfe


def _ends(d: _Decoding, x_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Where each row's generation ends: (stop (B, T) bool, the generated EOS and end-of-turn
    tokens; stopped (B,) bool, the rows that hold one)."""
    generated_T = jnp.arange(x_BxT.shape[1]) >= d.prompt_len
    stop_BxT = jnp.isin(x_BxT, jnp.asarray(d.stop_ids, jnp.int32)) & generated_T[None, :]
    return stop_BxT, jnp.any(stop_BxT, axis=-1)


def _fill_ends(d: _Decoding, x_BxT: jax.Array) -> jax.Array:
    """The canvas with every position after a row's first generated stop token set to EOS."""
    stop_BxT, _ = _ends(d, x_BxT)
    stops_before_BxT = jnp.cumsum(stop_BxT, axis=-1) - stop_BxT
    return jnp.where(stops_before_BxT > 0, d.fill_id, x_BxT)


def _run_block(
    d: _Decoding,
    key: jax.Array,
    valid_BxT: jax.Array,
    prompt_BxT: jax.Array,
    state: tuple[jax.Array, KVCache | None, jax.Array, jax.Array],
) -> tuple[jax.Array, KVCache | None, jax.Array, jax.Array]:
    """The next block: the previous one's keys and values cached (none before the first),
    its steps, then the rows that ended in it filled. state: (canvas (B, T) int32, cache or
    None, block index int32, steps so far int32)."""
    x_BxT, cache, block, nfe = state
    block_start = d.prompt_len + block * d.width
    if d.cache:
        cache = jax.lax.cond(
            block > 0,
            lambda: _cache_block(d, x_BxT, valid_BxT, prompt_BxT, cache, block_start - d.width),
            lambda: cache,
        )
    x_BxT, nfe = _denoise_block(d, key, valid_BxT, prompt_BxT, cache, block_start, x_BxT, nfe)
    return _fill_ends(d, x_BxT), cache, block + 1, nfe


def _decoding(
    model: BlockModel, prompt_len: int, settings: SampleSettings, ids: SpecialIds, cache: bool
) -> _Decoding:
    """The static settings of a call with a prompt of `prompt_len` tokens."""
    s, b = settings, model.block_size
    stop_ids = tuple(i for i in (ids.eos_id, ids.eot_id) if i >= 0)
    return _Decoding(
        model=model,
        cache=cache,
        rule=sampling.StepRule.of(s, ids),
        prompt_len=max(1, -(-prompt_len // b)) * b,
        gen_length=s.gen_length,
        stop_ids=stop_ids,
        fill_id=stop_ids[0] if stop_ids else ids.mask_id,  # no stop id: never filled
    )


def generate_blocks(
    model: BlockModel,
    prompt_BxP: jax.Array,
    prompt_valid_BxP: jax.Array,
    key: jax.Array,
    settings: SampleSettings,
    ids: SpecialIds,
    cache: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples at most `settings.gen_length` tokens after each prompt, block by block (module
    docstring). Pure and jit-able (`model`, `settings`, `ids` and `cache` static).

    prompt_BxP: (B, P) int32, left-padded; prompt_valid_BxP: (B, P) bool, False on the pads.
    key: PRNG key (the Gumbel noise at temperature > 0, and "random" remasking).
    settings: its block_length must be the model's block_size (`block_settings`); gen_length
      is the cap; kv_cache is not read (`cache` says).
    ids: the mask id; the EOS and end-of-turn ids end a row (none: every row runs to the cap).
    cache: the exact K/V cache; False recomputes the whole canvas at every step.
    Returns (canvas (B, P + gen_length) int32: the prompt unchanged, then the generated tokens,
    EOS after a row's end; nfe: int32 scalar, the denoising steps run; lengths (B,) int32: each
    row's generated tokens before its first EOS or end-of-turn, gen_length without one).
    """
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    prompt_valid_BxP = jnp.asarray(prompt_valid_BxP, jnp.bool_)
    sampling.check_inputs(prompt_BxP, prompt_valid_BxP, settings, ids)
    if settings.block_length != model.block_size:
        raise ValueError(
            f"block_length={settings.block_length} is not the model's block size "
            f"{model.block_size}: pass block_settings(settings, {model.block_size})"
        )
    d = _decoding(model, prompt_BxP.shape[1], settings, ids, cache)
    x_BxT, valid_BxT = sampling.initial_canvas(
        *_align(prompt_BxP, prompt_valid_BxP, d.prompt_len), d.gen_length, d.rule.mask_id
    )
    prompt_BxT = x_BxT != d.rule.mask_id  # the prompt region's non-mask positions (CFG masks them)
    kv = _prompt_cache(d, x_BxT, valid_BxT, prompt_BxT) if cache else None

    def unfinished(state: tuple[jax.Array, KVCache | None, jax.Array, jax.Array]) -> jax.Array:
        """Another block: some row has not ended and blocks are left."""
        x_BxT, _, block, _ = state
        return (block < d.num_blocks) & ~jnp.all(_ends(d, x_BxT)[1])

    block_fn = functools.partial(_run_block, d, key, valid_BxT, prompt_BxT)
    state = (x_BxT, kv, jnp.int32(0), jnp.int32(0))
    x_BxT, _, _, nfe = jax.lax.while_loop(unfinished, block_fn, state)
    stop_BxT, stopped_B = _ends(d, x_BxT)
    first_B = jnp.argmax(stop_BxT, axis=-1).astype(jnp.int32) - d.prompt_len
    lengths_B = jnp.where(stopped_B, first_B, d.gen_length)
    return x_BxT[:, d.prompt_len - prompt_BxP.shape[1] :], nfe, lengths_B


def _align(
    prompt_BxP: jax.Array, prompt_valid_BxP: jax.Array, width: int
) -> tuple[jax.Array, jax.Array]:
    """The prompt left-padded to `width` columns: (ids (B, width) int32, valid (B, width) bool,
    False on the new pads, whose token is any: they are never attended to)."""
    pad = [(0, 0), (width - prompt_BxP.shape[1], 0)]
    return jnp.pad(prompt_BxP, pad), jnp.pad(prompt_valid_BxP, pad)

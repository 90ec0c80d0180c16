"""Likelihood under a masked-diffusion LM: Monte-Carlo upper bounds on the negative log-likelihood.

A request holds T target tokens (what is scored), optionally preceded or surrounded by a prompt
(conditioning, never masked). One Monte-Carlo sample of the bound:

  draw l ~ U{1..T}; mask exactly l of the T targets, uniformly without replacement;
  estimate = (T / l) * sum over the masked targets of -log p(x_i | the masked request)  [nats]

Its expectation is an upper bound on -log p(targets | prompt). It names no noise schedule, so it
compares models trained with any schedule on the same footing. With no prompt it is the bound on
the request's unconditional NLL; per token it reads in nats, or in bits after dividing by ln 2.

The n samples of a request are stratified over l: they take l_j = ((k + floor(j T / n)) mod T) + 1
for j = 0..n-1 with one k ~ U{0..T-1} per request, so each l_j is uniform on 1..T (the estimate
stays unbiased) while together they spread over 1..T evenly (its variance drops): each count
appears n / T times when T divides n. The masks are drawn from PRNG keys folded from (seed,
request id, sample index) and each position's offset in its request: a request's samples are
the same for every checkpoint and every run evaluated with the same seed (common random
numbers), wherever in a batch or a row the request lies.

Packing: a model row (length L) holds up to S requests ("slots"), each a contiguous segment with
its segment id 1..S (0: padding); attention stays within a segment (block-diagonal), and RoPE is
relative, so a request scores the same (to float rounding) alone or packed beside others. Each
slot has its own request id and sample index, and the scorer returns one sample per slot, (B, S).
S = 1 is the unpacked case (the evaluation job's rows). The output head and the log-softmax run
on K positions per row only (the row's masked targets, gathered: no other position is scored),
and so do the last layer's queries and MLP (`Transformer.hidden`'s positions).

A block-diffusion model (blocks of b tokens, each denoised given the clean blocks before it) is
scored by its own bound, the block NELBO: the sum over the request's blocks of the estimate above
within the block (l ~ U{1..T_k} of its T_k targets masked, weight T_k / l, stratified per block),
the earlier blocks clean. One model call scores every block: the row beside its clean copy, as
the model was trained. One request per row, its blocks counted from its first position. For
b = 1 every block's one target is always masked: the estimate is the exact autoregressive
log-likelihood, the same for every sample.

With classifier-free guidance (cfg_scale w > 0) each model call becomes
un + (w + 1) (cond - un), where un sees the row with its prompts masked too.

Documents longer than the context are scored in windows (`rolling_windows`): each window ends
with a chunk of new targets and fills the rest with the tokens before it as the prompt, so every
token is a target exactly once and the document's bound is the sum over its windows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import sharding
from llada_jax.guidance import guide, model_rows
from llada_jax.kernels.attention import Blocks

# (tokens (B, L) int32, valid (B, L) bool, segment ids (B, L) int32 or None (one segment per
# row), positions (B, K) int32) -> logits (B, K, V) of those positions of each row.
HeadLogitsFn = Callable[[jax.Array, jax.Array, jax.Array | None, jax.Array], jax.Array]


def stratified_mask_counts(
    key: jax.Array, row_id_B: jax.Array, sample_B: jax.Array, targets_B: jax.Array, n: int
) -> jax.Array:
    """l (B,) int32 in 1..T: sample `sample_B` of the `n` stratified draws of each request.

    The offset k ~ U{0..T-1} comes from `key` folded with the request id, so the n samples of a
    request share it wherever they are computed. Requests with T = 0 get l = 1 (they score
    nothing).
    """
    targets_B = jnp.maximum(targets_B, 1)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_id_B)
    k_B = jax.vmap(lambda kk, t: jax.random.randint(kk, (), 0, t))(row_keys, targets_B)
    offset_B = sample_B * targets_B // n
    return (k_B + offset_B) % targets_B + 1


def slot_of(segment_BxL: jax.Array, per_slot_BxS: jax.Array) -> jax.Array:
    """(B, L): each position's value of `per_slot_BxS` (B, S), that of the slot (segment id
    1..S) it lies in; padding (segment 0) reads slot 1's."""
    slot_BxL = jnp.clip(segment_BxL - 1, 0, per_slot_BxS.shape[1] - 1)
    return jnp.take_along_axis(per_slot_BxS, slot_BxL, axis=1)


def targets_per_slot(target_BxL: jax.Array, segment_BxL: jax.Array, num_slots: int) -> jax.Array:
    """(B, S) int32: each slot's number of targets, T (targets on padding belong to none)."""
    in_slot_BxLxS = segment_BxL[..., None] == jnp.arange(1, num_slots + 1)
    return jnp.sum(target_BxL[..., None] & in_slot_BxLxS, axis=1, dtype=jnp.int32)


def offset_scores(
    key: jax.Array, row_id_BxL: jax.Array, sample_BxL: jax.Array, offset_BxL: jax.Array
) -> jax.Array:
    """(B, L) float32 uniform scores in [0, 1), independent: that of offset i (counted from its
    request's first position) of sample s of request r draws from `key` folded with r, s + 1
    (not its stratification key's) and i."""

    def score(r: jax.Array, s: jax.Array, i: jax.Array) -> jax.Array:
        """The uniform score of offset i of sample s of request r."""
        sample_key = jax.random.fold_in(jax.random.fold_in(key, r), s + 1)
        return jax.random.uniform(jax.random.fold_in(sample_key, i))

    return jax.vmap(jax.vmap(score))(row_id_BxL, sample_BxL, offset_BxL)


def position_scores(
    key: jax.Array, segment_BxL: jax.Array, row_id_BxS: jax.Array, sample_BxS: jax.Array
) -> jax.Array:
    """(B, L) float32 `offset_scores` of each position of a row, its offset counted from the
    first position of its slot: a request's scores are the same at any offset in any row, and
    padding it to another length changes none of them."""
    one_hot_BxLxS = segment_BxL[..., None] == jnp.arange(1, row_id_BxS.shape[1] + 1)
    start_BxS = jnp.argmax(one_hot_BxLxS, axis=1).astype(jnp.int32)
    offset_BxL = jnp.arange(segment_BxL.shape[1]) - slot_of(segment_BxL, start_BxS)
    row_BxL, sample_BxL = slot_of(segment_BxL, row_id_BxS), slot_of(segment_BxL, sample_BxS)
    return offset_scores(key, row_BxL, sample_BxL, offset_BxL)


def mask_lowest(
    score_BxL: jax.Array, target_BxL: jax.Array, segment_BxL: jax.Array, l_BxS: jax.Array
) -> jax.Array:
    """(B, L) bool: in each slot (segment id 1..S), its `l_BxS` targets of the lowest scores
    (ties: the earlier position). Each slot's l targets are thus uniform without replacement;
    targets on padding (segment 0) are never masked."""
    num_slots = l_BxS.shape[1]
    target_BxL = target_BxL & (segment_BxL > 0)
    group_BxL = jnp.where(target_BxL, segment_BxL, num_slots + 1)  # non-targets sort last
    order_BxL = jnp.lexsort((score_BxL, group_BxL), axis=-1)
    rank_BxL = jnp.argsort(order_BxL, axis=-1)  # rank in (slot, score) order
    targets_BxS = targets_per_slot(target_BxL, segment_BxL, num_slots)
    first_rank_BxS = jnp.cumsum(targets_BxS, axis=1) - targets_BxS  # targets of earlier slots
    rank_in_slot_BxL = rank_BxL - slot_of(segment_BxL, first_rank_BxS)
    return target_BxL & (rank_in_slot_BxL < slot_of(segment_BxL, l_BxS))


def draw_masks(
    key: jax.Array,
    target_BxL: jax.Array,
    segment_BxL: jax.Array,
    row_id_BxS: jax.Array,
    sample_BxS: jax.Array,
    n: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The masks of sample `sample_BxS[b, s]` (of `n`) of request `row_id_BxS[b, s]`, the
    request in slot s (segment id s + 1) of row b: (masked (B, L) bool, exactly l of each slot's
    `target_BxL` positions; l (B, S) int32 the counts, stratified over a request's n samples;
    targets (B, S) int32 each slot's T). A function of (key, request id, sample) and the slot's
    target positions counted from its first position only."""
    targets_BxS = targets_per_slot(target_BxL, segment_BxL, row_id_BxS.shape[1])
    l_BxS = stratified_mask_counts(
        key, row_id_BxS.ravel(), sample_BxS.ravel(), targets_BxS.ravel(), n
    ).reshape(targets_BxS.shape)
    score_BxL = position_scores(key, segment_BxL, row_id_BxS, sample_BxS)
    return mask_lowest(score_BxL, target_BxL, segment_BxL, l_BxS), l_BxS, targets_BxS


def target_masks(
    key: jax.Array,
    prompt_B: jax.Array,
    targets_B: jax.Array,
    row_id_B: jax.Array,
    sample_B: jax.Array,
    n: int,
    width: int,
) -> jax.Array:
    """(B, W) bool: `draw_masks`'s mask of the targets alone of sample `sample_B` (of `n`) of
    request `row_id_B`, whose T = `targets_B` targets follow its P = `prompt_B` prompt
    positions: column t is target t (offset P + t in the request); columns t >= T are False.
    W = `width` >= every T. Its cost is that of the targets, not of the whole request."""
    columns_BxW = jnp.broadcast_to(jnp.arange(width), (prompt_B.shape[0], width))
    target_BxW = columns_BxW < targets_B[:, None]
    l_B = stratified_mask_counts(key, row_id_B, sample_B, targets_B, n)
    score_BxW = offset_scores(
        key,
        jnp.broadcast_to(row_id_B[:, None], columns_BxW.shape),
        jnp.broadcast_to(sample_B[:, None], columns_BxW.shape),
        prompt_B[:, None] + columns_BxW,
    )
    return mask_lowest(score_BxW, target_BxW, target_BxW.astype(jnp.int32), l_B[:, None])


def draw_block_masks(
    key: jax.Array,
    target_BxL: jax.Array,
    valid_BxL: jax.Array,
    row_id_B: jax.Array,
    sample_B: jax.Array,
    n: int,
    block_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The masks of a block-diffusion model's bound, one request per row from position 0:
    each block of `block_size` positions (group g + 1 for block g) masks exactly l of its own
    targets, l stratified over the request's n samples per block (its own offset, drawn from
    `key` folded with g). -> (masked (B, L) bool, l (B, G) int32, targets (B, G) int32 each
    block's T, group (B, L) int32 each position's block + 1, 0 on padding)."""
    num_blocks = -(-target_BxL.shape[1] // block_size)  # the last one may be short
    group_BxL = jnp.where(valid_BxL, jnp.arange(target_BxL.shape[1]) // block_size + 1, 0)
    targets_BxG = targets_per_slot(target_BxL, group_BxL, num_blocks)
    block_keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(num_blocks))
    l_GxB = jax.vmap(lambda k, t: stratified_mask_counts(k, row_id_B, sample_B, t, n))(
        block_keys, targets_BxG.T
    )
    score_BxL = position_scores(
        key, valid_BxL.astype(jnp.int32), row_id_B[:, None], sample_B[:, None]
    )
    masked_BxL = mask_lowest(score_BxL, target_BxL, group_BxL, l_GxB.T)
    return masked_BxL, l_GxB.T, targets_BxG, group_BxL


def head_positions(chosen_BxL: jax.Array, k: int) -> jax.Array:
    """(B, K) int32: each row's chosen positions in order, then its other positions, the first
    `k` of them: every chosen one when a row holds at most k."""
    return jnp.argsort(~chosen_BxL, axis=-1, stable=True)[:, :k].astype(jnp.int32)


def nll_samples(
    logits_fn: HeadLogitsFn,
    tokens_BxL: jax.Array,
    target_BxL: jax.Array,
    segment_BxL: jax.Array,
    row_id_BxS: jax.Array,
    sample_BxS: jax.Array,
    key: jax.Array,
    *,
    num_samples: int,
    mask_id: int,
    cfg_scale: float = 0.0,
    num_head_positions: int = 0,
    block_size: int = 0,
    alternatives_BxSxC: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One Monte-Carlo sample of the NLL bound per slot: (B, S) float32 nats.

    Slot s of row b (the positions of segment id s + 1) is sample `sample_BxS[b, s]` (of
    `num_samples`) of request `row_id_BxS[b, s]`; the same (request id, sample) pair draws the
    same mask in any batch, row and slot. Positions of a slot that are not targets are its
    prompt (never masked); segment 0 is padding. Slots with no target score 0.

    logits_fn: see `HeadLogitsFn`; it gets segment ids None when S = 1.
    tokens_BxL: (B, L) int32 clean tokens.
    target_BxL: (B, L) bool, the positions scored (those in a slot only).
    segment_BxL: (B, L) int32 slot of each position, 1..S, 0 for padding.
    row_id_BxS, sample_BxS: (B, S) int32, each slot's request id and its sample index
      (0..num_samples-1); those of an empty slot are arbitrary.
    key: the estimator's PRNG key (its seed).
    num_samples: samples per request (the stratification's n), static.
    mask_id: the mask token id, static.
    cfg_scale: classifier-free guidance weight w (0: none), static.
    num_head_positions: K (static), the positions per row the output head runs on: at least
      every row's number of masked targets (the caller lays rows out so: a slot's sample masks
      `stratified_mask_counts` targets); 0: L, every position.
    block_size: b > 0 for a block-diffusion model (static): the block bound (module
      docstring), one request per row (S = 1) from position 0; logits_fn then gets each row
      followed by its clean copy, (R, 2L), and the positions of the first half.
    alternatives_BxSxC: (B, S, C) int32 token ids, or None. Given, the result is (the samples,
      (B, S, C) float32 the log-probability of each id at the slot's masked targets, summed):
      for a slot of one target, which every sample masks, log p(id | the slot's masked input),
      the score of any request that differs from the slot's in that token alone.
    """
    num_slots = row_id_BxS.shape[1]
    valid_BxL = segment_BxL > 0
    target_BxL = target_BxL & valid_BxL
    if block_size:
        if num_slots != 1:
            raise ValueError("a block-diffusion model's bound scores one request per row")
        masked_BxL, l_BxG, targets_BxG, group_BxL = draw_block_masks(
            key, target_BxL, valid_BxL, row_id_BxS[:, 0], sample_BxS[:, 0], num_samples, block_size
        )
    else:
        masked_BxL, l_BxG, targets_BxG = draw_masks(
            key, target_BxL, segment_BxL, row_id_BxS, sample_BxS, num_samples
        )
        group_BxL = segment_BxL
    noisy_BxL = jnp.where(masked_BxL, mask_id, tokens_BxL)
    prompt_BxL = valid_BxL & ~target_BxL
    model_tokens, model_valid = model_rows(noisy_BxL, valid_BxL, prompt_BxL, mask_id, cfg_scale)
    if block_size:  # beside each row its clean copy (its prompt masked too in CFG's rows)
        clean_tokens, _ = model_rows(tokens_BxL, valid_BxL, prompt_BxL, mask_id, cfg_scale)
        model_tokens = jnp.concatenate([model_tokens, clean_tokens], axis=1)
        model_valid = jnp.concatenate([model_valid, model_valid], axis=1)
    positions_BxK = head_positions(masked_BxL, num_head_positions or tokens_BxL.shape[1])
    copies = 1 if cfg_scale == 0 else 2  # the guided call's rows: conditional, unconditional
    segments = None if num_slots == 1 else jnp.tile(segment_BxL, (copies, 1))
    logits_BxKxV = logits_fn(
        model_tokens, model_valid, segments, jnp.tile(positions_BxK, (copies, 1))
    )
    if cfg_scale > 0:
        logits_BxKxV = guide(logits_BxKxV, cfg_scale)
    logp_BxKxV = jax.nn.log_softmax(logits_BxKxV.astype(jnp.float32), axis=-1)
    tokens_BxK = jnp.take_along_axis(tokens_BxL, positions_BxK, axis=1)
    token_logp_BxK = jnp.take_along_axis(logp_BxKxV, tokens_BxK[..., None], axis=-1)[..., 0]
    # Each masked target's -log p weighted by T / l of its group (its slot, or its block).
    weight_BxG = jnp.where(targets_BxG > 0, targets_BxG / l_BxG, 0.0)
    weight_BxL = jnp.where(masked_BxL, slot_of(group_BxL, weight_BxG), 0.0)
    weight_BxK = jnp.take_along_axis(weight_BxL, positions_BxK, axis=1)
    segment_BxK = jnp.take_along_axis(segment_BxL, positions_BxK, axis=1)
    in_slot_BxKxS = segment_BxK[..., None] == jnp.arange(1, num_slots + 1)
    nll_BxK = -token_logp_BxK * weight_BxK
    nll_BxS = jnp.sum(jnp.where(in_slot_BxKxS, nll_BxK[..., None], 0.0), axis=1)
    if alternatives_BxSxC is None:
        return nll_BxS
    masked_BxK = jnp.take_along_axis(masked_BxL, positions_BxK, axis=1)
    alternative_BxKxC = jnp.take_along_axis(
        alternatives_BxSxC, jnp.clip(segment_BxK - 1, 0, num_slots - 1)[..., None], axis=1
    )
    alternative_logp_BxKxC = jnp.take_along_axis(logp_BxKxV, alternative_BxKxC, axis=-1)
    at_slot_BxKxS = in_slot_BxKxS & masked_BxK[..., None]
    return nll_BxS, jnp.einsum(
        "bks,bkc->bsc", at_slot_BxKxS.astype(jnp.float32), alternative_logp_BxKxC
    )


def make_scorer(
    graphdef: nnx.GraphDef,
    mesh: jax.sharding.Mesh,
    *,
    mask_id: int,
    num_samples: int,
    seed: int,
    cfg_scale: float = 0.0,
    num_head_positions: int = 0,
    block_size: int = 0,
    alternatives: bool = False,
) -> sharding.OnMesh:
    """`nll_samples` of the model `graphdef`, jitted on `mesh` with the batch split over its
    data-parallel axes: (params, tokens (B, L) int32, target (B, L) bool, segment (B, L) int32,
    row_id (B, S) int32, sample (B, S) int32) -> (B, S) float32 nats, the masks drawn from
    `jax.random.key(seed)`; one compile per (B, L, S) shape. The scorer of the evaluation job
    (S = 1, every position a target) and of the lm-eval model (each slot's continuation the
    targets, its context the prompt). The output head and the log-softmax run on
    `num_head_positions` positions per row (0: every position), which must hold every masked
    target.
    block_size > 0: the block bound of a block-diffusion model (`nll_samples`).
    alternatives: the function takes one more argument, alternatives (B, S, C) int32, and
    returns (the samples, (B, S, C) their log-probabilities: `nll_samples`)."""
    key = jax.random.key(seed)
    blocks = Blocks(block_size, clean_copy=True) if block_size else None

    def score(params, tokens_BxL, target_BxL, segment_BxL, row_id_BxS, sample_BxS, *alternatives):
        """One bound sample per slot of the model with `params`: (B, S) float32 nats (and the
        alternatives' log-probabilities, when given)."""
        model = nnx.merge(graphdef, params)

        def logits_fn(
            tokens: jax.Array, valid: jax.Array, segments: jax.Array | None, positions: jax.Array
        ) -> jax.Array:
            """Logits (B, K, V) of the positions (B, K) of each row; with K < L the last
            layer's queries and MLP run on those positions alone."""
            if positions.shape[1] < tokens.shape[1]:
                rows_BxKxD, _ = model.hidden(
                    tokens, valid, segments, blocks=blocks, positions=positions
                )
            else:
                hidden_BxLxD, _ = model.hidden(tokens, valid, segments, blocks=blocks)
                rows_BxKxD = jnp.take_along_axis(hidden_BxLxD, positions[..., None], axis=1)
            return model.head(rows_BxKxD)

        return nll_samples(
            logits_fn,
            tokens_BxL,
            target_BxL,
            segment_BxL,
            row_id_BxS,
            sample_BxS,
            key,
            num_samples=num_samples,
            mask_id=mask_id,
            cfg_scale=cfg_scale,
            num_head_positions=num_head_positions,
            block_size=block_size,
            alternatives_BxSxC=alternatives[0] if alternatives else None,
        )

    batch = sharding.batch_sharding(mesh)
    inputs = 6 if alternatives else 5
    return sharding.jit_on_mesh(score, mesh, in_shardings=(None,) + (batch,) * inputs)


# --------------------------------------------------------------------------------------------
# Host side: windows of long documents, and the estimate with its standard error
# --------------------------------------------------------------------------------------------
def rolling_windows(
    ids: Sequence[int], max_len: int, context_len: int, num_prefix: int = 0
) -> list[tuple[list, int]]:
    """A document as (window ids, number of targets at its end) pairs covering every token once.

    The first `num_prefix` ids are context only (e.g. an EOS that opens the document). The first
    window scores the rest of the first `max_len` ids; each later one scores the next
    `max_len - context_len` ids, preceded by as many earlier ids as fit in `max_len` (at least
    `context_len`).
    """
    if not 0 <= context_len < max_len or not 0 <= num_prefix < max_len:
        raise ValueError(
            f"context_len={context_len} and num_prefix={num_prefix} must be in [0, "
            f"max_len={max_len})"
        )
    end = min(len(ids), max_len)
    windows = [(list(ids[:end]), end - num_prefix)] if end > num_prefix else []
    while end < len(ids):
        new_end = min(len(ids), end + max_len - context_len)
        windows.append((list(ids[max(0, new_end - max_len) : new_end]), new_end - end))
        end = new_end
    return windows


def first_equal_rows(masks_NxW: np.ndarray) -> np.ndarray:
    """(N,) int: for each row of `masks_NxW`, the index of the first row equal to it."""
    _, first, inverse = np.unique(masks_NxW, axis=0, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo NLL bound over some rows, with its standard error."""

    nll: float  # nats, summed over the rows (the mean of each row's samples, summed)
    stderr: float  # nats, standard error of `nll`
    tokens: int  # target tokens scored

    @property
    def nll_per_token(self) -> float:
        """The bound per target token, nats."""
        return self.nll / self.tokens

    @property
    def stderr_per_token(self) -> float:
        """Standard error of `nll_per_token`, nats per token."""
        return self.stderr / self.tokens

    @property
    def bits_per_token(self) -> float:
        """The bound per target token, bits (`nll_per_token` / ln 2)."""
        return self.nll_per_token / math.log(2)

    @property
    def bits_stderr_per_token(self) -> float:
        """Standard error of `bits_per_token`, bits per token."""
        return self.stderr_per_token / math.log(2)


def estimate(samples_RxN: np.ndarray, tokens: int) -> Estimate:
    """The bound from `samples_RxN` (R rows, N samples each, nats) over `tokens` targets.

    Each row's mean is unbiased for its bound; rows are independent, so the variance of the sum
    is the sum of each row's sample variance / N (ddof 1; zero when N = 1, where nothing
    measures it). The variance is that of independent samples: stratification only lowers it, so
    the error reported errs on the safe side.
    """
    samples_RxN = np.asarray(samples_RxN, np.float64)
    n = samples_RxN.shape[1]
    var = samples_RxN.var(axis=1, ddof=1).sum() / n if n > 1 else 0.0
    return Estimate(float(samples_RxN.mean(axis=1).sum()), float(np.sqrt(var)), int(tokens))

"""Likelihood under a masked-diffusion LM: Monte-Carlo upper bounds on the negative log-likelihood.

A row holds T target tokens (what is scored), optionally preceded or surrounded by a prompt
(conditioning, never masked) and padding (key-masked). One Monte-Carlo sample of the bound:

  draw l ~ U{1..T}; mask exactly l of the T targets, uniformly without replacement;
  estimate = (T / l) * sum over the masked targets of -log p(x_i | the masked row)     [nats]

Its expectation is an upper bound on -log p(targets | prompt). It names no noise schedule, so it
compares models trained with any schedule on the same footing. With no prompt it is the bound on
the row's unconditional NLL; per token it reads in nats, or in bits after dividing by ln 2.

The n samples of a row are stratified over l: they take l_j = ((k + floor(j T / n)) mod T) + 1
for j = 0..n-1 with one k ~ U{0..T-1} per row, so each l_j is uniform on 1..T (the estimate
stays unbiased) while together they spread over 1..T evenly (its variance drops): each count
appears n / T times when T divides n. The masks are
drawn from PRNG keys folded from (seed, row id, sample index): a row's samples are the same for
every checkpoint and every run evaluated with the same seed (common random numbers).

With classifier-free guidance (cfg_scale w > 0) each model call becomes
un + (w + 1) (cond - un), where un sees the row with its prompt masked too.

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
from llada_jax.guidance import LogitsFn, guide, model_rows

# (tokens (B, L) int32, valid (B, L) bool, start (B,) int32) -> logits (B, W, V) of positions
# start .. start + W - 1 of each row.
WindowLogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def stratified_mask_counts(
    key: jax.Array, row_id_B: jax.Array, sample_B: jax.Array, targets_B: jax.Array, n: int
) -> jax.Array:
    """l (B,) int32 in 1..T: sample `sample_B` of the `n` stratified draws of each row.

    The offset k ~ U{0..T-1} comes from `key` folded with the row id, so the n samples of a row
    share it wherever they are computed. Rows with T = 0 get l = 1 (they score nothing).
    """
    targets_B = jnp.maximum(targets_B, 1)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_id_B)
    k_B = jax.vmap(lambda kk, t: jax.random.randint(kk, (), 0, t))(row_keys, targets_B)
    offset_B = sample_B * targets_B // n
    return (k_B + offset_B) % targets_B + 1


def mask_exactly(key_B: jax.Array, target_BxL: jax.Array, l_B: jax.Array) -> jax.Array:
    """(B, L) bool: `l_B[b]` of row b's target positions, uniformly without replacement.

    key_B: (B,) PRNG keys, one per row. The targets are ranked by an independent uniform score
    each, drawn from the row's key folded with the position, so padding a row to another length
    changes none of its draws; the l lowest ranks are masked.
    """
    positions = jnp.arange(target_BxL.shape[1])

    def scores(k: jax.Array) -> jax.Array:
        """(L,) float32 uniform scores in [0, 1), position i's drawn from `k` folded with i."""
        return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k, i)))(positions)

    score_BxL = jax.vmap(scores)(key_B)
    score_BxL = jnp.where(target_BxL, score_BxL, jnp.inf)
    rank_BxL = jnp.argsort(jnp.argsort(score_BxL, axis=-1), axis=-1)
    return target_BxL & (rank_BxL < l_B[:, None])


def draw_masks(
    key: jax.Array, target_BxL: jax.Array, row_id_B: jax.Array, sample_B: jax.Array, n: int
) -> tuple[jax.Array, jax.Array]:
    """The mask of sample `sample_B[b]` (of `n`) of row `row_id_B[b]`: (masked (B, L) bool,
    l (B,) int32 its count), exactly l of the row's `target_BxL` positions, l stratified over
    the row's n samples. A function of (key, row id, sample) and the targets only."""
    targets_B = jnp.sum(target_BxL, axis=-1)
    l_B = stratified_mask_counts(key, row_id_B, sample_B, targets_B, n)
    sample_keys = jax.vmap(
        lambda r, s: jax.random.fold_in(jax.random.fold_in(key, r), s + 1)  # s + 1: not k's key
    )(row_id_B, sample_B)
    return mask_exactly(sample_keys, target_BxL, l_B), l_B


def nll_samples(
    logits_fn: LogitsFn | WindowLogitsFn,
    tokens_BxL: jax.Array,
    target_BxL: jax.Array,
    valid_BxL: jax.Array,
    row_id_B: jax.Array,
    sample_B: jax.Array,
    key: jax.Array,
    *,
    num_samples: int,
    mask_id: int,
    cfg_scale: float = 0.0,
    window: int = 0,
) -> jax.Array:
    """One Monte-Carlo sample of the NLL bound per row: (B,) float32 nats.

    Row b is sample `sample_B[b]` (of `num_samples`) of row `row_id_B[b]`; the same
    (row id, sample) pair draws the same mask in any batch. Positions that are valid and not
    targets are the prompt (never masked); invalid positions are padding. Rows with no target
    score 0.

    logits_fn: (tokens (B, L) int32, valid (B, L) bool) -> logits (B, L, V); with `window`,
      (tokens, valid, start (B,) int32) -> logits (B, window, V) of the positions start ..
      start + window - 1 of each row (the output head runs there only).
    tokens_BxL: (B, L) int32 clean tokens.
    target_BxL: (B, L) bool, the positions scored (valid ones only).
    valid_BxL: (B, L) bool key-padding mask.
    row_id_B, sample_B: (B,) int32, each row's id and its sample index (0..num_samples-1).
    key: the estimator's PRNG key (its seed).
    num_samples: samples per row (the stratification's n), static.
    mask_id: the mask token id, static.
    cfg_scale: classifier-free guidance weight w (0: none), static.
    window: 0, or a width (static) that holds every row's targets from its first one on (the
      caller lays rows out so; a window starting at the first target is moved left to fit).
    """
    target_BxL = target_BxL & valid_BxL
    masked_BxL, l_B = draw_masks(key, target_BxL, row_id_B, sample_B, num_samples)
    targets_B = jnp.sum(target_BxL, axis=-1)
    noisy_BxL = jnp.where(masked_BxL, mask_id, tokens_BxL)
    prompt_BxL = valid_BxL & ~target_BxL
    model_tokens, model_valid = model_rows(noisy_BxL, valid_BxL, prompt_BxL, mask_id, cfg_scale)
    if window:
        length = tokens_BxL.shape[1]
        start_B = jnp.clip(jnp.argmax(target_BxL, axis=-1), 0, length - window).astype(jnp.int32)
        starts = start_B if cfg_scale == 0 else jnp.concatenate([start_B, start_B])
        logits_BxWxV = logits_fn(model_tokens, model_valid, starts)
        positions_BxW = start_B[:, None] + jnp.arange(window, dtype=jnp.int32)
        tokens_BxL = jnp.take_along_axis(tokens_BxL, positions_BxW, axis=1)
        masked_BxL = jnp.take_along_axis(masked_BxL, positions_BxW, axis=1)
    else:
        logits_BxWxV = logits_fn(model_tokens, model_valid)
    if cfg_scale > 0:
        logits_BxWxV = guide(logits_BxWxV, cfg_scale)
    logp_BxWxV = jax.nn.log_softmax(logits_BxWxV.astype(jnp.float32), axis=-1)
    token_logp_BxW = jnp.take_along_axis(logp_BxWxV, tokens_BxL[..., None], axis=-1)[..., 0]
    masked_nll_B = -jnp.sum(jnp.where(masked_BxL, token_logp_BxW, 0.0), axis=-1)
    return jnp.where(targets_B > 0, masked_nll_B * targets_B / l_B, 0.0)


def make_scorer(
    graphdef: nnx.GraphDef,
    mesh: jax.sharding.Mesh,
    *,
    mask_id: int,
    num_samples: int,
    seed: int,
    cfg_scale: float = 0.0,
    window: int = 0,
) -> sharding.OnMesh:
    """`nll_samples` of the model `graphdef`, jitted on `mesh` with the batch split over its
    data-parallel axes: (params, tokens (B, L) int32, target (B, L) bool, valid (B, L) bool,
    row_id (B,) int32, sample (B,) int32) -> (B,) float32 nats, the masks drawn from
    `jax.random.key(seed)`. The scorer of the evaluation job (every valid position a target)
    and of the lm-eval model (the continuation the targets, the context the prompt). With
    `window`, the output head and the log-softmax run on `window` positions per row from its
    first target (every target must lie there)."""
    key = jax.random.key(seed)

    def score(params, tokens_BxL, target_BxL, valid_BxL, row_id_B, sample_B):
        """One bound sample per row of the model with `params`: (B,) float32 nats."""
        model = nnx.merge(graphdef, params)

        def logits_fn(tokens: jax.Array, valid: jax.Array) -> jax.Array:
            """The model's logits (B, L, V) on tokens (B, L) int32 with valid (B, L) bool."""
            return model(tokens, valid)

        def window_logits_fn(tokens: jax.Array, valid: jax.Array, start: jax.Array) -> jax.Array:
            """Logits (B, window, V) of positions start .. start + window - 1 of each row."""
            hidden_BxLxD, _ = model.hidden(tokens, valid)
            positions_BxW = start[:, None] + jnp.arange(window, dtype=jnp.int32)
            rows_BxWxD = jnp.take_along_axis(hidden_BxLxD, positions_BxW[..., None], axis=1)
            return model.head(rows_BxWxD)

        return nll_samples(
            window_logits_fn if window else logits_fn,
            tokens_BxL,
            target_BxL,
            valid_BxL,
            row_id_B,
            sample_B,
            key,
            num_samples=num_samples,
            mask_id=mask_id,
            cfg_scale=cfg_scale,
            window=window,
        )

    batch = sharding.batch_sharding(mesh)
    return sharding.jit_on_mesh(score, mesh, in_shardings=(None,) + (batch,) * 5)


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

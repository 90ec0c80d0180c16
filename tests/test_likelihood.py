"""The likelihood estimators against exact enumeration over every mask of a toy model."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import likelihood

V = 3  # token ids 0..2; the mask is id 3
MASK = V
L = 5


@pytest.fixture(scope="module")
def toy():
    """A toy bidirectional 'model': logits_i = sum over valid j of W[i, j, token_j], in jax and
    numpy. Every position sees every other, so the masked context matters."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(L, L, V + 1, V + 1)).astype(np.float32)

    def logits_jax(tokens, valid):
        onehot = jax.nn.one_hot(tokens, V + 1) * valid[..., None]
        return jnp.einsum("bjt,ijtv->biv", onehot, jnp.asarray(w))

    def logits_np(tokens, valid):  # (L,), (L,) -> (L, V + 1)
        return sum(w[:, j, tokens[j]] for j in range(L) if valid[j])

    return logits_jax, logits_np


def head(logits_fn):
    """A `likelihood.HeadLogitsFn` of a full-logits (tokens, valid) -> (B, L, V) function: the
    logits of the positions asked for, gathered (the toy sees no segments)."""

    def at(tokens, valid, segments, positions):
        return jnp.take_along_axis(logits_fn(tokens, valid), positions[..., None], axis=1)

    return at


def unpacked(tokens, target, valid, row_id, sample):
    """nll_samples' arguments for one request per row (S = 1) given as (B, L) rows."""
    return (
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(target, bool),
        jnp.asarray(valid, jnp.int32),  # segment 1, padding 0
        jnp.asarray(row_id, jnp.int32)[:, None],
        jnp.asarray(sample, jnp.int32)[:, None],
    )


def exact_bound(logits_np, tokens, target, valid, cfg_scale=0.0):
    """E over l ~ U{1..T} and every l-subset of the targets of (T / l) sum -log p, enumerated."""
    idx = [i for i in range(L) if target[i] and valid[i]]
    t = len(idx)
    prompt = [valid[i] and not target[i] for i in range(L)]
    total = 0.0
    for count in range(1, t + 1):
        subsets = list(itertools.combinations(idx, count))
        for s in subsets:
            x = np.array(tokens)
            x[list(s)] = MASK
            logits = logits_np(x, valid)
            if cfg_scale:
                un = logits_np(np.where(prompt, MASK, x), valid)
                logits = un + (cfg_scale + 1) * (logits - un)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll = -sum(logp[i, tokens[i]] for i in s)
            total += (1 / t) * (1 / len(subsets)) * (t / count) * nll
    return total


ROWS = [  # tokens, target, valid
    ([0, 1, 2, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]),  # unconditional
    ([2, 2, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]),  # prompt of 2, 3 targets
    ([1, 0, 2, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]),  # prompt of 1, 2 targets, 2 pads
]


@pytest.fixture(scope="module")
def estimator(toy):
    logits_jax, _ = toy

    def run(num_samples, cfg_scale, seed=0):
        tokens, target, valid = (np.array([r[i] for r in ROWS]) for i in range(3))
        rows = len(ROWS)
        row_id = np.repeat(np.arange(rows), num_samples)
        sample = np.tile(np.arange(num_samples), rows)
        fn = jax.jit(
            lambda *a: likelihood.nll_samples(
                head(logits_jax), *a, num_samples=num_samples, mask_id=MASK, cfg_scale=cfg_scale
            )
        )
        args = unpacked(tokens[row_id], target[row_id], valid[row_id], row_id, sample)
        out = fn(*args, jax.random.key(seed))
        return np.asarray(out).reshape(rows, num_samples)

    return run


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_estimator_is_unbiased_against_exact_enumeration(toy, estimator, cfg_scale):
    _, logits_np = toy
    n = 4000
    samples = estimator(n, cfg_scale)
    for r, (tokens, target, valid) in enumerate(ROWS):
        exact = exact_bound(logits_np, tokens, target, valid, cfg_scale)
        est = likelihood.estimate(samples[r : r + 1], sum(t and v for t, v in zip(target, valid)))
        assert est.stderr > 0
        assert abs(est.nll - exact) < 4 * est.stderr, (r, est.nll, exact, est.stderr)
        # the error is small enough for the check to mean something
        assert est.stderr < 0.05 * exact


def test_stratified_counts_cover_every_mask_count_evenly():
    key = jax.random.key(3)
    for t, n in [(5, 5), (5, 10), (7, 7), (4, 12)]:
        for row in range(6):
            counts_drawn = likelihood.stratified_mask_counts(
                key,
                jnp.full((n,), row, jnp.int32),
                jnp.arange(n, dtype=jnp.int32),
                jnp.full((n,), t, jnp.int32),
                n,
            )
            counts = np.bincount(np.asarray(counts_drawn), minlength=t + 1)[1:]
            assert counts.tolist() == [n // t] * t, (t, n, row, counts)


def test_masks_exactly_l_targets_of_each_slot_and_never_the_prompt_or_pads():
    # Slots 1, 2, 3 of 3, 2 and 3 targets (prompts before them), then padding.
    segment = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0]] * 4)
    target = np.array([[0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]] * 4, bool)
    count = np.array([[1, 1, 1], [2, 2, 3], [3, 1, 2], [3, 2, 3]])
    score = np.asarray(jax.random.uniform(jax.random.key(0), target.shape))
    mask = np.asarray(
        likelihood.mask_lowest(
            jnp.asarray(score), jnp.asarray(target), jnp.asarray(segment), jnp.asarray(count)
        )
    )
    assert not (mask & ~(target & (segment > 0))).any()
    for s in range(3):
        in_slot = target & (segment == s + 1)
        assert (mask & in_slot).sum(1).tolist() == count[:, s].tolist()
        # the masked ones are the slot's lowest-scored targets
        worst_masked = np.where(mask & in_slot, score, -1).max(1)
        best_kept = np.where(in_slot & ~mask, score, 2).min(1)
        assert (worst_masked < best_kept).all()


def test_a_request_draws_the_same_mask_at_any_offset_of_a_packed_row():
    """Request 11 (sample 2) alone at position 0 of a 5-wide row, and in slot 2 of a packed row
    at offset 4 beside request 7 (sample 0): the same mask, shifted, and the same count."""
    key = jax.random.key(9)
    alone_target = np.array([[0, 1, 1, 1, 1]], bool)
    alone = likelihood.draw_masks(
        key,
        jnp.asarray(alone_target),
        jnp.asarray([[1, 1, 1, 1, 1]]),
        jnp.asarray([[11]]),
        jnp.asarray([[2]]),
        8,
    )
    packed_target = np.array([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0]], bool)
    packed = likelihood.draw_masks(
        key,
        jnp.asarray(packed_target),
        jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]]),
        jnp.asarray([[7, 11]]),
        jnp.asarray([[0, 2]]),
        8,
    )
    np.testing.assert_array_equal(np.asarray(packed[0])[0, 4:9], np.asarray(alone[0])[0])
    assert int(packed[1][0, 1]) == int(alone[1][0, 0]) and packed[2].tolist() == [[3, 4]]
    assert np.asarray(packed[0])[0, :4].sum() == int(packed[1][0, 0])


def test_the_targets_alone_draw_the_masks_of_the_whole_request():
    """`target_masks` (the targets' columns only) against `draw_masks` on whole rows: requests
    of prompts 0 to 5 and 1 to 6 targets, 12 samples each, the same masks."""
    key, n, width, length = jax.random.key(4), 12, 8, 11
    cases = [(p, t, 50 + 7 * p + t) for p in range(6) for t in range(1, 7)]
    prompt, targets, row_id = (np.repeat([c[k] for c in cases], n) for k in range(3))
    sample = np.tile(np.arange(n), len(cases))
    target = np.zeros((len(prompt), length), bool)
    for b, (p, t) in enumerate(zip(prompt, targets)):
        target[b, p : p + t] = True
    whole = np.asarray(
        likelihood.draw_masks(
            key,
            jnp.asarray(target),
            jnp.asarray((np.arange(length) < (prompt + targets)[:, None]).astype(np.int32)),
            jnp.asarray(row_id[:, None], jnp.int32),
            jnp.asarray(sample[:, None], jnp.int32),
            n,
        )[0]
    )
    alone = np.asarray(
        likelihood.target_masks(
            key, *(jnp.asarray(a, jnp.int32) for a in (prompt, targets, row_id, sample)), n, width
        )
    )
    for b, (p, t) in enumerate(zip(prompt, targets)):
        np.testing.assert_array_equal(alone[b, :t], whole[b, p : p + t])
        assert not alone[b, t:].any()
    assert len({m.tobytes() for m in alone}) > len(cases)  # the masks do differ


def test_first_equal_rows():
    rows = np.array([[1, 0], [0, 1], [1, 0], [0, 0], [0, 1], [1, 0]], bool)
    assert likelihood.first_equal_rows(rows).tolist() == [0, 1, 0, 3, 1, 0]


def test_same_row_and_sample_draw_the_same_mask_in_any_batch(toy):
    logits_jax, _ = toy
    tokens, target, valid = (np.array([r[i] for r in ROWS]) for i in range(3))

    def one(rows, samples):
        args = unpacked(tokens[rows], target[rows], valid[rows], rows, samples)
        out = likelihood.nll_samples(
            head(logits_jax), *args, jax.random.key(7), num_samples=4, mask_id=MASK
        )
        return np.asarray(out)[:, 0]

    a = one([0, 1, 2, 1], [0, 3, 2, 1])
    b = one([1, 2, 1, 0], [1, 2, 3, 0])
    np.testing.assert_allclose(a[0], b[3])
    np.testing.assert_allclose(a[1], b[2])
    np.testing.assert_allclose(a[2], b[1])
    np.testing.assert_allclose(a[3], b[0])


def test_rolling_windows_cover_each_token_once_with_the_context_before_it():
    ids = list(range(10))
    windows = likelihood.rolling_windows(ids, max_len=4, context_len=1)
    assert windows == [
        ([0, 1, 2, 3], 4),
        ([3, 4, 5, 6], 3),
        ([6, 7, 8, 9], 3),
    ]
    windows = likelihood.rolling_windows(list(range(9)), max_len=4, context_len=2)
    assert windows == [([0, 1, 2, 3], 4), ([2, 3, 4, 5], 2), ([4, 5, 6, 7], 2), ([5, 6, 7, 8], 1)]
    assert likelihood.rolling_windows([5, 6], max_len=4, context_len=2) == [([5, 6], 2)]
    # A prefix (an opening EOS) is context, never a target.
    windows = likelihood.rolling_windows([9] + list(range(6)), 4, context_len=1, num_prefix=1)
    assert windows == [([9, 0, 1, 2], 3), ([2, 3, 4, 5], 3)]
    assert likelihood.rolling_windows([9], 4, context_len=1, num_prefix=1) == []
    with pytest.raises(ValueError, match="context_len"):
        likelihood.rolling_windows(ids, max_len=4, context_len=4)


def test_estimate_sums_rows_and_their_errors():
    samples = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])
    est = likelihood.estimate(samples, tokens=6)
    assert est.nll == pytest.approx(2 + 2 + 2)
    # row variances (ddof 1): 2, 0, 8; sum / N = 5
    assert est.stderr == pytest.approx(math.sqrt(5))
    assert est.nll_per_token == pytest.approx(1.0)
    assert est.bits_per_token == pytest.approx(1 / math.log(2))
    assert est.bits_stderr_per_token == pytest.approx(math.sqrt(5) / 6 / math.log(2))


def test_padding_a_row_changes_none_of_its_draws():
    """The same row at length 3 and right-padded to length 5: the same masks and value (the
    model ignores invalid positions, and the draws depend on positions, not the length)."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=(L, L, V + 1, V + 1)), jnp.float32)

    def logits_fn(tokens, valid):
        t = tokens.shape[1]
        onehot = jax.nn.one_hot(tokens, V + 1) * valid[..., None]
        return jnp.einsum("bjt,ijtv->biv", onehot, w[:t, :t])

    def score(tokens, target, valid):
        n = 6
        args = unpacked([tokens] * n, [target] * n, [valid] * n, [3] * n, range(n))
        out = likelihood.nll_samples(
            head(logits_fn), *args, jax.random.key(5), num_samples=n, mask_id=MASK
        )
        return np.asarray(out)[:, 0]

    short = score([1, 0, 2], [0, 1, 1], [1, 1, 1])
    long = score([1, 0, 2, 2, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0])
    np.testing.assert_allclose(short, long, rtol=1e-6)
    assert len(set(np.round(np.asarray(short), 5))) > 1  # the samples do differ


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_the_head_on_gathered_targets_gives_the_reference_samples(toy, cfg_scale):
    """The output head on K = 3 gathered positions per row (each row's targets, then others)
    and on every position (K = 0): both the samples computed here from the same masks with the
    full NumPy logits, (T / l) * sum over the masked targets of -log p."""
    logits_jax, logits_np = toy
    rows = ROWS[1:]  # at most 3 targets
    n = 6
    tokens, target, valid = (np.array([r[i] for r in rows]) for i in range(3))
    row_id = np.repeat(np.arange(len(rows)), n)
    sample = np.tile(np.arange(n), len(rows))
    args = unpacked(tokens[row_id], target[row_id], valid[row_id], row_id, sample)
    key = jax.random.key(1)
    common = dict(num_samples=n, mask_id=MASK, cfg_scale=cfg_scale)
    full = likelihood.nll_samples(head(logits_jax), *args, key, **common)
    gathered = likelihood.nll_samples(head(logits_jax), *args, key, **common, num_head_positions=3)
    masked, count, _ = likelihood.draw_masks(key, args[1], args[2], args[3], args[4], n)
    masked, count = np.asarray(masked), np.asarray(count)[:, 0]
    reference = []
    for b, r in enumerate(row_id):
        x = np.where(masked[b], MASK, tokens[r])
        logits = logits_np(x, valid[r]).astype(np.float64)
        if cfg_scale:
            prompt = valid[r].astype(bool) & ~target[r].astype(bool)
            un = logits_np(np.where(prompt, MASK, x), valid[r])
            logits = un + (cfg_scale + 1) * (logits - un)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -sum(logp[i, tokens[r][i]] for i in range(L) if masked[b, i])
        reference.append(nll * target[r].sum() / count[b])
    assert (np.asarray(full) > 0).all()
    np.testing.assert_allclose(np.asarray(full)[:, 0], reference, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gathered)[:, 0], reference, rtol=1e-5)

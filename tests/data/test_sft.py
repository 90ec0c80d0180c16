"""SFT batch builder (llada_jax.data.sft) and the packed-row sft_loss (llada_jax.diffusion)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import diffusion as D
from llada_jax.data import sft as S

EOS = 99
MASK = 126


def _rec(prompt, response):
    return np.asarray([len(prompt), *prompt, *response], np.int32)


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ decode / fit / pad


def test_decode_record_array_and_bytes():
    rec = _rec([5, 6, 7], [8, 9, 2])
    for r in (rec, rec.astype("<i4").tobytes(), rec.astype(np.int64)):
        p, q = S.decode_record(r)
        _eq(p, [5, 6, 7])
        _eq(q, [8, 9, 2])
        assert p.dtype == np.int32 and q.dtype == np.int32
    p, q = S.decode_record(_rec([], [4]))
    assert p.size == 0
    _eq(q, [4])
    p, q = S.decode_record(_rec([1, 2], []))
    _eq(p, [1, 2])
    assert q.size == 0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0,), np.int32),
        np.asarray([3, 1, 2], np.int32),
        np.asarray([-1, 1], np.int32),
        b"\x01\x00\x00",
    ],
)
def test_decode_record_malformed(bad):
    with pytest.raises(ValueError):
        S.decode_record(bad)


def test_pad_pair_hand_built():
    row = S.pad_pair(np.asarray([5, 6, 7]), np.asarray([8, 9]), seq_len=8, eos_id=EOS)
    _eq(row["tokens"], [5, 6, 7, 8, 9, EOS, EOS, EOS])
    _eq(row["prompt_mask"], [1, 1, 1, 0, 0, 0, 0, 0])
    _eq(row["segment_ids"], [1] * 8)
    assert row["tokens"].dtype == np.int32 and row["prompt_mask"].dtype == bool
    assert row["segment_ids"].dtype == np.int32
    # Exactly full: no padding.
    row = S.pad_pair(np.asarray([5]), np.asarray([8, 9, 2]), seq_len=4, eos_id=EOS)
    _eq(row["tokens"], [5, 8, 9, 2])
    _eq(row["prompt_mask"], [1, 0, 0, 0])
    with pytest.raises(ValueError, match="fit_pair"):
        S.pad_pair(np.asarray([5, 6]), np.asarray([8, 9, 2]), seq_len=4, eos_id=EOS)


def test_fit_pair_cases():
    p, r = np.arange(1, 4), np.arange(10, 15)  # 3 + 5 = 8 tokens
    # Fits: unchanged (both modes).
    for mode in S.OVERFLOW:
        fp, fr = S.fit_pair(p, r, 8, mode)
        _eq(fp, p)
        _eq(fr, r)
    # Too long: drop -> None; truncate -> whole prompt, response cut from the right.
    assert S.fit_pair(p, r, 6, "drop") is None
    fp, fr = S.fit_pair(p, r, 6, "truncate")
    _eq(fp, [1, 2, 3])
    _eq(fr, [10, 11, 12])
    # Prompt alone == seq_len: prompt cut from the LEFT to seq_len - 1, one response token kept.
    fp, fr = S.fit_pair(p, r, 3, "truncate")
    _eq(fp, [2, 3])
    _eq(fr, [10])
    # Prompt longer than seq_len.
    fp, fr = S.fit_pair(np.arange(1, 11), r, 4, "truncate")
    _eq(fp, [8, 9, 10])
    _eq(fr, [10])
    assert S.fit_pair(np.arange(1, 11), r, 4, "drop") is None
    # Prompt longer than seq_len with an empty response: room is left for one EOS.
    fp, fr = S.fit_pair(np.arange(1, 11), np.zeros((0,), np.int32), 4, "truncate")
    _eq(fp, [8, 9, 10])
    assert fr.size == 0
    with pytest.raises(ValueError, match="overflow"):
        S.fit_pair(p, r, 8, "clip")
    with pytest.raises(ValueError, match="seq_len"):
        S.fit_pair(p, r, 1, "truncate")


# ------------------------------------------------------------------ packing


def test_pack_pairs_hand_built():
    pairs = [
        ([1, 2], [3, 4]),  # 4 tokens -> row 0, seg 1
        ([5, 6, 7], [8, 9]),  # 5 -> row 0 is at 4, 4 + 5 > 8 -> row 1, seg 1
        ([10], [11, 12]),  # 3 -> row 0 (4 + 3 = 7), seg 2
        ([13, 14], [15]),  # 3 -> row 0 full-ish (7 + 3 > 8) -> row 1 (5 + 3 = 8), seg 2
        ([16], [17]),  # 2 -> no room -> row 2, seg 1
    ]
    pairs = [(np.asarray(p), np.asarray(r)) for p, r in pairs]
    rows = S.pack_pairs(pairs, seq_len=8, eos_id=EOS)
    assert len(rows) == 3
    _eq(rows[0]["tokens"], [1, 2, 3, 4, 10, 11, 12, EOS])
    _eq(rows[0]["prompt_mask"], [1, 1, 0, 0, 1, 0, 0, 0])
    _eq(rows[0]["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 2])  # padding -> last pair's segment
    _eq(rows[1]["tokens"], [5, 6, 7, 8, 9, 13, 14, 15])
    _eq(rows[1]["prompt_mask"], [1, 1, 1, 0, 0, 1, 1, 0])
    _eq(rows[1]["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2])
    _eq(rows[2]["tokens"], [16, 17] + [EOS] * 6)
    _eq(rows[2]["prompt_mask"], [1, 0, 0, 0, 0, 0, 0, 0])
    _eq(rows[2]["segment_ids"], [1] * 8)
    # Deterministic.
    again = S.pack_pairs(pairs, seq_len=8, eos_id=EOS)
    for a, b in zip(rows, again):
        for k in a:
            _eq(a[k], b[k])
    with pytest.raises(ValueError):
        S.pack_pairs([(np.arange(5), np.arange(5))], seq_len=8, eos_id=EOS)


def test_pack_pairs_never_splits_and_keeps_every_pair():
    rng = np.random.default_rng(0)
    L = 16
    pairs = []
    for i in range(40):
        n_p = int(rng.integers(0, 6))
        n_r = int(rng.integers(1, L - n_p + 1))
        pairs.append((rng.integers(200, 300, n_p), rng.integers(300, 400, n_r)))
    rows = S.pack_pairs(pairs, L, EOS)
    # Recover each pair from the rows: (prompt, response-without-padding) per segment.
    recovered = []
    for row in rows:
        seg, tok, pm = row["segment_ids"], row["tokens"], row["prompt_mask"]
        assert seg.min() >= 1 and np.all(np.diff(seg) >= 0)  # contiguous segments, no id 0
        for s in range(1, seg.max() + 1):
            idx = np.nonzero(seg == s)[0]
            assert idx.size and np.all(np.diff(idx) == 1)  # one contiguous span per pair
            n_p = int(pm[idx].sum())
            assert np.all(pm[idx[:n_p]]) and not np.any(pm[idx[n_p:]])  # prompt then response
            recovered.append((tok[idx[:n_p]], tok[idx[n_p:]]))
    assert len(recovered) == len(pairs)
    # First-fit in order: each pair is either in an existing row or opens the next one; within a
    # row pairs keep the input order, so matching by content in order works.
    remaining = list(range(len(pairs)))
    for p, r in recovered:
        for j in remaining:
            pp, rr = pairs[j]
            if (
                np.array_equal(p, pp)
                and np.array_equal(r[: rr.size], rr)
                and np.all(r[rr.size :] == EOS)
            ):
                remaining.remove(j)
                break
        else:
            raise AssertionError("packed pair not found among inputs")
    assert not remaining


def test_sft_batch_stats_and_shapes():
    recs = [
        _rec([1, 2], [3, 4]),
        _rec([5] * 7, [6, 7]),
        _rec([8], [9]),
        _rec([1] * 3, [2] * 3).tobytes(),
    ]
    batch, stats = S.sft_batch(recs, seq_len=6, eos_id=EOS, overflow="drop", pack=False)
    assert stats == {"dropped": 1, "truncated": 0}
    assert batch["tokens"].shape == (3, 6)
    _eq(batch["tokens"][1], [8, 9, EOS, EOS, EOS, EOS])
    _eq(batch["segment_ids"], np.ones((3, 6)))
    batch, stats = S.sft_batch(recs, seq_len=6, eos_id=EOS, overflow="truncate", pack=False)
    assert stats == {"dropped": 0, "truncated": 1}
    _eq(batch["tokens"][1], [5, 5, 5, 5, 5, 6])
    _eq(batch["prompt_mask"][1], [1, 1, 1, 1, 1, 0])
    batch, stats = S.sft_batch(recs, seq_len=6, eos_id=EOS, overflow="drop", pack=True)
    # 4 -> row0; 2 -> row0 (6); 6 -> row1.
    assert batch["tokens"].shape == (2, 6)
    _eq(batch["tokens"], [[1, 2, 3, 4, 8, 9], [1, 1, 1, 2, 2, 2]])
    _eq(batch["segment_ids"], [[1, 1, 1, 1, 2, 2], [1] * 6])
    _eq(batch["prompt_mask"], [[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])
    empty, stats = S.sft_batch([_rec([1] * 9, [2])], 6, EOS, "drop", pack=True)
    assert empty["tokens"].shape == (0, 6) and stats["dropped"] == 1
    with pytest.raises(ValueError, match="overflow"):
        S.sft_batch(recs, 6, EOS, "bogus")


# ------------------------------------------------------------------ losses and noising


def _np_ce(logits, targets):
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def _packed_rows():
    pairs = [
        ([1, 2], [3, 4, 5]),  # row 0 seg 1 (5 tokens)
        ([6, 7, 8, 9], [10, 11]),  # 6 tokens -> row 1 seg 1
        ([12], [13]),
    ]  # 2 -> row 0 seg 2 (7 tokens) + 3 EOS padding
    pairs = [(np.asarray(p), np.asarray(r)) for p, r in pairs]
    rows = S.pack_pairs(pairs, seq_len=10, eos_id=EOS)
    assert len(rows) == 2
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_sft_loss_packed_vs_numpy():
    b = _packed_rows()
    _eq(b["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2, 2, 2], [1] * 10])  # 2 rows, 3 pairs
    B, L, V = 2, 10, 128
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, L, V)).astype(np.float32)
    targets = b["tokens"]
    response = ~b["prompt_mask"]
    is_masked = response & (rng.random((B, L)) < 0.6)
    is_masked[0, 2] = is_masked[0, 6] = is_masked[1, 8] = True
    valid = np.ones((B, L), bool)
    valid[1, 9] = False  # an invalid position is neither in the loss nor in the answer length
    weight = np.asarray([2.0, 5.0], np.float32)
    batch = {
        "targets": jnp.asarray(targets),
        "is_masked": jnp.asarray(is_masked),
        "weight": jnp.asarray(weight),
        "valid": jnp.asarray(valid),
        "segment_ids": jnp.asarray(b["segment_ids"]),
    }
    loss, aux = D.sft_loss(jnp.asarray(logits), batch, jnp.asarray(response))

    ce = _np_ce(logits.astype(np.float64), targets)
    per_pair = []
    for r in range(B):
        for s in np.unique(b["segment_ids"][r]):
            sel = b["segment_ids"][r] == s
            resp = sel & response[r] & valid[r]
            num = np.sum(ce[r] * weight[r] * (resp & is_masked[r]))
            per_pair.append(num / max(resp.sum(), 1))
    assert len(per_pair) == 3  # mean over the 3 pairs, not over the 2 rows
    ref = np.mean(per_pair)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    lm = is_masked & response & valid
    assert int(aux["num_masked"]) == lm.sum()
    np.testing.assert_allclose(float(aux["masked_ce"]), ce[lm].mean(), rtol=1e-5)
    # Differs from the per-row normalization (packing really changes the weighting).
    row_ref = np.mean(
        [np.sum(ce[r] * weight[r] * lm[r]) / (response[r] & valid[r]).sum() for r in range(B)]
    )
    assert abs(ref - row_ref) > 1e-3
    # Jit-able with the dict structure static.
    loss_j, _ = jax.jit(D.sft_loss)(jnp.asarray(logits), batch, jnp.asarray(response))
    np.testing.assert_allclose(float(loss_j), ref, rtol=1e-5)


def test_sft_loss_packed_matches_unpacked_one_pair_per_row():
    recs = [_rec([1, 2, 3], [4, 5]), _rec([6], [7, 8, 9, 10]), _rec([11, 12], [13])]
    b, _ = S.sft_batch(recs, seq_len=8, eos_id=EOS, overflow="drop", pack=False)
    _eq(b["segment_ids"], np.ones((3, 8)))
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, 8, 128)).astype(np.float32))
    cfg = D.DiffusionConfig(mask_id=MASK, random_length_prob=0.0)
    nb = D.noise_batch(
        jax.random.PRNGKey(3),
        jnp.asarray(b["tokens"]),
        cfg,
        prompt_mask=jnp.asarray(b["prompt_mask"]),
    )
    response = ~jnp.asarray(b["prompt_mask"])
    l_row, aux_row = D.sft_loss(logits, nb, response)
    l_seg, aux_seg = D.sft_loss(
        logits, {**nb, "segment_ids": jnp.asarray(b["segment_ids"])}, response
    )
    np.testing.assert_allclose(float(l_seg), float(l_row), rtol=1e-6)
    assert int(aux_seg["num_masked"]) == int(aux_row["num_masked"])
    # Also with a random-length cut (all rows still count as pairs in both paths).
    nb_cut = {**nb, "valid": jnp.arange(8)[None, :] < 4}
    l_row, _ = D.sft_loss(logits, nb_cut, response)
    l_seg, _ = D.sft_loss(
        logits, {**nb_cut, "segment_ids": jnp.asarray(b["segment_ids"])}, response
    )
    np.testing.assert_allclose(float(l_seg), float(l_row), rtol=1e-6)


def test_noise_batch_never_masks_prompt_positions():
    b = _packed_rows()
    tokens = jnp.asarray(np.tile(b["tokens"], (8, 1)))
    prompt = jnp.asarray(np.tile(b["prompt_mask"], (8, 1)))
    cfg = D.DiffusionConfig(mask_id=MASK, random_length_prob=0.0, cfg_prompt_dropout=0.0)
    masked_any = np.zeros(tokens.shape, bool)
    for i in range(4):
        nb = D.noise_batch(jax.random.PRNGKey(i), tokens, cfg, prompt_mask=prompt)
        im = np.asarray(nb["is_masked"])
        assert not np.any(im & np.asarray(prompt))
        _eq(np.asarray(nb["inputs"])[np.asarray(prompt)], np.asarray(tokens)[np.asarray(prompt)])
        masked_any |= im
    # Response positions (EOS padding included) do get masked.
    assert masked_any[~np.asarray(prompt)].mean() > 0.3


def test_fixed_batch_fills_and_cuts_to_num_rows():
    eos = 2
    recs = [
        np.array([1, 10, 11, 12], np.int32),
        np.array([2, 20, 21, 22, 23], np.int32),
        np.array([0, 30, 31, 32, 33, 34, 35, 36, 37], np.int32),
    ]  # the last is too long
    batch, stats = S.fixed_batch(recs, 4, 6, eos, overflow="drop")
    np.testing.assert_array_equal(
        batch["tokens"], [[10, 11, 12, 2, 2, 2], [20, 21, 22, 23, 2, 2], [2] * 6, [2] * 6]
    )
    np.testing.assert_array_equal(
        batch["valid"], [[True] * 6, [True] * 6, [False] * 6, [False] * 6]
    )
    np.testing.assert_array_equal(batch["segment_ids"][2:], 0)
    assert stats == {"dropped": 1, "truncated": 0, "unplaced": 0}
    batch, stats = S.fixed_batch(recs[:2], 1, 6, eos)
    np.testing.assert_array_equal(batch["tokens"], [[10, 11, 12, 2, 2, 2]])
    assert stats["unplaced"] == 1 and batch["valid"].all()

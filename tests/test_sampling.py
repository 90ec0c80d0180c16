"""Tests for llada_jax.sampling against an independent numpy port of LLaDA's generate.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.sampling import (
    SamplerModel,
    SampleSettings,
    generate,
    num_transfer_tokens,
    select_top_k_mask,
)
from llada_jax.special_ids import SpecialIds

VOCAB = 32
MASK_ID = VOCAB - 1
EOS_ID = 5
EOT_ID = 6
IDS = SpecialIds(mask_id=MASK_ID, eos_id=EOS_ID, eot_id=EOT_ID)
MAX_LEN = 40
BUMP = 3.0
VALID_BUMP = 1.5

_rng = np.random.default_rng(0)
W = _rng.normal(size=(MAX_LEN, VOCAB)).astype(np.float32)
W[:, MASK_ID] = -20.0  # the fake model never proposes the mask token


# ----------------------------------------------------------------------------- fake model
def np_logits(tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """W[pos] + BUMP on token (prev + 1) % V when the previous token is valid and unmasked,
    + VALID_BUMP on token (number of valid positions) % V everywhere (so padding matters)."""
    b, t = tokens.shape
    logits = np.broadcast_to(W[None, :t], (b, t, VOCAB)).copy()
    for i in range(b):
        logits[i, :, valid[i].sum() % VOCAB] += np.float32(VALID_BUMP)
        for p in range(1, t):
            prev = tokens[i, p - 1]
            if valid[i, p - 1] and prev != MASK_ID:
                logits[i, p, (prev + 1) % VOCAB] += np.float32(BUMP)
    return logits


def jax_logits(tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Same function as np_logits, in jax."""
    t = tokens.shape[1]
    prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=MASK_ID)
    prev_valid = jnp.pad(valid[:, :-1], ((0, 0), (1, 0)), constant_values=False)
    use = prev_valid & (prev != MASK_ID)
    bump = jax.nn.one_hot((prev + 1) % VOCAB, VOCAB, dtype=jnp.float32) * jnp.float32(BUMP)
    n_valid = jnp.sum(valid, axis=1) % VOCAB
    valid_bump = jax.nn.one_hot(n_valid, VOCAB, dtype=jnp.float32) * jnp.float32(VALID_BUMP)
    return jnp.asarray(W)[None, :t] + jnp.where(use[..., None], bump, 0.0) + valid_bump[:, None, :]


# ----------------------------------------------------------------------------- numpy reference
def np_num_transfer(mask_count: np.ndarray, steps: int) -> np.ndarray:
    out = np.zeros((len(mask_count), steps), np.int64)
    for i, c in enumerate(mask_count):
        out[i, :] = c // steps
        for j in range(c % steps):
            out[i, j] += 1
    return out


def np_generate(
    prompt,
    prompt_valid,
    *,
    gen_length,
    steps,
    block_length,
    cfg_scale=0.0,
    logits_fn=np_logits,
    ban_eos=False,
    zero_confidence_ids=(),
):
    """Greedy (temperature 0), low_confidence LLaDA generate; returns (canvas, commit_step,
    history). With cfg_scale > 0, guided by the canvas whose prompt (non-mask positions at the
    start, pads included) is masked. ban_eos: EOS logit -inf before the argmax;
    zero_confidence_ids: their logits -inf after it, in the confidence softmax only."""
    b, lp = prompt.shape
    x = np.concatenate([prompt, np.full((b, gen_length), MASK_ID, prompt.dtype)], axis=1)
    valid = np.concatenate([prompt_valid, np.ones((b, gen_length), bool)], axis=1)
    commit_step = np.full(x.shape, -1)
    prompt_index = x != MASK_ID
    history = []
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    step = 0
    for nb in range(num_blocks):
        start, end = lp + nb * block_length, lp + (nb + 1) * block_length
        schedule = np_num_transfer((x[:, start:end] == MASK_ID).sum(1), spb)
        for i in range(spb):
            history.append(x.copy())
            mask_index = x == MASK_ID
            logits = logits_fn(x, valid)
            if cfg_scale > 0:
                uncond = np.where(prompt_index, MASK_ID, x)
                un_logits = logits_fn(uncond, valid)
                logits = un_logits + np.float32(cfg_scale + 1) * (logits - un_logits)
            if ban_eos:
                logits[..., EOS_ID] = -np.inf
            x0 = logits.argmax(-1)
            z = logits.astype(np.float64)
            z[..., list(zero_confidence_ids)] = -np.inf
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x0_p = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            x0_p[:, end:] = -np.inf
            x0 = np.where(mask_index, x0, x)
            conf = np.where(mask_index, x0_p, -np.inf)
            for j in range(b):
                idx = np.argsort(-conf[j], kind="stable")[: schedule[j, i]]
                x[j, idx] = x0[j, idx]
                commit_step[j, idx] = step
            step += 1
    return x, commit_step, history


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def jitted(
    gen_length,
    steps,
    block_length,
    temperature=0.0,
    remasking="low_confidence",
    ban_eos=False,
    logits_fn=jax_logits,
    cfg_scale=0.0,
    threshold=None,
    eos_zero_confidence=False,
):
    settings = SampleSettings(
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        temperature=temperature,
        remasking=remasking,
        ban_eos=ban_eos,
        cfg_scale=cfg_scale,
        threshold=threshold or 0.0,
        eos_zero_confidence=eos_zero_confidence,
    )
    return jax.jit(
        lambda prompt, valid, key: generate(logits_fn, prompt, valid, key, settings, IDS)
    )


def make_prompt(lengths, lp):
    """Left-padded prompts (pad id 0) of the given true lengths."""
    rng = np.random.default_rng(1)
    prompt = np.zeros((len(lengths), lp), np.int32)
    valid = np.zeros((len(lengths), lp), bool)
    for i, n in enumerate(lengths):
        prompt[i, lp - n :] = rng.integers(0, MASK_ID, size=n)
        valid[i, lp - n :] = True
    return prompt, valid


KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------- tests
def test_fake_model_is_order_sensitive():
    """Guard: with this fake model the outcome depends on commit order, block structure and
    padding, so the reference comparisons below are discriminative (numpy only)."""
    prompt, valid = make_prompt((4,), 4)
    base = np_generate(prompt, valid, gen_length=8, steps=4, block_length=8)[0]
    one_shot = np_generate(prompt, valid, gen_length=8, steps=1, block_length=8)[0]
    assert not np.array_equal(base, one_shot)
    prompt, valid = make_prompt((3, 3), 3)
    blocks = np_generate(prompt, valid, gen_length=16, steps=6, block_length=8)[0]
    single = np_generate(prompt, valid, gen_length=16, steps=6, block_length=16)[0]
    assert not np.array_equal(blocks, single)
    prompt, valid = make_prompt((5, 2), 5)
    padded = np_generate(prompt, valid, gen_length=16, steps=4, block_length=8)[0]
    unpadded = np_generate(prompt, np.ones_like(valid), gen_length=16, steps=4, block_length=8)[0]
    assert not np.array_equal(padded, unpadded)


def test_num_transfer_tokens_hand_values():
    got = np.asarray(num_transfer_tokens(jnp.array([8, 6, 2, 0]), 3))
    np.testing.assert_array_equal(got, [[3, 3, 2], [2, 2, 2], [1, 1, 0], [0, 0, 0]])
    got = np.asarray(num_transfer_tokens(jnp.array([32]), 4))
    np.testing.assert_array_equal(got, [[8, 8, 8, 8]])
    counts = np.array([0, 1, 7, 8, 13, 31])
    np.testing.assert_array_equal(
        num_transfer_tokens(jnp.array(counts), 5), np_num_transfer(counts, 5)
    )


def test_select_top_k_mask_exact_k_with_ties():
    conf = jnp.array([[0.5, 0.9, 0.5, -jnp.inf, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    got = np.asarray(select_top_k_mask(conf, jnp.array([2, 0])))
    np.testing.assert_array_equal(got, [[True, True, False, False, False], [False] * 5])
    assert np.asarray(select_top_k_mask(conf, jnp.array([3, 5]))).sum(1).tolist() == [3, 5]


@pytest.mark.parametrize(
    "lengths,lp,gen_length,steps,block_length",
    [
        ((4,), 4, 8, 4, 8),  # one block
        ((4,), 4, 16, 8, 4),  # several blocks
        ((5, 2), 5, 16, 4, 8),  # batch 2, left padding in row 1
        ((3, 3), 3, 16, 6, 8),  # remainder: 8 tokens over 3 steps -> 3, 3, 2
    ],
)
def test_matches_numpy_reference(lengths, lp, gen_length, steps, block_length):
    prompt, valid = make_prompt(lengths, lp)
    canvas, nfe = jitted(gen_length, steps, block_length)(prompt, valid, KEY)
    ref, _, _ = np_generate(
        prompt, valid, gen_length=gen_length, steps=steps, block_length=block_length
    )
    canvas = np.asarray(canvas)
    np.testing.assert_array_equal(canvas, ref)
    assert canvas.dtype == np.int32 and canvas.shape == (len(lengths), lp + gen_length)
    assert int(nfe) == steps
    np.testing.assert_array_equal(canvas[:, :lp], prompt)  # prompt untouched
    assert not (canvas == MASK_ID).any()


def test_commit_order_is_blockwise():
    """Record the canvas seen by every model call and compare with the reference history."""
    lp, gen_length, block_length, steps = 4, 16, 8, 4
    prompt, valid = make_prompt((3,), lp)
    seen = []

    def recording_logits(tokens, v):
        jax.debug.callback(lambda t: seen.append(np.asarray(t).copy()), tokens, ordered=True)
        return jax_logits(tokens, v)

    settings = SampleSettings(gen_length=gen_length, steps=steps, block_length=block_length)
    canvas, nfe = generate(recording_logits, prompt, valid, KEY, settings, IDS)
    jax.effects_barrier()
    ref, commit_step, history = np_generate(
        prompt, valid, gen_length=gen_length, steps=steps, block_length=block_length
    )
    assert len(seen) == steps == int(nfe)
    for got, want in zip(seen, history):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(canvas), ref)
    # Second block untouched during the first block's steps, first block complete after them.
    for s in range(steps // 2):
        assert (seen[s][:, lp + block_length :] == MASK_ID).all()
    assert not (seen[steps // 2][:, lp : lp + block_length] == MASK_ID).any()
    assert (seen[steps // 2][:, lp + block_length :] == MASK_ID).all()
    # Reference commit order is block-wise: block 0 in steps {0,1}, block 1 in steps {2,3}.
    assert set(commit_step[0, lp : lp + block_length]) == {0, 1}
    assert set(commit_step[0, lp + block_length :]) == {2, 3}


@pytest.mark.parametrize("temperature,remasking", [(0.0, "random"), (1.0, "low_confidence")])
def test_stochastic_modes_reproducible(temperature, remasking):
    lp = 4
    prompt, valid = make_prompt((4, 2), lp)
    fn = jitted(16, 4, 8, temperature=temperature, remasking=remasking)
    a, nfe = fn(prompt, valid, KEY)
    b, _ = fn(prompt, valid, KEY)
    c, _ = fn(prompt, valid, jax.random.PRNGKey(123))
    a, b, c = map(np.asarray, (a, b, c))
    np.testing.assert_array_equal(a, b)
    assert not (a == MASK_ID).any() and not (c == MASK_ID).any()
    np.testing.assert_array_equal(a[:, :lp], prompt)
    assert int(nfe) == 4
    if temperature > 0:
        assert not np.array_equal(a, c)  # different key, different Gumbel noise


def test_ban_eos():
    def eos_loving(tokens, v):
        return jax_logits(tokens, v).at[..., EOS_ID].add(50.0)

    prompt, valid = make_prompt((4,), 4)
    banned, _ = jitted(8, 2, 8, ban_eos=True, logits_fn=eos_loving)(prompt, valid, KEY)
    free, _ = jitted(8, 2, 8, ban_eos=False, logits_fn=eos_loving)(prompt, valid, KEY)
    assert (np.asarray(free)[:, 4:] == EOS_ID).all()
    assert not (np.asarray(banned)[:, 4:] == EOS_ID).any()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(gen_length=10, block_length=4, steps=4),
            "sample.block_length=4 does not divide sample.gen_length=10",
        ),
        (
            dict(gen_length=16, block_length=4, steps=6),
            "sample.steps=6 is not divisible by the number of blocks, 4",
        ),
        (
            dict(gen_length=8, block_length=8, steps=2, remasking="topk"),
            "sample.remasking='topk' is invalid; valid choices: ('low_confidence', 'random')",
        ),
        (
            dict(gen_length=8, block_length=8, steps=2, temperature=-1.0),
            "sample.temperature=-1.0 is invalid; valid: a number >= 0",
        ),
        (dict(gen_length=0), "sample.gen_length=0 is invalid; valid: a positive integer"),
        (dict(threshold=1.5), "sample.threshold=1.5 is invalid"),
        (dict(kv_cache="full"), "sample.kv_cache='full' is invalid"),
    ],
)
def test_invalid_settings_name_the_key(kwargs, message):
    """The settings check themselves when built; the message names the config key."""
    with pytest.raises(ValueError) as err:
        SampleSettings(**kwargs)
    assert str(err.value).startswith(message)


def test_ban_eos_needs_an_eos_id():
    prompt, valid = make_prompt((2,), 2)
    settings = SampleSettings(gen_length=8, block_length=8, steps=2, ban_eos=True)
    with pytest.raises(ValueError, match="ban_eos=True requires an EOS id"):
        generate(jax_logits, prompt, valid, KEY, settings, SpecialIds(mask_id=MASK_ID))


def test_classifier_free_guidance_matches_numpy():
    """cfg_scale > 0: the unconditional canvas masks the prompt (left pads included), the
    logits are un + (w + 1) (cond - un); the result matches the numpy reference, differs from
    the unguided one, and still takes one model call per step."""
    prompt, valid = make_prompt((5, 3, 1), 6)
    want, _, _ = np_generate(prompt, valid, gen_length=8, steps=4, block_length=4, cfg_scale=1.5)
    got, nfe = jitted(8, 4, 4, cfg_scale=1.5)(prompt, valid, KEY)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert int(nfe) == 4
    plain, _, _ = np_generate(prompt, valid, gen_length=8, steps=4, block_length=4)
    assert not np.array_equal(plain, want)


def np_threshold_generate(prompt, prompt_valid, *, gen_length, block_length, threshold):
    """Greedy confidence-threshold decoding: per block, steps until the block has no masks; each
    step commits, per row with masks left, the block's most confident masked token and every
    other one at or above the threshold. Returns (canvas, model calls)."""
    b, lp = prompt.shape
    x = np.concatenate([prompt, np.full((b, gen_length), MASK_ID, prompt.dtype)], axis=1)
    valid = np.concatenate([prompt_valid, np.ones((b, gen_length), bool)], axis=1)
    calls = 0
    for nb in range(gen_length // block_length):
        start, end = lp + nb * block_length, lp + (nb + 1) * block_length
        while (x[:, start:end] == MASK_ID).any():
            logits = np_logits(x, valid)
            calls += 1
            x0 = logits.argmax(-1)
            z = logits.astype(np.float64)
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            conf = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            for j in range(b):
                cand = [i for i in range(start, end) if x[j, i] == MASK_ID]
                if not cand:
                    continue
                best = max(cand, key=lambda i: (conf[j, i], -i))  # ties: the lower position
                for i in cand:
                    if i == best or conf[j, i] >= threshold:
                        x[j, i] = x0[j, i]
    return x, calls


@pytest.mark.parametrize("threshold", [0.9, 0.2, 1e-6])
def test_threshold_decoding_matches_numpy(threshold):
    """Every token at or above the threshold per step, at least one always; the model calls
    actually run are counted."""
    prompt, valid = make_prompt((5, 3, 1), 6)
    want, calls = np_threshold_generate(
        prompt, valid, gen_length=8, block_length=4, threshold=threshold
    )
    got, nfe = jitted(8, 8, 4, threshold=threshold)(prompt, valid, KEY)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert int(nfe) == calls
    # 0.9: one token per call (the fake model is never that confident); 0.2: some calls commit
    # several; a threshold below every confidence commits a whole block per call.
    assert calls == {0.9: 8, 0.2: 6, 1e-6: 2}[threshold]
    assert not (np.asarray(got) == MASK_ID).any()


def test_mask_tokens_in_the_prompt_compete_with_the_block():
    """An infilling template: mask tokens inside the prompt are candidates of every block's
    top-k (they are before its end) while each block's per-step counts come from the block's
    own masks, as the reference does; matches the numpy reference, which differs from filling
    the block alone."""
    prompt, valid = make_prompt((6, 5, 4), 6)
    prompt[0, 2] = prompt[1, 3] = prompt[1, 4] = MASK_ID
    want, _, _ = np_generate(prompt, valid, gen_length=8, steps=4, block_length=4)
    got, _ = jitted(8, 4, 4)(prompt, valid, KEY)
    np.testing.assert_array_equal(np.asarray(got), want)
    # Prompt masks were filled, and the blocks they took turns from end with masks left.
    assert (want[:2, :6] != prompt[:2]).any() and (want[:, 6:] == MASK_ID).any()


def np_mask_proposing(tokens, valid):
    """np_logits with the mask token the favourite of every fourth position, as an untrained
    model's can be."""
    logits = np_logits(tokens, valid)
    logits[:, 2::4, MASK_ID] += 40.0
    return logits


def jax_mask_proposing(tokens, valid):
    return jax_logits(tokens, valid).at[:, 2::4, MASK_ID].add(40.0)


def test_a_proposed_mask_token_stays_masked_and_competes_in_later_blocks():
    """As in the reference, a committed proposal of the mask token leaves its position masked,
    and it is a candidate of every later block's top-k."""
    prompt, valid = make_prompt((5, 3), 5)
    want, _, _ = np_generate(
        prompt, valid, gen_length=16, steps=8, block_length=4, logits_fn=np_mask_proposing
    )
    got, _ = jitted(16, 8, 4, logits_fn=jax_mask_proposing)(prompt, valid, KEY)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert (want[:, 5:9] == MASK_ID).any()  # masks left before the later blocks


def split(logits_fn):
    """logits_fn as a SamplerModel whose head is not the identity: the hidden state is half the
    logits, the head doubles it (both exact in floating point)."""
    return SamplerModel(body=lambda t, v: (logits_fn(t, v) * 0.5, None), head=lambda h: h * 2.0)


SPLIT, SPLIT_MASK_PROPOSING = split(jax_logits), split(jax_mask_proposing)


@pytest.mark.parametrize("case", ["blocks", "infilling", "proposed masks", "cfg", "threshold"])
def test_the_head_runs_where_tokens_can_be_committed_with_the_same_tokens(case):
    """A SamplerModel's head runs on the current block's positions, or on the whole canvas while
    masks before the block compete (a prompt's, a proposed mask token's): the canvases are the
    numpy reference's, which computes every position's logits."""
    prompt, valid = make_prompt((5, 2), 5)
    settings = dict(gen_length=16, steps=8, block_length=4)
    if case == "infilling":
        prompt[0, 2] = prompt[1, 4] = MASK_ID
    if case == "threshold":
        want, _ = np_threshold_generate(prompt, valid, gen_length=16, block_length=4, threshold=0.2)
        got, _ = jitted(16, 8, 4, logits_fn=SPLIT, threshold=0.2)(prompt, valid, KEY)
    elif case == "proposed masks":
        want, _, _ = np_generate(prompt, valid, **settings, logits_fn=np_mask_proposing)
        got, _ = jitted(16, 8, 4, logits_fn=SPLIT_MASK_PROPOSING)(prompt, valid, KEY)
    else:
        cfg_scale = 1.5 if case == "cfg" else 0.0
        want, _, _ = np_generate(prompt, valid, **settings, cfg_scale=cfg_scale)
        got, _ = jitted(16, 8, 4, logits_fn=SPLIT, cfg_scale=cfg_scale)(prompt, valid, KEY)
    np.testing.assert_array_equal(np.asarray(got), want)


def np_eos_loving(tokens, valid):
    """np_logits scaled (wide gaps between candidates) with EOS and end-of-turn the favourites
    of every third and fifth position."""
    logits = 10 * np_logits(tokens, valid)
    logits[:, ::3, EOS_ID] += 40.0
    logits[:, ::5, EOT_ID] += 40.0
    return logits


def jax_eos_loving(tokens, valid):
    logits = 10 * jax_logits(tokens, valid)
    logits = logits.at[:, ::3, EOS_ID].add(40.0)
    return logits.at[:, ::5, EOT_ID].add(40.0)


@pytest.mark.parametrize(
    "temperature, zero_ids",
    [(0.0, (EOT_ID, EOS_ID)), (1e-6, (EOT_ID,))],  # the reference's rule at T = 0 and T > 0
)
def test_eos_zero_confidence_follows_the_reference_rule(temperature, zero_ids):
    """End-of-turn proposals get confidence 0, and EOS ones too at temperature 0 only. At
    T = 1e-6 the logits' gaps (>= 1e-4 here) dwarf the Gumbel noise, so the draw is the argmax
    and the numpy reference applies; the two rules give different canvases."""
    prompt, valid = make_prompt((5, 3), 5)
    settings = dict(gen_length=16, steps=8, block_length=8)
    want, _, _ = np_generate(
        prompt, valid, **settings, logits_fn=np_eos_loving, zero_confidence_ids=zero_ids
    )
    fn = jitted(
        16, 8, 8, temperature=temperature, logits_fn=jax_eos_loving, eos_zero_confidence=True
    )
    got, _ = fn(prompt, valid, KEY)
    np.testing.assert_array_equal(np.asarray(got), want)
    other = (EOT_ID,) if temperature == 0 else (EOT_ID, EOS_ID)
    plain, _, _ = np_generate(prompt, valid, **settings, logits_fn=np_eos_loving)
    differs, _, _ = np_generate(
        prompt, valid, **settings, logits_fn=np_eos_loving, zero_confidence_ids=other
    )
    assert not np.array_equal(want, plain) and not np.array_equal(want, differs)


def test_ban_eos_matches_numpy():
    prompt, valid = make_prompt((5, 3), 5)
    want, _, _ = np_generate(
        prompt,
        valid,
        gen_length=16,
        steps=8,
        block_length=8,
        logits_fn=np_eos_loving,
        ban_eos=True,
    )
    got, _ = jitted(16, 8, 8, ban_eos=True, logits_fn=jax_eos_loving)(prompt, valid, KEY)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert not (want[:, 5:] == EOS_ID).any() and (want[:, 5:] == EOT_ID).any()


def test_gumbel_sampling_draws_the_softmax_of_logits_over_temperature():
    """One generated token per row, 4000 rows of the same prompt: its frequencies match
    softmax(logits / T) computed in numpy, within 4 standard errors for every token."""
    rows, temperature = 4000, 0.7
    prompt, valid = make_prompt((3,), 3)
    prompt, valid = np.repeat(prompt, rows, 0), np.repeat(valid, rows, 0)
    got, _ = jitted(1, 1, 1, temperature=temperature)(prompt, valid, KEY)
    counts = np.bincount(np.asarray(got)[:, 3], minlength=VOCAB) / rows
    canvas = np.concatenate([prompt[:1], [[MASK_ID]]], axis=1)
    z = np_logits(canvas, np.ones_like(canvas, bool))[0, 3].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    stderr = np.sqrt(p * (1 - p) / rows)
    assert np.all(np.abs(counts - p) <= 4 * stderr + 1e-9), np.abs(counts - p) / stderr
    assert p.max() < 0.9  # a distribution, not a point mass

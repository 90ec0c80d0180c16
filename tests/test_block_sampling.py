"""The block sampler (llada_jax/block_sampling.py): its K/V cache against recomputing the whole
canvas at every step, logits compared step by step, on a random and on a briefly trained block
model; the cached window's logits against the model's own pass; the variable length on a model
whose proposals are forced; make_sampler on a block model's run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import block_sampling, config, inference, sampling, sharding, train_step
from llada_jax import run as run_lib
from llada_jax.kernels.attention import Blocks
from llada_jax.model import KVCache, ModelConfig, Transformer
from llada_jax.sampling import SampleSettings
from llada_jax.special_ids import SpecialIds

MASK, EOS, EOT = 63, 62, 61
IDS = SpecialIds(mask_id=MASK, eos_id=EOS, eot_id=EOT)
CFG = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_hidden=48,
    init_std=0.3,  # spread logits: confidences far apart, no near-ties to flip
)


@pytest.fixture(scope="module")
def random_model():
    """A tiny random Transformer (this machine's default kernels), run with blocks of 4."""
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        model = Transformer(CFG, rngs=nnx.Rngs(0))
    return model


def left_padded(lengths, rng, low=5, high=60):
    """Random prompts of the given lengths as a left-padded batch (ids (B, P), valid (B, P))."""
    return inference.left_pad([rng.integers(low, high, n).tolist() for n in lengths], 0)


def recorded(model: block_sampling.BlockModel, log: list) -> block_sampling.BlockModel:
    """`model` with every call of its head appending the logits (R, W, V) to `log`."""

    def head(hidden):
        logits = model.head(hidden)
        jax.debug.callback(lambda x: log.append(np.asarray(x)), logits, ordered=True)
        return logits

    return model._replace(head=head)


def cached_equals_full(model, prompt, valid, settings, ids=IDS, seed=0):
    """Samples with the cache and without it; asserts the same logits at every step (to 1e-4:
    float32 rounding of matmuls of other shapes, on logits of a few units; a wrong key moves
    them by 1e-2 and more), the same tokens, nfe and lengths; returns the cached (canvas, nfe,
    lengths)."""
    out, logs = {}, {}
    for cache in (True, False):
        logs[cache] = []
        fn = functools.partial(
            block_sampling.generate_blocks,
            recorded(model, logs[cache]),
            settings=settings,
            ids=ids,
            cache=cache,
        )
        out[cache] = [np.asarray(x) for x in jax.jit(fn)(prompt, valid, jax.random.key(seed))]
        jax.effects_barrier()
    nfe = int(out[True][1])
    assert len(logs[True]) == len(logs[False]) == nfe > 0
    for step, (a, b) in enumerate(zip(logs[True], logs[False])):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"step {step}")
    for a, b in zip(out[True], out[False]):
        np.testing.assert_array_equal(a, b)
    return out[True]


SETTINGS = {  # with CFG: fixed steps, sampled; greedy by confidence threshold
    "cfg_sampled": dict(
        gen_length=16,
        steps=8,
        block_length=4,
        cfg_scale=0.5,
        temperature=1.0,
        remasking="random",
    ),
    "cfg_threshold": dict(
        gen_length=12,
        steps=3,
        block_length=4,
        cfg_scale=1.0,
        threshold=0.2,
        eos_zero_confidence=True,
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cache_is_exact_on_a_random_model(random_model, name):
    prompt, valid = left_padded([6, 3, 1], np.random.default_rng(0))
    model = block_sampling.from_transformer(lambda: random_model, 4)
    canvas, nfe, _ = cached_equals_full(model, prompt, valid, SampleSettings(**SETTINGS[name]))
    np.testing.assert_array_equal(canvas[:, :6], prompt)  # the prompt unchanged, no extra pads
    assert canvas.shape == (3, 6 + SETTINGS[name]["gen_length"])


def test_window_logits_are_the_models_block_causal_logits(random_model):
    """Independently of the sampler's loop: the prompt cached, two blocks committed into the
    cache, then the third block (half masks) as the cached window: its logits are those of
    the model's own pass under Blocks(4) over the prefix and the block (and not those of a
    full bidirectional pass, which sees the masks after it)."""
    b = 4
    rng = np.random.default_rng(1)
    prompt, valid = left_padded([7, 2], rng)  # P = 7 -> P' = 8: one pad column added
    model = block_sampling.from_transformer(lambda: random_model, b)
    settings = SampleSettings(gen_length=16, steps=4, block_length=b)
    d = block_sampling._decoding(model, prompt.shape[1], settings, IDS, cache=True)
    x, valid_T = sampling.initial_canvas(*block_sampling._align(prompt, valid, 8), 16, MASK)
    x = x.at[:, 8:16].set(jnp.asarray(rng.integers(5, 60, (2, 8))))  # two committed blocks
    x = x.at[:, 16:18].set(jnp.asarray(rng.integers(5, 60, (2, 2))))  # the third: half masks
    prompt_T = x != MASK

    @jax.jit
    def cached_logits(x, valid_T, prompt_T):
        kv = block_sampling._prompt_cache(d, x, valid_T, prompt_T)
        for start in (8, 12):
            kv = block_sampling._cache_block(d, x, valid_T, prompt_T, kv, jnp.int32(start))
        return block_sampling._block_logits(d, x, valid_T, prompt_T, kv, jnp.int32(16))

    got = np.asarray(cached_logits(x, valid_T, prompt_T))
    want = jax.jit(lambda x, v: random_model(x, v, blocks=Blocks(b)))(x[:, :20], valid_T[:, :20])
    np.testing.assert_allclose(got, np.asarray(want)[:, 16:20], atol=1e-5)
    bidirectional = jax.jit(lambda x, v: random_model(x, v))(x, valid_T)[:, 16:20]
    assert float(np.abs(got - np.asarray(bidirectional)).max()) > 1e-3


# ----------------------------------------------------------------------------------------------
def forced_model(ends, b, vocab=64):
    """A BlockModel whose proposals are forced: at canvas position t row r proposes `ends[r]`'s
    token where `ends[r] = (t, token)`, else 10 + t % 8. Its hidden state is (row, position);
    the head asserts it runs on one block only."""
    table = np.full((len(ends), 256), -1)
    for r, end in enumerate(ends):
        if end is not None:
            table[r, end[0]] = end[1]

    def hidden(tokens, start):
        rows, width = tokens.shape
        r = jnp.broadcast_to(jnp.arange(rows)[:, None], (rows, width))
        t = jnp.broadcast_to(start + jnp.arange(width)[None, :], (rows, width))
        return jnp.stack([r, t], -1)

    def head(hidden_RxWx2):
        assert hidden_RxWx2.shape[1] == b, hidden_RxWx2.shape
        r, t = hidden_RxWx2[..., 0], hidden_RxWx2[..., 1]
        forced = jnp.asarray(table)[r, t]
        token = jnp.where(forced >= 0, forced, 10 + t % 8)
        return 10.0 * jax.nn.one_hot(token, vocab)

    zeros = lambda tokens: jnp.zeros((1, *tokens.shape, 1, 1))
    return block_sampling.BlockModel(
        block_size=b,
        body=lambda tokens, valid: (hidden(tokens, 0), KVCache(zeros(tokens), zeros(tokens))),
        head=head,
        window=lambda tokens, valid, cache, start: (
            hidden(tokens, start),
            KVCache(zeros(tokens), zeros(tokens)),
        ),
    )


@pytest.mark.parametrize("cache,threshold", [(True, 0.0), (False, 0.5)])
def test_rows_stop_at_the_block_of_their_end(cache, threshold):
    """Prompts of 3 tokens (P' = 4), blocks of 4, a cap of 24 tokens (6 blocks). Row 0 ends
    with EOS at generated position 5 (block 1), row 1 with end-of-turn at 2 (block 0): two
    blocks run, their steps counted; row 1 keeps its tokens while row 0 finishes. With a row
    that never ends every block runs."""
    b, p, steps = 4, 4, 12  # 2 steps a block (threshold: 1, every proposal is sure)
    settings = SampleSettings(gen_length=24, steps=steps, block_length=b, threshold=threshold)
    per_block = 1 if threshold else steps // 6
    prompt, valid = left_padded([3, 2], np.random.default_rng(2))
    cases = [([(p + 5, EOS), (p + 2, EOT)], 2, [5, 2]), ([(p + 5, EOS), None], 6, [5, 24])]
    for ends, blocks_run, lengths in cases:
        fn = functools.partial(
            block_sampling.generate_blocks,
            forced_model(ends, b),
            settings=settings,
            ids=IDS,
            cache=cache,
        )
        canvas, nfe, got = [np.asarray(x) for x in jax.jit(fn)(prompt, valid, jax.random.key(0))]
        assert int(nfe) == blocks_run * per_block
        np.testing.assert_array_equal(got, lengths)
        generated = canvas[:, 3:]
        for r, (n, end) in enumerate(zip(lengths, ends)):
            t = np.arange(n) + p  # the aligned canvas position of each generated token
            np.testing.assert_array_equal(generated[r, :n], 10 + t % 8)
            if end is not None:
                assert generated[r, n] == end[1] and np.all(generated[r, n + 1 :] == EOS)
        if blocks_run < 6:  # the blocks never run are EOS in ended rows
            assert np.all(generated[:, blocks_run * b :] == EOS)


# ----------------------------------------------------------------------------------------------
def toy_batch(rng, rows, length, tok):
    """Rows counting up mod 16 from a random start (ids 10..25), ended by EOS after 8..28."""
    start = rng.integers(0, 16, (rows, 1))
    count = rng.integers(8, 29, (rows, 1))
    i = np.arange(length)[None, :]
    return np.where(i < count, 10 + (start + i) % 16, tok.eos_id).astype(np.int32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny block model (blocks of 8) trained for 60 steps of the real train step on the toy
    pattern: (run, graphdef, params)."""
    overrides = [
        ("diffusion.block_size", "8"),
        ("data.seq_len", "32"),
        ("model.d_model", "32"),
        ("model.mlp_hidden", "48"),
        ("kernels.matmul", "xla"),
        ("optim.lr", "3e-3"),
        ("optim.decay_steps", "0"),
        ("train.steps", "60"),
    ]
    cfg = config.load("configs/tiny.py", overrides)
    run = run_lib.build_run(cfg, devices=jax.devices()[:1], data=False)
    graphdef, params, opt_state = run_lib.create_state(run)
    step = jax.jit(
        train_step.make_train_step(graphdef, run.optimizer, run.lr_schedule, run.step_cfg)
    )
    rng = np.random.default_rng(0)
    for i in range(60):
        tokens = toy_batch(rng, cfg.data.batch_size, 32, run.tokenizer)
        batch = {"tokens": sharding.to_devices(tokens, run.mesh)}
        params, opt_state, m = step(params, opt_state, batch, jnp.int32(i))
    assert np.isfinite(float(m["loss"]))
    return run, graphdef, params


def trained_prompts():
    """Two prompts of the toy pattern, 5 and 11 tokens, left-padded."""
    return inference.left_pad([list(range(13, 18)), list(range(20, 26)) + list(range(10, 15))], 0)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(dict(cfg_scale=1.0, threshold=0.5), marks=pytest.mark.slow),
        pytest.param(dict(temperature=1.0, eos_zero_confidence=True), marks=pytest.mark.slow),
    ],
    ids=["cfg_threshold", "sampled"],
)
def test_cache_is_exact_on_a_trained_model(trained, extra):
    run, graphdef, params = trained
    model = block_sampling.from_transformer(lambda: nnx.merge(graphdef, params), 8)
    prompt, valid = trained_prompts()  # 5 and 11 tokens: P' = 16
    settings = SampleSettings(gen_length=24, steps=12, block_length=8, **extra)
    cached_equals_full(model, prompt, valid, settings, run.tokenizer.special_ids)


@pytest.mark.slow
def test_make_sampler_runs_the_block_sampler(trained):
    """make_sampler on a block model's run: block_length taken from the model (64 given), the
    kv_cache setting ignored, the tokens and nfe of generate_blocks; gen_length not a multiple
    of the block: one line naming diffusion.block_size."""
    run, graphdef, params = trained
    prompt, valid = trained_prompts()
    given = SampleSettings(gen_length=24, steps=6, block_length=24, kv_cache="dual")
    canvas, nfe = inference.make_sampler(run, given)(params, prompt, valid, jax.random.key(0))
    model = block_sampling.from_transformer(lambda: nnx.merge(graphdef, params), 8)
    settings = block_sampling.block_settings(given, 8)
    fn = functools.partial(
        block_sampling.generate_blocks, model, settings=settings, ids=run.tokenizer.special_ids
    )
    want = jax.jit(fn)(prompt, valid, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(canvas), np.asarray(want[0]))
    assert int(nfe) == int(want[1]) and int(nfe) % 2 == 0  # 2 steps a block
    with pytest.raises(ValueError, match=r"diffusion\.block_size=8.*gen_length=20"):
        inference.make_sampler(run, SampleSettings(gen_length=20, steps=5, block_length=4))

"""Block diffusion (diffusion.block_size): the attention pattern against an enumeration, the
objective at block size L (today's LLaDA loss) and 1 (an autoregressive model's cross-entropy,
exactly, by enumerating the masks), and the pattern in every attention kernel."""

import dataclasses
import functools
import itertools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import config, likelihood, metrics, sections, sharding, train_step
from llada_jax import diffusion as D
from llada_jax import kernels as kernels_lib
from llada_jax import run as run_lib
from llada_jax.data import pipeline
from llada_jax.kernels import KernelConfig, mkl
from llada_jax.kernels.attention import NEG_INF, Blocks, bias
from llada_jax.model import ModelConfig, Transformer
from llada_jax.run_sections import TrainConfig
from llada_jax.sections import SettingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MASK_ID = 63
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48)


def visible_by_rule(n: int, b: int, clean_copy: bool) -> np.ndarray:
    """Which key each query sees, written out pair by pair. Without a clean copy the n positions
    are clean blocks: block-causal. With one, positions 0..n-1 are the noised row and n..2n-1
    its clean copy, both cut into blocks of b from their own start."""
    if not clean_copy:
        return np.array([[j // b <= i // b for j in range(n)] for i in range(n)])
    out = np.zeros((2 * n, 2 * n), bool)
    for i, j in itertools.product(range(2 * n), repeat=2):
        qi_clean, kj_clean = i >= n, j >= n
        qb, kb = (i % n) // b, (j % n) // b
        if not qi_clean:  # a noised query: its own noised block, clean earlier blocks
            out[i, j] = (not kj_clean and kb == qb) or (kj_clean and kb < qb)
        else:  # a clean query: clean blocks up to its own
            out[i, j] = kj_clean and kb <= qb
    return out


@pytest.mark.parametrize("n,b", [(8, 2), (12, 4), (6, 1), (6, 6), (12, 3)])
@pytest.mark.parametrize("clean_copy", [False, True])
def test_block_pattern_matches_the_rule(n, b, clean_copy):
    got = Blocks(b, clean_copy).visible(2 * n if clean_copy else n)
    np.testing.assert_array_equal(got, visible_by_rule(n, b, clean_copy))


def test_block_bias_with_packing_and_padding():
    """Packed segments and key padding restrict the block pattern further, pair by pair."""
    n, b = 8, 2
    seg_L = np.array([1, 1, 1, 2, 2, 2, 2, 0])  # two documents, one pad slot
    valid_L = seg_L > 0
    seg_2L, valid_2L = np.tile(seg_L, 2), np.tile(valid_L, 2)
    got = np.asarray(
        bias(jnp.asarray(valid_2L[None]), jnp.asarray(seg_2L[None]), False, Blocks(b, True))
    )[0, 0]
    rule = visible_by_rule(n, b, True)
    for i, j in itertools.product(range(2 * n), repeat=2):
        want = rule[i, j] and valid_2L[j] and seg_2L[i] == seg_2L[j]
        assert got[i, j] == (0.0 if want else NEG_INF), (i, j)


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    """A tiny random model (XLA kernels), its graph and parameters."""
    kernels = kernels_lib.select(KernelConfig(attention="xla", matmul="xla"), CFG.compute_dtype)
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        model = Transformer(CFG, rngs=nnx.Rngs(0), kernels=kernels)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


@functools.cache
def jitted_loss(graphdef, block_size):
    """`train_step.loss_fn` of the model `graphdef` at `block_size`, jitted once per test run."""
    return jax.jit(lambda p, n: train_step.loss_fn(graphdef, p, n, "elbo", block_size)[0])


def loss_of(toy, noised, block_size):
    graphdef, params = toy
    return jitted_loss(graphdef, block_size)(params, noised)


def test_block_size_L_is_the_full_sequence_model(toy):
    """One block per row: the same draws (inputs, masks, weights) and the same loss as LLaDA's."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, MASK_ID, (8, 16)), jnp.int32)
    for t_sampling in ("iid", "stratified"):
        full = D.DiffusionConfig(mask_id=MASK_ID, t_sampling=t_sampling, random_length_prob=0.0)
        block = D.DiffusionConfig(
            mask_id=MASK_ID, t_sampling=t_sampling, random_length_prob=0.0, block_size=16
        )
        a = D.noise_batch(jax.random.key(1), tokens, full)
        b = D.noise_batch(jax.random.key(1), tokens, block)
        for k in ("inputs", "is_masked", "valid"):
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        np.testing.assert_array_equal(np.asarray(a["weight"]), np.asarray(b["weight"])[:, 0])
        np.testing.assert_allclose(float(loss_of(toy, b, 16)), float(loss_of(toy, a, 0)), rtol=2e-5)


def test_blocks_draw_their_own_stratified_times():
    """Stratified t spans all B * L / b blocks: the sorted times are evenly spaced by 1 / (B K)."""
    cfg = D.DiffusionConfig(mask_id=MASK_ID, t_sampling="stratified", eps=1e-3, block_size=4)
    out = D.noise_batch(jax.random.key(3), jnp.zeros((4, 16), jnp.int32), cfg)
    p = np.sort(np.asarray(out["p"]).ravel())
    assert np.asarray(out["p"]).shape == (4, 4)
    np.testing.assert_allclose(np.diff(p), (1 - 1e-3) / 16, rtol=1e-4)


def causal_copy(graphdef, params) -> Transformer:
    """The toy model's parameters in a causal LM (model.causal) with the same kernels."""
    causal = dataclasses.replace(CFG, causal=True)
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        model = Transformer(causal, rngs=nnx.Rngs(0), kernels=nnx.merge(graphdef, params).kernels)
    nnx.update(model, params)
    return model


def test_block_size_1_expectation_is_the_autoregressive_cross_entropy(toy):
    """With blocks of one token the expected loss over every mask (enumerated, at fixed t) is the
    mean over positions of -log p(x_i | x_<i) of the same parameters as a causal LM
    (model.causal) fed the prefix x_<i followed by the mask token, nothing after it."""
    model = causal_copy(*toy)
    L = 5
    x = np.random.default_rng(1).integers(0, MASK_ID, L).astype(np.int32)
    p = np.array([0.2, 0.5, 0.9, 0.35, 0.6], np.float32)  # each block's mask probability
    want = 0.0
    for i in range(L):
        prefix = jnp.asarray(np.append(x[:i], MASK_ID)[None])
        logp = jax.nn.log_softmax(np.asarray(model(prefix), np.float64)[0, -1])
        want -= float(logp[x[i]]) / L

    got = 0.0
    for bits in itertools.product([False, True], repeat=L):
        masked = np.array(bits)
        prob = np.prod(np.where(masked, p, 1 - p))
        noised = {
            "inputs": jnp.asarray(np.where(masked, MASK_ID, x)[None]),
            "targets": jnp.asarray(x[None]),
            "is_masked": jnp.asarray(masked[None]),
            "weight": jnp.asarray(1 / p[None]),  # the linear schedule's ELBO weight, per block
            "valid": jnp.ones((1, L), bool),
        }
        got += prob * float(loss_of(toy, noised, 1))
    assert got == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["mkl", "cudnn", "splash"])
def test_every_kernel_takes_the_block_pattern(attention):
    """The noised half's logits of [x_t | x_0] rows (packed, padded) under each kernel equal
    XLA's (splash interpreted on the CPU, at 2L = 256 so that it tiles)."""
    L, b = 128, 16
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, MASK_ID, (2, L))
    xt = np.where(rng.random((2, L)) < 0.5, MASK_ID, x0)
    tokens = jnp.asarray(np.concatenate([xt, x0], 1), jnp.int32)
    valid_L = np.ones((2, L), bool)
    valid_L[1, 100:] = False
    seg_L = np.repeat([[1, 2]], 2, 0).repeat(L // 2, 1)
    valid, seg = jnp.asarray(np.tile(valid_L, 2)), jnp.asarray(np.tile(seg_L, 2))
    blocks = Blocks(b, clean_copy=True)

    def logits(kernel):
        config = KernelConfig(matmul="mkl") if kernel == "mkl" else KernelConfig(kernel, "xla")
        kernels = kernels_lib.select(config, CFG.compute_dtype)
        assert kernels.attention == kernel
        with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
            model = Transformer(CFG, rngs=nnx.Rngs(0), kernels=kernels)
            out = jax.jit(lambda m: m(tokens, valid, seg, blocks=blocks))(model)
        return np.asarray(out)[:, :L][valid_L]

    if attention == "mkl" and not mkl.available("auto"):
        pytest.skip("no MKL on this platform")
    np.testing.assert_allclose(logits(attention), logits("xla"), atol=1e-4, rtol=1e-4)


def test_block_pattern_attends_L_squared_plus_L_b_pairs_as_counted():
    """metrics' FLOPs count the pairs the block pattern attends: L^2 + L b per row."""
    for L, b in [(16, 4), (12, 1), (8, 8)]:
        assert Blocks(b, True).visible(2 * L).sum() == L * L + L * b
    cfg = CFG
    attention = lambda b: 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (64 + b)
    layer_params = (
        cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
        + 3 * cfg.d_model * cfg.mlp_hidden
    )
    head = cfg.d_model * cfg.vocab_size
    full = metrics.forward_flops_per_token(cfg, 64)
    block = metrics.forward_flops_per_token(cfg, 64, 16)
    assert full == 2 * (cfg.n_layers * layer_params + head) + attention(0)
    assert block == 2 * (2 * cfg.n_layers * layer_params + head) + attention(16)


@pytest.mark.slow
def test_a_block_model_trains_with_packing_random_lengths_and_sft_prompts(tmp_path):
    """The tiny config at block size 16 with packed documents, every batch cut to a random
    length, and SFT prompts: a few steps of the real train step, finite and learning."""
    overrides = [
        ("diffusion.block_size", "16"),
        ("data.segment_ids", "True"),
        ("diffusion.random_length_prob", "0.5"),
        ("diffusion.t_sampling", "stratified"),
    ]
    cfg = config.load("configs/tiny.py", overrides)
    run = run_lib.build_run(cfg, workdir=str(tmp_path), devices=jax.devices()[:1])
    graphdef, params, opt_state = run_lib.create_state(run)
    step = jax.jit(
        train_step.make_train_step(graphdef, run.optimizer, run.lr_schedule, run.step_cfg)
    )
    losses = []
    batch = pipeline.to_global(run.batches[0], run.mesh, cfg.data.batch_size)
    batch = {**batch, "prompt_mask": jnp.arange(64)[None, :] < 8}  # read by SFT only
    for _ in range(4):  # the same batch and the same two draws: the loss must fall
        for i in (0, 1):
            params, opt_state, m = step(params, opt_state, batch, jnp.int32(i))
            losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-2] < losses[0] - 0.1, losses
    sft = dataclasses.replace(run.step_cfg, objective="sft")
    noised = train_step.noise(jax.random.key(0), batch, sft)
    loss, _ = train_step.loss_fn(graphdef, params, noised, "elbo", 16)
    assert np.isfinite(float(loss))
    assert not np.any(np.asarray(noised["is_masked"])[:, :8])  # the prompt stays clean


def test_block_size_schedule_phases_and_bad_values():
    """Phases by until-step, then diffusion.block_size; bad schedules are one SettingError."""
    train = sections.from_section(
        TrainConfig, {"steps": 10, "block_size_schedule": ((1, 2), (8, 4), (0, 7))}
    )
    assert [train.block_size_at(s, final=16) for s in range(10)] == [1, 1, 8, 8, 0, 0, 0] + [16] * 3
    for bad in (((1, 4), (8, 4)), ((1, 10),), ((-1, 2),), ((1, 2, 3),), (1, 2)):
        with pytest.raises(SettingError, match="block_size_schedule"):
            sections.from_section(TrainConfig, {"steps": 10, "block_size_schedule": bad})
    cfg = config.load("configs/tiny.py", [("train.block_size_schedule", "((1, 2), (5, 4))")])
    with pytest.raises(ValueError, match="block size 5 does not divide data.seq_len=64"):
        config.check(cfg)


@pytest.mark.slow
def test_training_follows_the_block_size_schedule(tmp_path):
    """An AR-to-diffusion run of the tiny config: block size 1, then the full sequence, then 16,
    each phase compiled once; extended to 8 steps, it resumes at step 6 in the last phase."""
    cmd = [sys.executable, "-m", "llada_jax.train", "--config=configs/tiny.py"]
    cmd += [f"--workdir={tmp_path}", "--config.sample.num_samples=0"]
    cmd += [
        "--config.train.block_size_schedule=((1, 2), (0, 4))",
        "--config.diffusion.block_size=16",
    ]
    cmd += ["--config.checkpoint.save_every=4", "--config.train.log_every=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = re.findall(r"step (\d+): training at block size (\d+)", proc.stdout)
    assert phases == [("1", "1"), ("3", "0"), ("5", "16")], proc.stdout
    rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in rows)
    proc = subprocess.run(
        cmd + ["--config.train.steps=8"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = re.findall(r"step (\d+): training at block size (\d+)", proc.stdout)
    assert phases == [("7", "16")], proc.stdout


# ----------------------------------------------------------------------------------------------
# The block bound (likelihood.py with block_size)
def block_scorer(toy, block_size, num_samples, seed=0):
    graphdef, params = toy
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    scorer = likelihood.make_scorer(
        graphdef, mesh, mask_id=MASK_ID, num_samples=num_samples, seed=seed, block_size=block_size
    )
    return lambda *args: np.asarray(scorer(params, *(jnp.asarray(a) for a in args)))


def test_block_bound_is_unbiased_against_enumeration(toy):
    """The block bound's mean over many samples against its expectation enumerated exactly:
    per block, every count l and every set of l masked targets, each target's -log p from the
    model on the clean earlier tokens and the noised block alone, block-causally (no clean
    copy: another layout of the same model)."""
    graphdef, params = toy
    model = nnx.merge(graphdef, params)
    L, b, n = 6, 3, 600
    x = np.random.default_rng(2).integers(0, MASK_ID, L).astype(np.int32)
    target = np.arange(L) >= 2  # a prompt of two tokens
    want = 0.0
    for start in range(0, L, b):
        block = [i for i in range(start, start + b) if target[i]]
        t = len(block)
        for count in range(1, t + 1):
            for chosen in itertools.combinations(block, count):
                noised = x[: start + b].copy()
                noised[list(chosen)] = MASK_ID
                logits = model(jnp.asarray(noised[None]), blocks=Blocks(b))
                logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[0], axis=-1)
                nll = -sum(float(logp[i, x[i]]) for i in chosen)
                want += (1 / t) / math.comb(t, count) * (t / count) * nll
    score = block_scorer(toy, b, n)
    tokens = np.repeat(x[None], n, 0)
    rows = (tokens, np.repeat(target[None], n, 0), np.ones((n, L), np.int32))
    samples = score(*rows, np.zeros((n, 1), np.int32), np.arange(n)[:, None])[:, 0]
    stderr = samples.std(ddof=1) / np.sqrt(n)
    assert abs(samples.mean() - want) < 4 * stderr + 1e-6, (samples.mean(), want, stderr)
    assert samples.std() > 0.01  # Monte Carlo: the samples differ


def test_block_bound_with_blocks_of_one_is_the_exact_autoregressive_nll(toy):
    """Blocks of one token: every sample is -log p(targets | prompt) of the same parameters as a
    causal LM (each target from the mask token after the clean tokens before it), exactly."""
    model = causal_copy(*toy)
    L = 7
    x = np.random.default_rng(3).integers(0, MASK_ID, L).astype(np.int32)
    target = np.arange(L) >= 3
    want = 0.0
    for i in np.flatnonzero(target):
        logits = model(jnp.asarray(np.append(x[:i], MASK_ID)[None]))
        want -= float(jax.nn.log_softmax(np.asarray(logits, np.float64)[0, -1])[x[i]])
    score = block_scorer(toy, 1, 4)
    rows = (np.repeat(x[None], 4, 0), np.repeat(target[None], 4, 0), np.ones((4, L), np.int32))
    samples = score(*rows, np.full((4, 1), 5, np.int32), np.arange(4)[:, None])[:, 0]
    np.testing.assert_allclose(samples, want, rtol=1e-5)

"""Tests for llada_jax.optim against numpy references written here."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from llada_jax import config, optim


def cfg(**overrides):
    return ml_collections.ConfigDict({**config.base_config().optim, **overrides})


# ---------------------------------------------------------------------------
# numpy references


def ref_lr(step, c, total):
    """Piecewise reference learning rate (plain python floats)."""
    lr, warm, final = c.lr, c.warmup_steps, c.final_lr
    if step < warm:
        return lr * step / warm
    if c.schedule == "constant":
        return lr
    if c.schedule == "cosine":
        p = min((step - warm) / max(total - warm, 1), 1.0)
        return final + (lr - final) * (1 + math.cos(math.pi * p)) / 2

    def held_at(s):
        v = lr
        for ds, dv in c.lr_drops:
            if s >= ds:
                v = dv
        return v

    start = total - c.decay_steps
    if c.decay_steps and step >= start:
        v0 = held_at(start)
        return v0 + (final - v0) * min((step - start) / c.decay_steps, 1.0)
    return held_at(step)


def ref_adamw(params, grads_seq, lrs, mask, b1, b2, eps, wd, clip):
    """numpy AdamW with optional global-norm clipping; returns final params."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = {k: np.array(x, np.float64) for k, x in g.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        if clip and norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat = m[k] / (1 - b1**t)
            vhat = v[k] / (1 - b2**t)
            upd = mhat / (np.sqrt(vhat) + eps) + (wd * p[k] if mask[k] else 0.0)
            p[k] = p[k] - lr * upd
    return p


# ---------------------------------------------------------------------------
# schedules

SCHEDULE_CASES = [
    dict(schedule="constant", warmup_steps=10),
    dict(schedule="constant", warmup_steps=0),
    dict(schedule="cosine", warmup_steps=10, final_lr=1e-5),
    dict(schedule="cosine", warmup_steps=0, final_lr=0.0),
    dict(schedule="wsd", warmup_steps=10, decay_steps=0),
    dict(schedule="wsd", warmup_steps=10, decay_steps=30, final_lr=1e-5),
    dict(schedule="wsd", warmup_steps=10, decay_steps=30, lr_drops=((40, 2e-4), (55, 1e-4))),
    dict(schedule="wsd", warmup_steps=0, decay_steps=100, lr_drops=()),
    dict(schedule="wsd", warmup_steps=5, decay_steps=0, lr_drops=((10, 3e-4),)),
]


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda c: str(sorted(c.items())))
def test_schedule_matches_numpy(case):
    total = 100
    c = cfg(**case)
    sched = optim.make_lr_schedule(c, total)
    steps = np.arange(0, total + 10)
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps)))
    want = np.array([ref_lr(int(s), c, total) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
    assert float(sched(0)) == 0.0 or case["warmup_steps"] == 0


def test_llada_8b_schedule():
    tokens_per_step = 4096 * 1280
    assert tokens_per_step == 5_242_880
    total = round(2.3e12 / tokens_per_step)
    drop = round(1.2e12 / tokens_per_step)
    decay = round(0.3e12 / tokens_per_step)
    c = cfg(
        lr=4e-4,
        schedule="wsd",
        warmup_steps=2000,
        final_lr=1e-5,
        decay_steps=decay,
        lr_drops=((drop, 1e-4),),
    )
    sched = optim.make_lr_schedule(c, total)
    start = total - decay
    points = {
        0: 0.0,
        1000: 2e-4,
        2000: 4e-4,
        drop - 1: 4e-4,
        drop: 1e-4,
        start - 1: 1e-4,
        start: 1e-4,
        start + decay // 2: 1e-4 + (1e-5 - 1e-4) * (decay // 2) / decay,
        total: 1e-5,
        total + 100: 1e-5,
    }
    for step, want in points.items():
        np.testing.assert_allclose(
            float(sched(step)), want, rtol=1e-5, atol=1e-12, err_msg=f"step {step}"
        )
        np.testing.assert_allclose(want, ref_lr(step, c, total), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(float(sched(start + decay // 2)), 5.5e-5, rtol=1e-5)


BAD_SCHEDULES = [
    (dict(schedule="linear"), 100, "linear"),
    (dict(warmup_steps=-5), 100, "-5"),
    (dict(warmup_steps=2.5), 100, "2.5"),
    (dict(warmup_steps=200, schedule="constant"), 100, "200"),
    (dict(warmup_steps=60, decay_steps=50), 100, "110"),
    (dict(decay_steps=-1, warmup_steps=0), 100, "-1"),
    (dict(warmup_steps=10, lr_drops=((50, 1e-4), (30, 5e-5))), 100, "30"),
    (dict(warmup_steps=10, lr_drops=((5, 1e-4),)), 100, "5"),
    (dict(warmup_steps=10, decay_steps=20, lr_drops=((85, 1e-4),)), 100, "85"),
    (dict(warmup_steps=10, lr_drops=((50,),)), 100, "(50,)"),
    (dict(schedule="cosine", warmup_steps=10, lr_drops=((50, 1e-4),)), 100, "lr_drops"),
    (dict(lr=-1.0), 100, "-1.0"),
    (dict(warmup_steps=0), 0, "train.steps=0"),
]


@pytest.mark.parametrize("overrides,total,needle", BAD_SCHEDULES)
def test_bad_schedule_raises(overrides, total, needle):
    with pytest.raises(ValueError, match="is invalid") as e:
        optim.make_lr_schedule(cfg(**overrides), total)
    assert needle in str(e.value)


# ---------------------------------------------------------------------------
# decay mask on a toy nnx model with a scanned stack


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        self.proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)


class Toy(nnx.Module):
    def __init__(self, rngs, vocab=11, d=4, n=3):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return Block(d, rngs)

        self.blocks = make(rngs)
        self.ln_f = nnx.RMSNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)


def flat(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out["/".join(n for n in names if n != "value")] = leaf
    return out


@pytest.fixture(scope="module")
def toy_params():
    # Created under jit: much faster on CPU than eager init of the vmapped stack.
    return jax.jit(lambda: nnx.split(Toy(nnx.Rngs(0)), nnx.Param)[1])()


def test_decay_mask_matrices(toy_params):
    assert toy_params["blocks"]["attn_norm"]["scale"].shape == (3, 4)  # 2-D norm scale
    mask = optim.decay_mask(toy_params)
    assert jax.tree.structure(mask) == jax.tree.structure(toy_params)
    assert flat(mask) == {
        "blocks/attn_norm/scale": False,
        "blocks/proj/kernel": True,
        "embed/embedding": True,
        "head/kernel": True,
        "ln_f/scale": False,
    }
    assert all(flat(optim.decay_mask(toy_params, "all")).values())
    with pytest.raises(ValueError, match="'bias_only'"):
        optim.decay_mask(toy_params, "bias_only")


@pytest.mark.parametrize("on", ["matrices", "all"])
def test_optimizer_mask_on_nnx_state(toy_params, on):
    """Zero grads: the AdamW update is exactly -lr * wd * p where decayed, else 0."""
    lr, wd = 1e-2, 0.1
    c = cfg(schedule="constant", warmup_steps=0, lr=lr, weight_decay=wd, weight_decay_on=on)
    tx = optim.make_optimizer(c, 100)
    state = tx.init(toy_params)
    zeros = jax.tree.map(jnp.zeros_like, toy_params)
    updates, _ = jax.jit(tx.update)(zeros, state, toy_params)
    assert jax.tree.structure(updates) == jax.tree.structure(toy_params)
    upd, par = flat(updates), flat(toy_params)
    for name, u in upd.items():
        decayed = on == "all" or not name.endswith("scale")
        want = -lr * wd * np.asarray(par[name]) if decayed else np.zeros(par[name].shape)
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------
# AdamW vs numpy


def test_adamw_with_clipping_matches_numpy():
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(3, 2)).astype(np.float32),
        "scale": (1 + 0.1 * rng.normal(size=(2,))).astype(np.float32),
    }
    g1 = {k: (5.0 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
    g2 = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
    assert math.sqrt(sum((x**2).sum() for x in g1.values())) > 1.0  # clipped
    assert math.sqrt(sum((x**2).sum() for x in g2.values())) < 1.0  # not clipped
    c = cfg(
        schedule="wsd",
        warmup_steps=0,
        decay_steps=2,
        final_lr=1e-3,
        lr=1e-2,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        clip_norm=1.0,
    )
    total = 3
    sched = optim.make_lr_schedule(c, total)
    lrs = [ref_lr(0, c, total), ref_lr(1, c, total)]
    np.testing.assert_allclose([float(sched(0)), float(sched(1))], lrs, rtol=1e-6)

    tx = optim.make_optimizer(c, total)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in (g1, g2):
        upd, state = step(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, upd)

    mask = {"kernel": True, "scale": False}
    want = ref_adamw(params, [g1, g2], lrs, mask, 0.9, 0.95, 1e-8, 0.1, clip=1.0)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # Sanity: the test is sensitive to clipping and to decaying the scale.
    unclipped = ref_adamw(params, [g1, g2], lrs, mask, 0.9, 0.95, 1e-8, 0.1, clip=None)
    assert not np.allclose(unclipped["kernel"], want["kernel"], rtol=1e-5, atol=1e-7)
    decayed = ref_adamw(
        params, [g1, g2], lrs, {"kernel": True, "scale": True}, 0.9, 0.95, 1e-8, 0.1, clip=1.0
    )
    assert not np.allclose(decayed["scale"], want["scale"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip", [0, None, 0.0])
def test_clip_disabled(clip):
    c = cfg(schedule="constant", warmup_steps=0, lr=1e-2, clip_norm=clip, weight_decay=0.0)
    tx = optim.make_optimizer(c, 10)
    params = {"kernel": jnp.ones((2, 2))}
    g1 = {"kernel": jnp.full((2, 2), 10.0)}
    g2 = {"kernel": jnp.full((2, 2), 0.1)}
    state = tx.init(params)
    for g in (g1, g2):
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
    want = ref_adamw(
        {"kernel": np.ones((2, 2))},
        [g1, g2],
        [1e-2, 1e-2],
        {"kernel": False},
        0.9,
        0.95,
        1e-8,
        0.0,
        clip=None,
    )
    np.testing.assert_allclose(np.asarray(params["kernel"]), want["kernel"], rtol=1e-5)


def test_bad_optimizer_config():
    with pytest.raises(ValueError, match="'norms'"):
        optim.make_optimizer(cfg(weight_decay_on="norms"), 10_000)
    with pytest.raises(ValueError, match="b2=1.0"):
        optim.make_optimizer(cfg(b2=1.0), 10_000)
    with pytest.raises(ValueError, match="clip_norm=-1"):
        optim.make_optimizer(cfg(clip_norm=-1.0), 10_000)


# ---------------------------------------------------------------------------
# gradient accumulation


def _loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    err = pred - batch["y"]
    loss = jnp.mean(err**2)
    return loss, {"mae": jnp.mean(jnp.abs(err)), "n": jnp.int32(batch["x"].shape[0])}


def test_accumulate_gradients_matches_full_batch():
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
    }
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    (loss_full, aux_full), g_full = grad_fn(params, batch)
    acc = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
    loss, aux, grads = acc(grad_fn, params, batch, 4)
    np.testing.assert_allclose(loss, loss_full, rtol=1e-6)
    np.testing.assert_allclose(aux["mae"], aux_full["mae"], rtol=1e-6)
    assert float(aux["n"]) == 2.0  # mean of per-microbatch sizes
    for k in params:
        assert grads[k].dtype == jnp.float32
        np.testing.assert_allclose(grads[k], g_full[k], rtol=1e-5, atol=1e-6)
    loss1, _, g1 = optim.accumulate_gradients(grad_fn, params, batch, 1)
    np.testing.assert_allclose(loss1, loss_full, rtol=1e-7)
    np.testing.assert_allclose(g1["w"], g_full["w"], rtol=1e-7)


def test_accumulate_gradients_bad_inputs():
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
    batch = {"x": jnp.zeros((8, 4)), "y": jnp.zeros((8, 3))}
    with pytest.raises(ValueError, match="batch size 8 .*num_microbatches=3"):
        optim.accumulate_gradients(grad_fn, params, batch, 3)
    with pytest.raises(ValueError, match="num_microbatches=0"):
        optim.accumulate_gradients(grad_fn, params, batch, 0)
    with pytest.raises(ValueError, match="leading"):
        optim.accumulate_gradients(grad_fn, params, {"x": batch["x"], "y": jnp.zeros((6, 3))}, 2)

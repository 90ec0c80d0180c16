"""MKL matmuls and attention on XLA:CPU (llada_jax/kernels/mkl.py) against numpy, gradients
included; which models use them (llada_jax/kernels/choice.py)."""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import kernels, metrics, sharding
from llada_jax.kernels import mkl
from llada_jax.kernels.attention import bias as attention_bias
from llada_jax.model import ModelConfig, Transformer

# The test extra installs mkl on Linux x86-64; there the kernel must build, not quietly fall back.
MKL_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"
needs_mkl = pytest.mark.skipif(not MKL_EXPECTED, reason="the mkl wheel is Linux x86-64 only")


@needs_mkl
def test_kernel_builds_and_is_chosen_for_one_cpu_device():
    assert mkl._load() == "" and mkl.available("auto")
    one = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    for setting in ("auto", "mkl"):
        assert kernels.select(
            kernels.KernelConfig(matmul=setting, attention="xla"), jnp.float32, one
        ) == kernels.Kernels("mkl", "mkl", "cpu")
    assert kernels.select(
        kernels.KernelConfig(matmul="auto", attention="xla"), jnp.float32
    ) == kernels.Kernels("mkl", "mkl", "cpu")
    # The cuDNN and splash settings keep their attention; MKL still computes the matmuls.
    assert kernels.select(
        kernels.KernelConfig(matmul="auto", attention="cudnn"), jnp.float32, one
    ) == kernels.Kernels("mkl", "cudnn", "cpu")


def test_not_chosen_for_xla_bfloat16_and_sharded_meshes():
    one = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    xla = kernels.Kernels("xla", "xla", "cpu")
    assert (
        kernels.select(kernels.KernelConfig(matmul="xla", attention="xla"), jnp.float32, one) == xla
    )
    assert (
        kernels.select(kernels.KernelConfig(matmul="auto", attention="xla"), jnp.bfloat16, one)
        == xla
    )
    two = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
    assert (
        kernels.select(kernels.KernelConfig(matmul="mkl", attention="xla"), jnp.float32, two) == xla
    )
    with sharding.use_mesh(two):  # the mesh in context, as when a model is built under it
        assert kernels.select(
            kernels.KernelConfig(matmul="mkl", attention="splash"), jnp.float32
        ) == kernels.Kernels("xla", "splash", "cpu")


@needs_mkl
@pytest.mark.parametrize(
    "trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)]
)
def test_matmul_and_its_gradients_match_numpy(trans_a, trans_b):
    rng = np.random.default_rng(int(trans_a) * 2 + int(trans_b))
    m, k, n = 37, 29, 41
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    A, B = (a64.T if trans_a else a64), (b64.T if trans_b else b64)

    c = jax.jit(mkl.matmul, static_argnums=(2, 3))(a, b, trans_a, trans_b)
    np.testing.assert_allclose(c, A @ B, rtol=1e-5, atol=1e-4)

    # loss = sum(C * R): dA = R B^T, dB = A^T R, transposed back where the operand was.
    da, db = jax.jit(
        jax.grad(lambda a, b: jnp.sum(mkl.matmul(a, b, trans_a, trans_b) * r), argnums=(0, 1))
    )(a, b)
    dA, dB = r @ B.T, A.T @ r
    np.testing.assert_allclose(da, dA.T if trans_a else dA, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, dB.T if trans_b else dB, rtol=1e-5, atol=1e-4)


def np_attention(q, k, v, bias, d_out):
    """float64 attention and its hand-derived backward. q (B, L, H, D), k, v (B, L, K, D), bias
    (B, LB, L) -> out, dq, dk, dv for the cotangent d_out."""
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # query head h uses kv head h // g
    s = np.einsum("bqhd,bkhd->bhqk", q, k) + bias[:, None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k)
    fold = lambda x: x.reshape(*x.shape[:2], -1, g, x.shape[-1]).sum(3)  # sum a kv head's queries
    dk = fold(np.einsum("bhqk,bqhd->bkhd", ds, q))
    dv = fold(np.einsum("bhqk,bqhd->bkhd", p, d_out))
    return out, dq, dk, dv


def attention_layout(rng: np.random.Generator, b: int, length: int, layout: str):
    """(valid (B, L) bool, segment ids (B, L) or None) of a layout: "scattered" segments 0..2
    and padding anywhere; "packed" runs of 1, 2 and 3 and then padding, as requests are packed
    (each query row sees one run of keys, the kernel computes that run alone); "prefix" valid
    positions, then padding (one bias row for every query)."""
    if layout == "scattered":
        return rng.random((b, length)) > 0.2, jnp.asarray(rng.integers(0, 3, (b, length)))
    ends_Bx3 = np.sort(rng.integers(1, length, (b, 3)), axis=1)
    ends_Bx3[0, 2] = length  # a row without padding
    segments = (np.arange(length)[None, None] >= ends_Bx3[..., None]).sum(1) + 1
    segments = np.where(segments > 3, 0, segments)
    if layout == "packed":
        return segments > 0, jnp.asarray(segments)
    return segments > 0, None


@needs_mkl
@pytest.mark.parametrize(
    "heads,kv_heads,length,layout",
    [(4, 2, 150, "scattered"), (4, 2, 150, "packed"), (3, 3, 40, "prefix")],
)
def test_attention_and_its_gradients_match_numpy(heads, kv_heads, length, layout):
    """150 rows: two blocks of query rows, the second partial; GQA; packed segments and padding
    (padding queries see no key: their rows are uniform)."""
    rng = np.random.default_rng(length)
    b, d = 3, 16
    q = rng.standard_normal((b, length, heads, d)).astype(np.float32) * 0.5
    k, v = (rng.standard_normal((b, length, kv_heads, d)).astype(np.float32) for _ in range(2))
    valid, segments = attention_layout(rng, b, length, layout)
    bias = np.asarray(attention_bias(jnp.asarray(valid), segments, False))[:, 0]
    assert bias.shape == (b, length if segments is not None else 1, length)
    d_out = rng.standard_normal(q.shape).astype(np.float32)

    out, vjp = jax.vjp(lambda q, k, v: mkl.attention(q, k, v, bias), q, k, v)
    want = np_attention(*(x.astype(np.float64) for x in (q, k, v, bias, d_out)))
    for got, ref in zip((out, *vjp(d_out)), want):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)


@needs_mkl
def test_attention_keeps_a_nan_score_nan():
    """A NaN reaching the scores is not floored into a zero weight: its row's output is NaN (so
    the train step sees a non-finite loss and skips the update), the other rows are untouched."""
    assert mkl.available("mkl")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 24, 2, 16)).astype(np.float32) for _ in range(3))
    q[0, 3, 1, 5] = np.nan
    bias = np.zeros((2, 1, 24), np.float32)
    out = np.array(mkl.attention(q, k, v, bias))
    assert np.isnan(out[0, 3, 1]).all()
    out[0, 3, 1] = 0.0
    assert np.isfinite(out).all()


@needs_mkl
def test_model_logits_and_gradients_match_xla_matmuls():
    def build(matmul):
        cfg = ModelConfig(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            mlp_hidden=48,
        )
        with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
            chosen = kernels.select(kernels.KernelConfig(matmul=matmul), jnp.float32)
            return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), kernels=chosen))

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    results = []
    for matmul in ("mkl", "xla"):
        graphdef, state = build(matmul)
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
        step = jax.jit(jax.value_and_grad(loss))
        hlo = step.lower(state).as_text()
        for name, _ in mkl.TARGETS.values():
            assert (name in hlo) == (matmul == "mkl")
        results.append(step(state))
    (l_mkl, g_mkl), (l_xla, g_xla) = results
    np.testing.assert_allclose(l_mkl, l_xla, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g_mkl), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@needs_mkl
def test_matmul_peak_probe_includes_mkl():
    assert len(metrics._cpu_matmuls("float32")) == 2
    assert len(metrics._cpu_matmuls("bfloat16")) == 1


@needs_mkl
def test_a_failed_build_says_which_line(tmp_path, monkeypatch):
    source = tmp_path / "mkl.cc"
    source.write_text(open(mkl.SOURCE).read() + "\nint broken( {\n")
    monkeypatch.setattr(mkl, "SOURCE", str(source))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    libraries = [
        mkl._wheel_library("mkl", "libmkl_rt.so"),
        mkl._wheel_library("intel-openmp", "libiomp5.so"),
    ]
    with pytest.raises(RuntimeError, match=r"mkl\.cc:\d+:\d+: error: "):
        mkl._compile(libraries)
    assert not list((tmp_path / "llada_jax").glob("*.so"))  # nothing half-built left behind

"""MKL matmuls on XLA:CPU (llada_jax/cpu_blas.py) against numpy, gradients included."""
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import cpu_blas, metrics, sharding
from llada_jax.model import ModelConfig, Transformer

# The test extra installs mkl on Linux x86-64; there the kernel must build, not quietly fall back.
MKL_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"
needs_mkl = pytest.mark.skipif(not MKL_EXPECTED, reason="the mkl wheel is Linux x86-64 only")


@needs_mkl
def test_kernel_builds_and_is_enabled():
    assert cpu_blas._load() == ""
    assert cpu_blas.enabled("auto", jnp.float32) and cpu_blas.enabled("mkl", jnp.float32)


def test_disabled_for_xla_bfloat16_and_sharded_meshes():
    assert not cpu_blas.enabled("xla", jnp.float32)
    assert not cpu_blas.enabled("auto", jnp.bfloat16)
    with sharding.use_mesh(sharding.make_mesh((2, 1, 1), jax.devices()[:2])):
        assert not cpu_blas.enabled("mkl", jnp.float32)


@needs_mkl
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False),
                                             (True, True)])
@pytest.mark.parametrize("batch", [1, 3])
def test_bmm_and_its_gradients_match_numpy(trans_a, trans_b, batch):
    rng = np.random.default_rng(batch)
    m, k, n = 37, 29, 41
    a = rng.standard_normal((batch, k, m) if trans_a else (batch, m, k)).astype(np.float32)
    b = rng.standard_normal((batch, n, k) if trans_b else (batch, k, n)).astype(np.float32)
    r = rng.standard_normal((batch, m, n)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    A = a64.transpose(0, 2, 1) if trans_a else a64
    B = b64.transpose(0, 2, 1) if trans_b else b64

    c = jax.jit(cpu_blas.bmm, static_argnums=(2, 3))(a, b, trans_a, trans_b)
    np.testing.assert_allclose(c, A @ B, rtol=1e-5, atol=1e-4)

    # loss = sum(C * R): dA = R B^T, dB = A^T R, transposed back where the operand was.
    da, db = jax.jit(jax.grad(lambda a, b: jnp.sum(cpu_blas.bmm(a, b, trans_a, trans_b) * r),
                              argnums=(0, 1)))(a, b)
    dA, dB = r @ B.transpose(0, 2, 1), A.transpose(0, 2, 1) @ r
    np.testing.assert_allclose(da, dA.transpose(0, 2, 1) if trans_a else dA, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, dB.transpose(0, 2, 1) if trans_b else dB, rtol=1e-5, atol=1e-4)


@needs_mkl
def test_model_logits_and_gradients_match_xla_matmuls():
    def build(matmul):
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          mlp_hidden=48, matmul=matmul)
        with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
            return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    results = []
    for matmul in ("mkl", "xla"):
        graphdef, state = build(matmul)
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
        hlo = jax.jit(loss).lower(state).as_text()
        assert (cpu_blas.TARGET in hlo) == (matmul == "mkl")
        results.append(jax.jit(jax.value_and_grad(loss))(state))
    (l_mkl, g_mkl), (l_xla, g_xla) = results
    np.testing.assert_allclose(l_mkl, l_xla, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g_mkl), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@needs_mkl
def test_matmul_peak_probe_includes_mkl():
    assert len(metrics._cpu_matmuls("float32")) == 2
    assert len(metrics._cpu_matmuls("bfloat16")) == 1

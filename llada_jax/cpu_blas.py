"""Matmuls on XLA:CPU computed by Intel oneMKL (llada_jax/kernels/cpu_blas.cc, via the XLA FFI).

At the demo's shapes XLA:CPU's own matmuls (YNNPACK, Eigen) reach about 150-175 GFLOP/s on a
2-core AVX-512 machine where MKL reaches 215-230, and XLA runs attention's batched matmuls on one
core; this is where an eager PyTorch step (which calls MKL) gains on a compiled JAX one.

Needs the `mkl` extra (`pip install -e ".[mkl]"`) and a C++ compiler: the kernel is compiled on
first use against jax's XLA FFI headers and libmkl_rt, and cached under $XDG_CACHE_HOME/llada_jax
(else ~/.cache/llada_jax). Where that fails, XLA computes the matmuls (see `enabled`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "cpu_blas.cc")
TARGET = "llada_mkl_matmul"
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "llada_jax")


def _mkl_library() -> str:
    """Path of libmkl_rt from the installed `mkl` wheel; raises RuntimeError if there is none."""
    try:
        dist = importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError('the mkl package is not installed (pip install -e ".[mkl]")') from None
    for f in dist.files or ():
        if os.path.basename(str(f)).startswith("libmkl_rt.so"):
            return os.path.realpath(dist.locate_file(f))
    raise RuntimeError(f"the mkl package {dist.version} has no libmkl_rt.so")


def _compile(mkl: str) -> str:
    """Path of the built kernel (building it if not cached); raises RuntimeError saying why not."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(b"\0".join(
            [f.read(), " ".join(FLAGS).encode(), compiler.encode(), jax.__version__.encode(),
             mkl.encode()])).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"cpu_blas-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    # Built beside its final name and renamed into place, so concurrent processes never load a
    # partly written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    mkl_dir = os.path.dirname(mkl)
    cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), "-o", tmp, SOURCE,
           f"-L{mkl_dir}", f"-l:{os.path.basename(mkl)}", f"-Wl,-rpath,{mkl_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        os.unlink(tmp)
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{compiler} failed: {detail}")
    os.replace(tmp, path)
    return path


@functools.cache
def _load() -> str:
    """Builds and registers the kernel with XLA:CPU; returns why not ("" when it is ready)."""
    try:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(f"oneMKL needs x86-64, this is {platform.machine()}")
        library = ctypes.CDLL(_compile(_mkl_library()))
    except (RuntimeError, OSError) as e:
        return str(e)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.LladaMklMatmul), platform="cpu")
    return ""


@functools.cache
def _warn(reason: str) -> None:
    print(f"warning: model.matmul='mkl' unavailable ({reason}); XLA computes the matmuls",
          file=sys.stderr, flush=True)


def enabled(setting: str, dtype: jnp.dtype) -> bool:
    """Whether a matmul traced now, in `dtype`, under model.matmul=`setting` runs on MKL: float32
    on the CPU backend outside a multi-device mesh (the kernel has no partitioning rule), with the
    kernel built; an explicit "mkl" that cannot be honoured says why once on stderr."""
    if setting == "xla" or jnp.dtype(dtype) != jnp.float32 or jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return False
    reason = _load()
    if reason and setting == "mkl":
        _warn(reason)
    return not reason


def _call(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    m = a.shape[2] if trans_a else a.shape[1]
    n = b.shape[1] if trans_b else b.shape[2]
    out = jax.ShapeDtypeStruct((a.shape[0], m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def bmm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a[i]) @ op(b[i]) for float32 a (N, M, K), or (N, K, M) if trans_a, and b (N, K, P), or
    (N, P, K) if trans_b -> (N, M, P). Only where `enabled`."""
    return _call(a, b, trans_a, trans_b)


def _bmm_fwd(a, b, trans_a, trans_b):
    return _call(a, b, trans_a, trans_b), (a, b)


def _bmm_bwd(trans_a, trans_b, residuals, g):
    # With A = op(a), B = op(b), C = A B: dA = g B^T and dB = A^T g, each then undoing its op.
    a, b = residuals
    da = bmm(b, g, trans_b, True) if trans_a else bmm(g, b, False, not trans_b)
    db = bmm(g, a, True, trans_a) if trans_b else bmm(a, g, not trans_a, False)
    return da, db


bmm.defvjp(_bmm_fwd, _bmm_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, K) @ w (K, N) -> (M, N), float32."""
    return bmm(x[None], w[None])[0]

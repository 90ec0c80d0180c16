"""Matmuls and attention on XLA:CPU computed with Intel oneMKL (mkl.cc here, via the XLA FFI).

XLA:CPU's own matmuls are slower than MKL's at the model's shapes, and XLA runs attention's
batched matmuls on one core; this is where an eager PyTorch step (which calls MKL) gains on a
compiled JAX one. The attention kernel also keeps each block of query rows' L x L scores in
cache, forward and backward. Measurements: docs/performance.md.

Needs the `mkl` extra (`pip install -e ".[mkl]"`, Linux x86-64) and a C++ compiler: the kernels
are compiled on first use against jax's XLA FFI headers, libmkl_rt and libiomp5 for this CPU, and
cached under $XDG_CACHE_HOME/llada_jax (else ~/.cache/llada_jax). Whether a model uses them is
decided once, when it is built (llada_jax/kernels/choice.py); `available` says whether they
can run here.
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

from llada_jax.host.cache import cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mkl.cc")
# The FFI targets: (name registered with XLA, symbol in the library).
TARGETS = {
    "matmul": ("llada_mkl_matmul", "LladaMklMatmul"),
    "attention": ("llada_mkl_attention", "LladaMklAttention"),
    "attention_grad": ("llada_mkl_attention_grad", "LladaMklAttentionGrad"),
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-fopenmp")
# XLA options for a step whose matmuls run here: XLA's remaining (elementwise) work on one thread
# instead of its thread pool, which would compete with MKL's threads for the cores.
STEP_COMPILER_OPTIONS = {"xla_cpu_multi_thread_eigen": False}


def _wheel_library(package: str, prefix: str) -> str:
    """Path of the shared library `prefix`* installed by the wheel `package` (mkl's libmkl_rt,
    intel-openmp's libiomp5); raises RuntimeError if there is none."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f'the {package} package is not installed (pip install -e ".[mkl]")'
        ) from None
    for f in dist.files or ():
        if os.path.basename(str(f)).startswith(prefix):
            return os.path.realpath(dist.locate_file(f))
    raise RuntimeError(f"the {package} package {dist.version} has no {prefix}*")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or ["no output"]
        detail = next((line for line in lines if "error" in line), lines[-1]).strip()
        raise RuntimeError(f"{cmd[0]} failed: {detail}")


def _compile(libraries: list[str]) -> str:
    """Path of the kernel library built against `libraries` (building it if not cached); raises
    RuntimeError saying why not."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    with open(SOURCE, "rb") as f:
        # -march=native: a home directory shared by different CPUs keeps one build per CPU.
        key = hashlib.sha256(
            b"\0".join(
                [
                    f.read(),
                    " ".join(FLAGS).encode(),
                    compiler.encode(),
                    jax.__version__.encode(),
                    *map(str.encode, libraries),
                    _cpu_flags().encode(),
                ]
            )
        ).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"mkl-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        # Compiled with -fopenmp but linked without it: the OpenMP runtime is MKL's libiomp5
        # (which implements GCC's OpenMP ABI), so the kernel's threads are the ones MKL uses.
        _run(
            [
                compiler,
                *FLAGS,
                "-isystem",
                jax.ffi.include_dir(),
                "-c",
                SOURCE,
                "-o",
                os.path.join(tmp, "mkl.o"),
            ]
        )
        link = [compiler, "-shared", os.path.join(tmp, "mkl.o"), "-o", os.path.join(tmp, "mkl.so")]
        for library in libraries:
            link += [
                f"-L{os.path.dirname(library)}",
                f"-l:{os.path.basename(library)}",
                f"-Wl,-rpath,{os.path.dirname(library)}",
            ]
        _run(link)
        # Renamed into place, so concurrent processes never load a partly written library.
        os.replace(os.path.join(tmp, "mkl.so"), path)
    return path


@functools.cache
def _load() -> str:
    """Builds and registers the kernel with XLA:CPU; returns why not ("" when it is ready)."""
    try:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(f"oneMKL needs x86-64, this is {platform.machine()}")
        # Read when libiomp5 starts. By default its idle threads spin for 200 ms after each
        # parallel region, on the cores XLA's threads need next.
        os.environ.setdefault("KMP_BLOCKTIME", "0")
        library = ctypes.CDLL(
            _compile(
                [
                    _wheel_library("mkl", "libmkl_rt.so"),
                    _wheel_library("intel-openmp", "libiomp5.so"),
                ]
            )
        )
    except (RuntimeError, OSError) as e:
        return str(e)
    for name, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(
            name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    return ""


@functools.cache
def _warn(reason: str) -> None:
    print(
        f"warning: the MKL kernels are unavailable ({reason}); XLA computes the matmuls",
        file=sys.stderr,
        flush=True,
    )


def available(setting: str) -> bool:
    """Whether the kernels can run in this process (built and registered with XLA:CPU) for
    kernels.matmul=`setting` ("auto" or "mkl"). Where they cannot, an explicit "mkl", or "auto"
    with the mkl wheel installed, says why once on stderr."""
    reason = _load()
    if reason and (setting == "mkl" or _installed()):
        _warn(reason)
    return not reason


def _installed() -> bool:
    """Whether the mkl wheel is installed (then "auto" falling back to XLA is worth a word)."""
    try:
        importlib.metadata.distribution("mkl")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _call(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    out = jax.ShapeDtypeStruct(
        (a.shape[1] if trans_a else a.shape[0], b.shape[0] if trans_b else b.shape[1]), jnp.float32
    )
    return jax.ffi.ffi_call(TARGETS["matmul"][0], out, vmap_method="sequential")(
        a, b, trans_a=trans_a, trans_b=trans_b
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) for float32 matrices, op transposing where asked: a (M, K) or (K, M) if
    trans_a, b (K, N) or (N, K) if trans_b -> (M, N). Only where `available`."""
    return _call(a, b, trans_a, trans_b)


def _matmul_fwd(a, b, trans_a, trans_b):
    return _call(a, b, trans_a, trans_b), (a, b)


def _matmul_bwd(trans_a, trans_b, residuals, g):
    # With A = op(a), B = op(b), C = A B: dA = g B^T and dB = A^T g, each then undoing its op.
    a, b = residuals
    da = matmul(b, g, trans_b, True) if trans_a else matmul(g, b, False, not trans_b)
    db = matmul(g, a, True, trans_a) if trans_b else matmul(a, g, not trans_a, False)
    return da, db


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v, float32, in the projections' layout: q (B, L, H, D) already
    scaled, k, v (B, L, K, D) with K dividing H (query head h uses kv head h // (H / K)), bias
    (B, 1 or L, L) additive -> (B, L, H, D). The bias gets no gradient. Only where `available`.

    The kernel takes each kv head's G = H / K query heads stacked, (B * K, G * L, D): contiguous
    per work item, which runs faster than reading the projections' layout in place (the
    transposes fuse into the rotary embedding that produces q and k). Each query computes only
    the keys from the first to the last its bias leaves visible (above -1e29): its packed
    segment's, or its row's valid ones; a query that sees no key weighs them all equally."""
    b, length, heads, d = q.shape
    kv = k.shape[2]
    items = lambda x: (
        x.reshape(b, length, kv, -1, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, -1, d)
    )
    out = _attention(items(q), items(k), items(v), bias)
    return out.reshape(b, kv, heads // kv, length, d).transpose(0, 3, 1, 2, 4).reshape(q.shape)


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """The kernel's layout: q (N, G*L, D) for N = B * K items, k, v (N, L, D), bias (B, 1 or L,
    L) shared by the N / B consecutive items of each batch row -> (N, G*L, D)."""
    return _attention_fwd(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
    n, rows, _ = q.shape
    out, lse = jax.ffi.ffi_call(
        TARGETS["attention"][0],
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((n, rows), jnp.float32)),
        vmap_method="sequential",
    )(q, k, v, bias)
    return out, (q, k, v, bias, out, lse)


def _attention_bwd(residuals, g):
    q, k, v, bias, out, lse = residuals
    shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)]
    dq, dk, dv = jax.ffi.ffi_call(TARGETS["attention_grad"][0], shapes, vmap_method="sequential")(
        q, k, v, bias, out, lse, g
    )
    return dq, dk, dv, jnp.zeros_like(bias)


_attention.defvjp(_attention_fwd, _attention_bwd)

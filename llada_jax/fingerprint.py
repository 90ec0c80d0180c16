"""Fingerprints of arrays: a 64-bit checksum of each array's bits, computed where it lives.

A checkpoint records the fingerprint of every array it saves, and a restore recomputes them on
what it read: a flipped byte, a truncated chunk read back as fill values, or a shard swapped for
another's changes the fingerprint. The checksum is computed on the devices holding the (sharded)
array, so it needs no host copy, costs one pass over device memory, and is the same for any mesh
or number of hosts the array is restored onto.

For element i (its row-major index over the whole array) with bits b_i (as uint32),
  lane_k = sum_i mix(mix(b_i ^ SEED_k) + i * GOLDEN)  (mod 2^32),   k = 0, 1
with `mix` murmur3's 32-bit finalizer, a bijection: changing any one element changes the sum,
and unrelated changes cancel with probability 2^-32 per lane.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
SEEDS = (0x243F6A88, 0x85A308D3)  # one per lane: any two distinct constants
GOLDEN = 0x9E3779B9  # spreads consecutive indices over the 32 bits


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's fmix32 on uint32 (wrapping arithmetic)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The array's bits as uint32, one per element (8-byte elements: two, on a new last axis)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _row_major_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's flat row-major index (mod 2^32), built from iotas: no reshape, so a
    sharded array is never gathered."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride = stride * shape[axis] % 2**32
    return index


def _array_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """((2,) uint32 fingerprint, () bool: no NaN/Inf) of one array."""
    bits = _bits(x)
    position = _row_major_index(bits.shape) * jnp.uint32(GOLDEN)
    lanes = [jnp.sum(_mix(_mix(bits ^ jnp.uint32(s)) + position), dtype=jnp.uint32) for s in SEEDS]
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack(lanes), finite


@jax.jit
def _leaf_fingerprints(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """((N, 2) uint32 fingerprints, (N,) bool: no NaN/Inf) of N arrays, replicated."""
    pairs = [_array_fingerprint(x) for x in leaves]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


def key_name(path: tuple) -> str:
    """A tree path as 'a/b/0/c' (dict keys, attribute names and sequence indices alike), the
    name under which a checkpoint records the leaf."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fingerprints(tree: PyTree) -> tuple[dict[str, str], list[str]]:
    """({leaf name: 16 hex digits}, [names of floating leaves holding NaN or Inf]) of a tree of
    arrays (jax or numpy, any sharding). Collective on a multi-process mesh: every process
    calls it with its part of the same global arrays and gets the same answer."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not named:
        return {}, []
    names, leaves = [key_name(path) for path, _ in named], [x for _, x in named]
    if any(isinstance(x, np.ndarray) for x in leaves):  # host arrays (e.g. memory-mapped):
        parts = [_host_fingerprint(np.asarray(x)) for x in leaves]  # in bounded memory
        lanes_Nx2 = np.array([p[0] for p in parts], np.uint64)
        finite_N = np.array([p[1] for p in parts])
    else:
        lanes_Nx2, finite_N = (_local(x) for x in _leaf_fingerprints(leaves))
    sums = {n: f"{int(a):08x}{int(b):08x}" for n, (a, b) in zip(names, lanes_Nx2)}
    return sums, [n for n, ok in zip(names, finite_N) if not ok]


def _host_fingerprint(x: np.ndarray, chunk: int = 1 << 16) -> tuple[tuple[int, int], bool]:
    """The fingerprint and finiteness of a host array, as `_array_fingerprint` computes them,
    `chunk` elements at a time (a memory-mapped parameter is never copied whole)."""
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    flat = x.reshape(-1)
    bits = (flat.astype(np.uint8) if x.dtype == np.bool_ else flat).view(width)
    lanes, finite, mask = [0] * len(SEEDS), True, np.uint64(0xFFFFFFFF)
    for start in range(0, bits.size, chunk):
        b = bits[start : start + chunk].astype(np.uint64)
        position = (np.arange(start, start + b.size, dtype=np.uint64) * np.uint64(GOLDEN)) & mask
        for k, seed in enumerate(SEEDS):
            mixed = _host_mix((_host_mix(b ^ np.uint64(seed)) + position) & mask)
            lanes[k] = (lanes[k] + int(mixed.sum(dtype=np.uint64))) % 2**32
    if jnp.issubdtype(x.dtype, jnp.inexact):  # bfloat16 included
        for start in range(0, flat.size, chunk):
            finite = finite and bool(np.isfinite(flat[start : start + chunk]).all())
    return (lanes[0], lanes[1]), finite


def _host_mix(h: np.ndarray) -> np.ndarray:
    """`_mix` in numpy, on uint64 holding 32-bit values."""
    mask = np.uint64(0xFFFFFFFF)
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & mask
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & mask
    return h ^ (h >> np.uint64(16))


def _local(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this process."""
    return np.asarray(x.addressable_data(0))

"""Device mesh and logical-axis rules.

Parameters and activations are named by logical axes (batch, vocab, embed, heads, kv_heads,
head_dim, mlp, layers); the rules below map them to the mesh axes (slice, data, fsdp, tensor).
The same config runs on one device, on a pod slice and on several slices: only the `mesh`
section changes.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# "slice": the TPU slices joined over the data-center network (DCN), size mesh.num_slices.
MESH_AXES = ("slice", "data", "fsdp", "tensor")
# The batch is split over every axis but tensor. No rule names "slice": parameters are
# replicated across slices, so only data parallelism (gradient all-reduces) crosses the DCN.
BATCH_AXES = ("slice", "data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(
    shape: Sequence[int], devices: Sequence[jax.Device] | None = None, num_slices: int = 1
) -> Mesh:
    """Mesh (slice, data, fsdp, tensor) of shape (num_slices, *shape): `shape` is (data, fsdp,
    tensor) within one slice, one entry may be -1 (the slice's remaining devices).

    Each slice's devices are laid out as `jax.make_mesh` lays out a single slice (along the TPU
    torus), and the slices are stacked along "slice": the array of
    `mesh_utils.create_hybrid_device_mesh((1, *shape), (num_slices, 1, 1, 1))`, which, unlike
    `jax.make_mesh`, would refuse meshes that split a v5e's physical axes. Slices are the
    devices' `slice_index` (multislice TPU, a libtpu topology of several slices); devices
    without one (CPU, GPU) are cut into num_slices contiguous groups.
    """
    groups = _slice_groups(list(jax.devices() if devices is None else devices), num_slices)
    shape = _slice_shape(shape, len(groups[0]), num_slices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    per_slice = [
        jax.make_mesh((1, *shape), MESH_AXES, axis_types=axis_types, devices=g).devices
        for g in groups
    ]
    return Mesh(np.concatenate(per_slice), MESH_AXES, axis_types=axis_types)


def _slice_groups(devices: list[jax.Device], num_slices: int) -> list[list[jax.Device]]:
    """The devices of each slice, in slice order: num_slices lists of equal length."""
    if num_slices < 1:
        raise ValueError(f"mesh.num_slices={num_slices} must be at least 1")
    if hasattr(devices[0], "slice_index"):
        by_index: dict[int, list[jax.Device]] = collections.defaultdict(list)
        for d in devices:
            by_index[d.slice_index].append(d)
        groups = [by_index[i] for i in sorted(by_index)]
        if len(groups) != num_slices:
            raise ValueError(
                f"mesh.num_slices={num_slices} but the {len(devices)} devices are in "
                f"{len(groups)} slice(s)"
            )
    else:
        if len(devices) % num_slices:
            raise ValueError(
                f"mesh.num_slices={num_slices} does not divide the {len(devices)} devices"
            )
        n = len(devices) // num_slices
        groups = [devices[i * n : (i + 1) * n] for i in range(num_slices)]
    if len({len(g) for g in groups}) > 1:
        raise ValueError(
            f"mesh.num_slices={num_slices}: the slices have unequal device counts "
            f"{[len(g) for g in groups]}"
        )
    return groups


def _slice_shape(shape: Sequence[int], n: int, num_slices: int) -> tuple[int, ...]:
    """`shape` (data, fsdp, tensor) with its -1 resolved against the n devices of a slice."""
    shape = list(shape)
    where = f"{n} devices" + (
        f" in each of the mesh.num_slices={num_slices} slices" if num_slices > 1 else ""
    )
    if len(shape) != len(MESH_AXES) - 1 or shape.count(-1) > 1:
        raise ValueError(
            f"mesh.shape={tuple(shape)} must have {len(MESH_AXES) - 1} entries "
            f"{MESH_AXES[1:]} with at most one -1"
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if known <= 0 or n % known:
            raise ValueError(f"mesh.shape={tuple(shape)} does not divide the {where}")
        shape[shape.index(-1)] = n // known
    if int(np.prod(shape)) != n:
        raise ValueError(
            f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices but there are {where}"
        )
    return tuple(shape)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (product of the batch mesh axes, slices included)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of (B, ...) arrays: batch split over the data-parallel axes (slice, data,
    fsdp)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def logical_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]] | None = None) -> P:
    """PartitionSpec of logical axis names under `rules` (default: the active
    `nnx.logical_axis_rules`, else DEFAULT_RULES); None and unknown names stay unsharded."""
    if rules is None:
        rules = flax_spmd.get_logical_axis_rules() or DEFAULT_RULES
    table = dict(rules)
    return P(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names, e.g. ("batch", None, None)
    for the residual stream: keeps the partitioner from choosing a layout that follows a
    parameter (an FSDP-sharded embedding) instead of the batch. A no-op outside a mesh context
    (`use_mesh` / `jax.set_mesh`), e.g. in single-device sampling and tests."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[None]:
    """Sets the mesh and logical rules, for creating sharded parameters and tracing steps."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
        yield


class OnMesh:
    """A jitted function traced (called or lowered) under a mesh and logical rules, so that the
    model's activation sharding constraints (`constrain`) apply: what `jit_on_mesh` returns.
    `mesh` is the mesh it runs on; `lower(*args)` lowers it as `jax.jit`'s does."""

    def __init__(self, jitted: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args: Any) -> Any:
        with use_mesh(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        """The jitted function lowered for `args` under the mesh and rules: `jax.jit`'s
        `Lowered`, to `.compile()`."""
        with use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args)


def jit_on_mesh(
    fn: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES, **jit_kwargs: Any
) -> OnMesh:
    """`jax.jit(fn, **jit_kwargs)` (in_shardings, out_shardings, donate_argnums, ...) traced,
    called and lowered under `mesh` and `rules`: the one way a jitted function runs on a mesh
    (the sampler, the scorers, the training step)."""
    return OnMesh(jax.jit(fn, **jit_kwargs), mesh, rules)


def to_devices(x_B: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (B, ...) that every process holds whole and alike (prompts, held-out rows)
    as a global array split over the batch axes: what a jitted function on a multi-process
    mesh takes (it refuses host arrays there)."""
    x_B = np.asarray(x_B)
    return jax.make_array_from_callback(x_B.shape, batch_sharding(mesh), lambda index: x_B[index])


def to_host(x: jax.Array) -> np.ndarray:
    """A jax array's whole value on this host: gathered from every process when its shards
    span several (a collective: every process calls it)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

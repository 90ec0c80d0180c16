"""Device mesh and logical-axis rules.

Parameters and activations are named by logical axes (batch, vocab, embed, heads, kv_heads,
head_dim, mlp, layers); the rules below map them to the mesh axes (data, fsdp, tensor). The
same config runs on one device and on a pod: only the `mesh` section changes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

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


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over (data, fsdp, tensor); one entry of `shape` may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
        raise ValueError(
            f"mesh.shape={tuple(shape)} must have {len(MESH_AXES)} entries "
            f"{MESH_AXES} with at most one -1"
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"mesh.shape={tuple(shape)} does not divide the {len(devices)} devices"
            )
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices "
            f"but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (product of the batch mesh axes)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of (B, ...) arrays: batch split over the data-parallel axes."""
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

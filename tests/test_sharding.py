"""The same config on 1 device and on 8 fake devices under several meshes: same loss and
gradients; parameters stored sharded as the logical-axis rules say."""

import functools

import jax
import numpy as np
import pytest

from llada_jax import config, sharding, train_step
from llada_jax import run as run_lib
from llada_jax.data import pipeline

# heads, kv heads, mlp and vocab all divide 8, so every mesh below can shard them.
OVERRIDES = [("model.n_heads", "8"), ("model.n_kv_heads", "8"), ("train.steps", "4")]
# (mesh.shape, mesh.num_slices): the last one is two slices of (data 2, fsdp 2).
MESHES = [((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1), ((1, 1, 8), 1), ((2, 2, 1), 2)]


def loss_and_grads(mesh_shape, workdir, devices=None, num_slices=1):
    mesh = [("mesh.shape", str(mesh_shape)), ("mesh.num_slices", str(num_slices))]
    cfg = config.load("configs/tiny.py", OVERRIDES + mesh)
    run = run_lib.build_run(cfg, workdir=workdir, devices=devices)
    graphdef, params, _ = run_lib.create_state(run)
    step_cfg = run.step_cfg
    batch = pipeline.to_global(run.batches[0], run.mesh, cfg.data.batch_size)

    @jax.jit
    def f(params, batch):
        noised = train_step.noise(jax.random.key(0), batch, step_cfg)
        grad_fn = jax.value_and_grad(functools.partial(train_step.loss_fn, graphdef), has_aux=True)
        (loss, _), grads = grad_fn(params, noised)
        return loss, grads

    with sharding.use_mesh(run.mesh):
        loss, grads = f(params, batch)
    return float(loss), jax.tree.map(np.asarray, grads), params


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return loss_and_grads((1, 1, 1), str(tmp_path_factory.mktemp("one")), jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape,num_slices", MESHES)
def test_loss_and_grads_match_one_device(single, mesh_shape, num_slices, tmp_path):
    loss1, grads1, _ = single
    loss, grads, params = loss_and_grads(mesh_shape, str(tmp_path), num_slices=num_slices)
    assert loss == pytest.approx(loss1, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads, grads1)
    # Per-device bytes: each dimension is split by the size of the mesh axes its logical name
    # maps to (embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor; none -> slice), computed
    # here by hand.
    split = {
        "embed": mesh_shape[1],
        "vocab": mesh_shape[2],
        "heads": mesh_shape[2],
        "kv_heads": mesh_shape[2],
        "mlp": mesh_shape[2],
    }
    leaves = jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "get_metadata"))
    for var in leaves:
        value = var.get_value()
        names = var.get_metadata()["out_sharding"]
        want = value.nbytes // int(np.prod([split.get(n, 1) for n in names]))
        shard = value.addressable_shards[0].data
        assert shard.nbytes == want, (names, value.shape, shard.shape)


def test_two_slice_mesh_on_fake_devices():
    """Devices without a slice_index (CPU) are cut into contiguous slices, stacked along the
    leading "slice" axis; a -1 is resolved within a slice."""
    devices = jax.devices()
    mesh = sharding.make_mesh((1, 2, 2), devices, num_slices=2)
    assert mesh.axis_names == ("slice", "data", "fsdp", "tensor") == sharding.MESH_AXES
    assert dict(mesh.shape) == {"slice": 2, "data": 1, "fsdp": 2, "tensor": 2}
    assert [d.id for d in mesh.devices[0].flat] == [d.id for d in devices[:4]]
    assert [d.id for d in mesh.devices[1].flat] == [d.id for d in devices[4:]]
    assert dict(sharding.make_mesh((-1, 1, 1), devices, 2).shape) == {
        "slice": 2,
        "data": 4,
        "fsdp": 1,
        "tensor": 1,
    }
    # One slice: today's mesh behind a leading axis of size 1.
    one = sharding.make_mesh((2, 2, 2), devices)
    assert dict(one.shape) == {"slice": 1, "data": 2, "fsdp": 2, "tensor": 2}
    assert [d.id for d in one.devices.flat] == [d.id for d in devices]


def test_batch_is_split_over_slice_data_and_fsdp():
    """Row block of the device at mesh position (s, d, f, t): (s * data + d) * fsdp + f, the
    same on every tensor replica."""
    mesh = sharding.make_mesh((2, 1, 2), jax.devices(), num_slices=2)
    assert sharding.data_parallel_size(mesh) == 4
    held = sharding.batch_sharding(mesh).devices_indices_map((8, 3))
    for (s, d, f, t), device in np.ndenumerate(mesh.devices):
        block = (s * 2 + d) * 1 + f
        assert held[device][0] == slice(2 * block, 2 * block + 2), (s, d, f, t)


def test_parameters_are_never_sharded_over_slice():
    """Parameter and optimizer-state shardings on two slices are those of one slice (so
    checkpoints restore either way); only the batch crosses slices."""
    assert all(
        "slice" not in ((axes,) if isinstance(axes, str) else axes or ())
        for name, axes in sharding.DEFAULT_RULES
        if name != "batch"
    )

    def specs(num_slices):
        cfg = config.load(
            "configs/tiny.py", [("mesh.shape", "(1,2,2)"), ("mesh.num_slices", str(num_slices))]
        )
        run = run_lib.build_run(cfg, data=False, devices=jax.devices()[: 4 * num_slices])
        _, params, opt_state = run_lib.abstract_state(run)
        return run.mesh, [x.sharding.spec for x in jax.tree.leaves((params, opt_state))]

    mesh, two = specs(2)
    assert dict(mesh.shape) == {"slice": 2, "data": 1, "fsdp": 2, "tensor": 2}
    _, one = specs(1)
    assert two == one and any(spec != jax.sharding.PartitionSpec() for spec in two)
    assert not any("slice" in str(spec) for spec in two)


def test_jit_on_mesh_traces_under_the_mesh_so_constraints_apply():
    """A function that constrains its result to the batch axes: jitted on the mesh (called or
    lowered) the result is split over them; plain jax.jit, outside any mesh, ignores it."""
    mesh = sharding.make_mesh((4, 1, 2), jax.devices())
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = lambda x: sharding.constrain(x * 2, ("batch", None))  # noqa: E731
    x = jax.device_put(np.arange(16.0).reshape(8, 2), replicated)
    on_mesh = sharding.jit_on_mesh(fn, mesh, in_shardings=(replicated,))
    assert on_mesh.mesh is mesh
    want = sharding.batch_sharding(mesh)
    assert on_mesh(x).sharding.is_equivalent_to(want, 2)
    assert on_mesh.lower(x).compile()(x).sharding.is_equivalent_to(want, 2)
    np.testing.assert_array_equal(np.asarray(on_mesh(x)), np.asarray(x) * 2)
    assert jax.jit(fn)(x).sharding.is_fully_replicated


@pytest.mark.parametrize(
    "shape,num_slices,message",
    [
        ((-1, 1, 1), 3, "mesh.num_slices=3 does not divide the 8 devices"),
        ((-1, 1, 1), 0, "mesh.num_slices=0 must be at least 1"),
        ((3, -1, 1), 2, r"mesh.shape=\(3, -1, 1\) does not divide the 4 devices in each of "),
        ((2, 2, 2), 2, r"mesh.shape=\(2, 2, 2\) needs 8 devices but there are 4 devices in "),
        ((3, 1, 1), 1, r"mesh.shape=\(3, 1, 1\) needs 3 devices but there are 8 devices$"),
        ((2, 2), 1, r"mesh.shape=\(2, 2\) must have 3 entries"),
    ],
)
def test_bad_mesh_counts_give_one_line(shape, num_slices, message):
    with pytest.raises(ValueError, match=message) as e:
        sharding.make_mesh(shape, jax.devices(), num_slices)
    assert "\n" not in str(e.value)

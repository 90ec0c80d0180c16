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
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]


def loss_and_grads(mesh_shape, workdir, devices=None):
    cfg = config.load("configs/tiny.py", OVERRIDES + [("mesh.shape", str(mesh_shape))])
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


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_loss_and_grads_match_one_device(single, mesh_shape, tmp_path):
    loss1, grads1, _ = single
    loss, grads, params = loss_and_grads(mesh_shape, str(tmp_path))
    assert loss == pytest.approx(loss1, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads, grads1)
    # Per-device bytes: each dimension is split by the size of the mesh axes its logical name
    # maps to (embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor), computed here by hand.
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

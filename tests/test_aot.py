"""tools/aot_compile.py on the 8 fake CPU devices (no libtpu needed): the trainer's step compiled
ahead of time over abstract state, and its per-device memory report checked against the state
the trainer really allocates."""

import importlib.util
import math
import os

import jax
import pytest
from jax.experimental import mesh_utils

from llada_jax import config as config_lib
from llada_jax import run as run_lib
from llada_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "aot_compile", os.path.join(ROOT, "tools", "aot_compile.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


def test_tpu_names_map_to_topologies(tool):
    assert tool.topology_for("v5p-128") == "v5p:4x4x4"  # TensorCores: 64 chips
    assert tool.topology_for("v5p-8") == "v5p:2x2x1"
    assert tool.topology_for("v5p-32") == "v5p:2x2x4"
    assert tool.topology_for("v5litepod-16") == "v5e:4x4"  # chips
    assert tool.topology_for("v6e-64") == "v6e:8x8"
    with pytest.raises(ValueError):
        tool.topology_for("v5p-12")


def test_abstract_state_matches_create_state():
    cfg = config_lib.load("configs/tiny.py", [("mesh.shape", "(2,2,2)")])
    run = run_lib.build_run(cfg, data=False)
    _, params, opt_state = run_lib.abstract_state(run)
    _, real_params, real_opt = run_lib.create_state(run)
    abstract, real = jax.tree.leaves((params, opt_state)), jax.tree.leaves((real_params, real_opt))
    assert len(abstract) == len(real)
    for a, r in zip(abstract, real):
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
        assert a.sharding.is_equivalent_to(r.sharding, r.ndim), (a.sharding, r.sharding)
    # Adam's moments are sharded like the parameters (a bare jax.jit(tx.init) replicates them).
    param_specs = {
        jax.tree_util.keystr(p): x.sharding
        for p, x in jax.tree_util.tree_leaves_with_path(real_params)
    }
    moments = 0
    for path, x in jax.tree_util.tree_leaves_with_path(real_opt):
        key = jax.tree_util.keystr(path)
        for name in (".mu", ".nu"):
            if name in key:
                moments += 1
                want = param_specs[key[key.index(name) + len(name) :]]
                assert x.sharding.is_equivalent_to(want, x.ndim), (key, x.sharding, want)
    assert moments == 2 * len(param_specs)


def test_cpu_aot_report_memory_matches_the_state(tool):
    """Argument bytes per device = the state's bytes per device (measured on the arrays the
    trainer creates) + the batch's rows on one device + the step scalar."""
    cfg = config_lib.load("configs/tiny.py", [("mesh.shape", "(2,2,2)")])
    report = tool.aot_report(cfg, jax.devices("cpu"), estimate=False)
    mem = report["memory"]
    for key in ("arguments", "outputs", "temporaries", "peak"):
        assert mem[key] > 0, (key, mem)
    run = run_lib.build_run(cfg, data=False)
    _, params, opt_state = run_lib.create_state(run)
    state = jax.tree.leaves((params, opt_state))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in state)
    assert per_device == mem["state"]
    # Independently of the shardings' bookkeeping: the total state over the shard counts.
    total = sum(x.nbytes for x in state)
    assert per_device < total  # actually sharded
    dp = sharding.data_parallel_size(run.mesh)
    batch_bytes = cfg.data.batch_size // dp * cfg.data.seq_len * 4
    assert mem["arguments"] == per_device + batch_bytes + 4
    # Donation: the new state reuses the old state's buffers.
    assert mem["aliased"] == per_device
    assert report["chips"] == 8
    assert report["mesh"] == {"slice": 1, "data": 2, "fsdp": 2, "tensor": 2}


def test_kernel_matmuls_counts_splash_calls(tool):
    """Splash-attention kernels are Mosaic custom calls that XLA's cost analysis counts as free;
    the tool counts their L x L x head_dim matmuls from the optimized HLO instead (lines in the
    form libtpu prints them)."""
    line = (
        "  %{} = (bf16[5,32,4096,128]{{3,2,1,0}}) custom-call(%a, %b), "
        'custom_call_target="tpu_custom_call", backend_config={{}}'
    )
    fused = "\n".join(
        [
            line.format("splash_mha_fwd_segmented_residuals.1"),
            line.format("splash_mha_fwd_segmented_residuals.2"),  # remat recompute
            line.format("splash_mha_dkv_segmented_no_residuals"),
            "  %fusion.3 = bf16[8] fusion(%x), kind=kLoop",
        ]
    )
    assert tool.kernel_matmuls(fused) == 2 + 2 + 5
    unfused = "\n".join(
        [
            line.format("splash_mha_fwd_residuals.7"),
            line.format("splash_mha_dkv_no_residuals.1"),
            line.format("splash_mha_dq_no_residuals.1"),
        ]
    )
    assert tool.kernel_matmuls(unfused) == 2 + 4 + 3
    assert tool.kernel_matmuls("  %dot.1 = f32[4,4] dot(%a, %b)") == 0
    cfg = config_lib.load("configs/tiny.py", [("kernels.attention", "splash")])
    # One matmul over a chip's sequences: batch 8 / 4 data-parallel chips, heads 4 / 2 tensor.
    m = cfg.model
    want = 2.0 * (8 / 4) * cfg.data.seq_len**2 * (m.n_heads / 2) * (m.d_model // m.n_heads)
    assert tool.attention_matmul_flops(cfg, 8, {"data": 2, "fsdp": 2, "tensor": 2}) == want


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) is not installed"
)


@needs_libtpu
def test_two_slice_topology_mesh(tool):
    """libtpu's two-slice topologies: each slice on one index of the "slice" axis, laid out as
    create_hybrid_device_mesh lays it out (v5p), also where that refuses to split v5e axes."""
    devices = tool.topology_devices("v5p:2x2x1", num_slices=2)
    mesh = sharding.make_mesh((1, 4, 1), devices, num_slices=2)
    hybrid = mesh_utils.create_hybrid_device_mesh((1, 1, 4, 1), (2, 1, 1, 1), devices)
    assert mesh.devices.tolist() == hybrid.tolist()
    assert [{d.slice_index for d in mesh.devices[s].flat} for s in (0, 1)] == [{0}, {1}]
    with pytest.raises(ValueError, match="mesh.num_slices=1 but the 8 devices are in 2 slice"):
        sharding.make_mesh((1, 4, 1), devices)
    v5e = tool.topology_devices("v5e:4x4", num_slices=2)
    assert dict(sharding.make_mesh((2, 4, 2), v5e, num_slices=2).shape)["slice"] == 2


@needs_libtpu
def test_two_slice_tpu_compile(tool):
    """The trainer's step compiles for two v5p:2x2x1 slices: parameters split over fsdp within a
    slice and replicated across slices, the batch over all 8 chips (1 row each)."""
    cfg = config_lib.load("configs/tiny.py", [("mesh.shape", "(1,-1,1)"), ("mesh.num_slices", "2")])
    devices = tool.topology_devices("v5p:2x2x1", 2)
    report = tool.aot_report(cfg, devices, estimate=False)
    assert report["chips"] == 8
    assert report["mesh"] == {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1}
    assert report["memory"]["fits"] and report["memory"]["temporaries"] > 0
    # Per chip, the state is that of one slice alone (TPU arguments add tile padding).
    config_lib.set_key(cfg, "mesh.num_slices", 1)
    one = run_lib.build_run(cfg, devices=devices[:4], data=False)
    state = jax.tree.leaves(run_lib.abstract_state(one)[1:])
    per_chip = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in state)
    assert report["memory"]["state"] == per_chip


def test_collective_summary_counts_dcn_transfers(tool):
    """Across slices an all-reduce is a send to libtpu's multislice runtime (and a recv): one
    "dcn all-reduce" per send, as libtpu prints them."""
    transfer = (
        "  %{op}.52 = (bf16[256,8,128]{{2,1,0:T(8,128)(2,1)}}, u32[], token[]) {op}(%a), "
        "channel_id=4, is_host_transfer=true, frontend_attributes={{_xla_host_transfer_handler_"
        'name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",'
        '_xla_megascale_target="{{1,2}}x{{0:15}}",_xla_megascale_transfer_type="ALL_REDUCE"}}'
    )
    hlo = "\n".join(
        [
            transfer.format(op="send"),
            transfer.format(op="recv"),
            "  %all-reduce.1 = f32[1,1,128]{2,1,0} all-reduce(%b), replica_groups={{0,1}}",
        ]
    )
    summary = tool.collective_summary(hlo)
    assert summary["dcn all-reduce"] == {"bf16[256,8,128]": 1}
    assert summary["all-reduce"] == {"f32[1,1,128]{2,1,0}": 1}

"""tools/aot_compile.py on the 8 fake CPU devices (no libtpu needed): the trainer's step compiled
ahead of time over abstract state, and its per-device memory report checked against the state
the trainer really allocates."""

import importlib.util
import os

import jax
import pytest

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
    assert report["chips"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}


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
    cfg = config_lib.load("configs/tiny.py", [("model.attention", "splash")])
    # One matmul over a chip's sequences: batch 8 / 4 data-parallel chips, heads 4 / 2 tensor.
    m = cfg.model
    want = 2.0 * (8 / 4) * cfg.data.seq_len**2 * (m.n_heads / 2) * (m.d_model // m.n_heads)
    assert tool.attention_matmul_flops(cfg, 8, {"data": 2, "fsdp": 2, "tensor": 2}) == want

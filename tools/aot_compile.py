"""Ahead-of-time compilation of the real training step for a TPU topology, on this (CPU) machine.

  python tools/aot_compile.py --config=configs/llada_8b.py [--tpu=v5p-128 | --topology=v5p:4x4x4]
      [--config.key=value ...] [--json] [--dump_hlo=DIR] [--platform=tpu|cpu]

Needs libtpu (the `tpu` extra: pip install -e ".[tpu]"); no TPU is used or needed, the process's
default backend stays the CPU. `--platform=cpu` compiles for this machine's CPU devices instead
(no libtpu; what the tests use). `--tpu` / `--topology` name one slice; with
`--config.mesh.num_slices=N` the topology is N such slices joined over the data-center network
(multislice), the batch split across them.

The step is the trainer's own (`run.make_step_fn` over `run.abstract_state`: same shardings,
donation, remat, grad accumulation), lowered with abstract arguments, so nothing is allocated.
Reported, per chip: XLA's memory analysis (arguments = params + optimizer state + batch; outputs;
temporaries; peak = arguments + outputs - aliased (donated) + temporaries + code) against the
chip's HBM; XLA's FLOPs and estimated step time (see `estimate_cost`), and the MFU and tokens/s
they imply, with the model FLOPs of `metrics.train_flops_per_token` (attention counted as the
full bidirectional L x L work; remat recomputation not counted).

About the time estimate: `cost_analysis()['optimal_seconds']` is XLA's per-op performance model
summed over the ops of the program (for a large bf16 matmul on v5p it gives ~86% of the chip's
peak, so it is not a bare roofline); it assumes collectives overlap perfectly or cost what the
model says, and ignores host, input pipeline and launch overheads. Treat the MFU it implies as an
upper estimate for a well-tuned run, not a measurement. XLA's cost analysis counts the body of a
while loop (lax.scan) once, so it is not taken from the scanned program: the step is compiled
again, unrolled, with 1 and 2 layers (grad_accum 1, at the micro-batch size) and the per-layer
cost is extrapolated linearly to n_layers and multiplied by grad_accum. Those two programs are
compiled without windowed einsums (see NO_WINDOWED_EINSUM), whose loops would be counted once
too; a report whose counted FLOPs still fall short of the model's carries a warning. On several
slices (`mesh.num_slices`) the estimate is one slice's, at its share of the batch: the gradient
all-reduces between slices (over the DCN) are not counted.

With `kernels.attention=splash` the attention runs in Pallas kernels (Mosaic custom calls), which
the cost analysis counts as zero FLOPs and zero seconds. Their work is counted from the kernel
calls in the optimized HLO (L x L x head_dim matmuls per call: forward 2, fused backward 5) and
their time is that work at `--kernel_efficiency` of the chip's peak, an assumption printed with
the result (default 50%; XLA's model gives large bf16 matmuls ~86%).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices are abstract (a topology)
# Describing a topology takes libtpu's lock file (/tmp/libtpu_lockfile), which any process that
# merely loaded libtpu may hold; no TPU is used here, so there is nothing to guard.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import config as config_lib  # noqa: E402
from llada_jax import metrics, sections, sharding  # noqa: E402
from llada_jax import run as run_lib  # noqa: E402
from llada_jax.kernels import splash  # noqa: E402
from llada_jax.kernels.attention import Blocks  # noqa: E402
from llada_jax.model import ModelConfig  # noqa: E402

FLAGS = flags.FLAGS
config_lib.define_flags()  # --config=configs/<name>.py[:variant]
flags.DEFINE_string(
    "tpu",
    None,
    "Cloud TPU name: v5p-128 (TensorCores), v5litepod-16 / v5e-16, "
    "v6e-16 (chips), v4-32 (TensorCores)",
)
flags.DEFINE_string("topology", None, "libtpu topology name, e.g. v5p:4x4x4, v5e:4x4, v6e:4x4")
flags.DEFINE_enum("platform", "tpu", ["tpu", "cpu"], "Compile for a TPU topology or this CPU")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table")
flags.DEFINE_string("dump_hlo", None, "Write the optimized HLO and a collective summary here")
flags.DEFINE_float(
    "kernel_efficiency",
    0.5,
    "Fraction of the chip's peak FLOP/s assumed for the "
    "Pallas attention kernels, whose time XLA's cost model does not estimate",
)
flags.DEFINE_bool(
    "estimate",
    True,
    "Also compile the 1- and 2-layer programs for the time estimate (the FLOPs / time / MFU lines)",
)

GiB = 1024**3
# HBM per chip, by a substring of the device kind (first match wins: "lite" before "v5").
HBM_BYTES: dict[str, int] = {
    "TPU v5 lite": 16 * GiB,
    "TPU v6 lite": 32 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v4": 32 * GiB,
}
# --tpu prefix -> (libtpu topology prefix, TensorCores per chip in the name's count, dims).
TPU_FAMILIES = {
    "v5p": ("v5p", 2, 3),
    "v4": ("v4", 2, 3),
    "v5litepod": ("v5e", 1, 2),
    "v5e": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}


def topology_for(tpu: str) -> str:
    """`v5p-128` -> `v5p:4x4x4`: v5p / v4 names count TensorCores (2 per chip), v5e / v6e chips.
    The chips are laid out as the smallest torus sides, powers of two, largest last."""
    family, _, count = tpu.rpartition("-")
    if family not in TPU_FAMILIES or not count.isdigit():
        raise ValueError(
            f"--tpu={tpu!r}: expected one of {sorted(TPU_FAMILIES)} followed by "
            f"-<count>, e.g. v5p-128"
        )
    prefix, cores, dims = TPU_FAMILIES[family]
    chips = int(count) // cores
    if chips < 1 or chips & (chips - 1) or int(count) % cores:
        raise ValueError(f"--tpu={tpu!r}: {chips} chips is not a power of two")
    sides = [1] * dims
    while math.prod(sides) < chips:  # double the smallest side: 2x2x1, 2x2x2, 2x2x4, 2x4x4, ...
        sides[sides.index(min(sides))] *= 2
    if 1 not in sides:
        sides.sort()
    return f"{prefix}:{'x'.join(str(s) for s in sides)}"


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
    """Abstract devices of num_slices TPU slices of `topology` (libtpu; nothing is attached),
    each carrying its `slice_index`."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology,
            chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=num_slices,
        )
    except RuntimeError as e:  # jax.errors.JaxRuntimeError from libtpu
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"libtpu cannot describe {num_slices} slice(s) of {topology} on this machine: {first}"
        ) from e
    return list(topo.devices)


def lower_step(run: run_lib.Run) -> tuple[Any, tuple]:
    """The trainer's jitted step, lowered over abstract state and batch."""
    graphdef, params, opt_state = run_lib.abstract_state(run)
    step_fn = run_lib.make_step_fn(run, graphdef, params, opt_state)
    cfg = run.cfg
    batch = {
        "tokens": jax.ShapeDtypeStruct(
            (cfg.data.batch_size, cfg.data.seq_len),
            jnp.int32,
            sharding=sharding.batch_sharding(run.mesh),
        )
    }
    step = jax.ShapeDtypeStruct(
        (), jnp.int32, sharding=jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    )
    return step_fn.lower(params, opt_state, batch, step), (params, opt_state, batch)


def _variant(cfg: config_lib.ConfigDict, **changes: Any) -> config_lib.ConfigDict:
    c = config_lib.ConfigDict(cfg.to_dict())
    for key, value in changes.items():
        config_lib.set_key(c, key.replace("__", "."), value)
    return c


KERNEL_CALL = re.compile(r"%(splash_\w+?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"")
# Attention matmuls of one splash kernel call, in units of one (L x L x head_dim) matmul:
# forward S = QK^T and O = PV; the fused backward recomputes S, then dP, dV, dK and dQ; the
# unfused one splits that into a dkv kernel (S, dP, dV, dK) and a dq kernel (S, dP, dQ).
KERNEL_MATMULS = {"fwd": 2, "dkv": 4, "dq": 3}


def kernel_matmuls(hlo: str) -> int:
    """L x L x head_dim matmuls done by the splash-attention kernels in optimized HLO text."""
    calls = collections.Counter(m.group(1) for m in KERNEL_CALL.finditer(hlo))
    fused = not any("_dq" in name for name in calls)
    total = 0
    for name, count in calls.items():
        phase = next(p for p in KERNEL_MATMULS if f"_{p}" in name)
        total += count * (KERNEL_MATMULS[phase] + (phase == "dkv" and fused))
    return total


def attention_matmul_flops(cfg: config_lib.ConfigDict, chips: int, mesh_shape: dict) -> float:
    """FLOPs of one attention matmul of a splash kernel call over a chip's share of one
    micro-batch: (L x L x head_dim), or for a block-diffusion model the (2L x 2L x head_dim)
    pattern's tiles that the kernel computes (those it does not skip)."""
    m, length = sections.from_section(ModelConfig, cfg.model), cfg.data.seq_len
    sequences = cfg.data.batch_size // cfg.optim.grad_accum / (chips // mesh_shape["tensor"])
    pairs = length * length
    if cfg.diffusion.block_size:
        visible = Blocks(cfg.diffusion.block_size, clean_copy=True).visible(2 * length)
        pairs = splash.computed_pairs(visible)
    return 2.0 * sequences * pairs * m.n_heads / mesh_shape["tensor"] * m.head_dim


# XLA's TPU compiler may split a sharded matmul into a loop of partial matmuls and
# collective-permutes (a windowed einsum), and its cost analysis counts a loop body once. The
# estimate's programs are compiled without them: the same matmuls, with communication overlapped
# differently.
NO_WINDOWED_EINSUM = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def estimate_cost(cfg: config_lib.ConfigDict, devices: Sequence[jax.Device]) -> dict[str, float]:
    """XLA's per-chip FLOPs, bytes accessed and estimated seconds of one full step, from unrolled
    1- and 2-layer compiles at the micro-batch size (see the module docstring), plus the FLOPs of
    the attention kernels, which XLA's cost analysis does not see.

    On several slices the programs are one slice's, at its share of the batch (the same work per
    chip): XLA times programs with transfers between slices below zero (libtpu 0.0.42: -4.9 s
    and -7.9 s for the 1B model on two v5p slices), so the estimate leaves out the gradient
    all-reduces over the DCN."""
    slices = cfg.mesh.num_slices
    if slices > 1:
        devices = list(sharding.make_mesh(cfg.mesh.shape, devices, slices).devices[0].flat)
        cfg = _variant(cfg, mesh__num_slices=1, data__batch_size=cfg.data.batch_size // slices)
    accum = cfg.optim.grad_accum
    costs = []
    for layers in (1, 2):
        c = _variant(
            cfg,
            model__n_layers=layers,
            model__scan_layers=False,
            optim__grad_accum=1,
            data__batch_size=cfg.data.batch_size // accum,
        )
        run = run_lib.build_run(c, devices=devices, data=False)
        options = NO_WINDOWED_EINSUM if devices[0].platform == "tpu" else {}
        compiled = lower_step(run)[0].compile(compiler_options=options)
        ca = compiled.cost_analysis()
        cost = {k: float(ca.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}
        cost["kernel_flops"] = kernel_matmuls(compiled.as_text()) * attention_matmul_flops(
            c, len(devices), dict(run.mesh.shape)
        )
        costs.append(cost)
    n = cfg.model.n_layers
    return {k: accum * (costs[0][k] + (n - 1) * (costs[1][k] - costs[0][k])) for k in costs[0]}


COLLECTIVE = re.compile(
    r"=\s*(\(?[a-z0-9]+\[[^=]*?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\("
)


# On several slices, a collective across them (over the DCN) is compiled as a host transfer to
# libtpu's multislice runtime: a send tagged _xla_megascale_transfer_type="ALL_REDUCE" (and a
# recv), counted as "dcn all-reduce". XLA's cost model times them below zero (estimate_cost).
DCN_SEND = re.compile(
    r"=\s*\(([a-z0-9]+\[[^\]]*\])[^=]*?\ssend\(.*_xla_megascale_transfer_type=\"(\w+)\""
)


def collective_summary(hlo: str) -> dict[str, collections.Counter]:
    """Counts of the collectives in optimized HLO text, by op and result shape (a collective in
    a loop body counted once)."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            out[m.group(2)][m.group(1).strip()] += 1
        m = DCN_SEND.search(line)
        if m:
            out["dcn " + m.group(2).lower().replace("_", "-")][m.group(1)] += 1
    return out


def chip_hbm(device_kind: str) -> int | None:
    for name, size in HBM_BYTES.items():
        if name in device_kind:
            return size
    return None


def chip_peak(device_kind: str, dtype: str) -> float | None:
    for name, peaks in metrics.PEAK_FLOPS.items():
        if name in device_kind:
            return peaks[dtype]
    return None


def memory_report(mem: Any, params: Any, opt_state: Any, device: jax.Device) -> dict[str, Any]:
    """The report's per-chip memory, in bytes: XLA's memory analysis `mem` of the compiled step,
    its peak (arguments + outputs - aliased + temporaries + code), the chip's share of the
    params and optimizer state, and, on a TPU, the chip's HBM and the headroom left under it
    (None on other platforms)."""
    state_bytes = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves((params, opt_state))
    )
    peak_bytes = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    hbm = chip_hbm(device.device_kind) if device.platform == "tpu" else None
    return dict(
        arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
        peak=peak_bytes,
        state=state_bytes,
        hbm=hbm,
        headroom=None if hbm is None else hbm - peak_bytes,
        fits=None if hbm is None else peak_bytes <= hbm,
    )


def write_hlo_dump(directory: str, hlo: str) -> None:
    """Writes the optimized HLO text to DIR/train_step.optimized.hlo.txt and its collectives
    (`collective_summary`: one line per op and result shape, with its count) to
    DIR/collectives.txt, creating the directory."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "train_step.optimized.hlo.txt"), "w") as f:
        f.write(hlo)
    with open(os.path.join(directory, "collectives.txt"), "w") as f:
        for op, counter in sorted(collective_summary(hlo).items()):
            for shape, count in counter.most_common():
                f.write(f"{op:20s} {count:4d}  {shape}\n")


def estimate_report(
    cfg: config_lib.ConfigDict,
    devices: Sequence[jax.Device],
    model_flops: float,
    kernel_efficiency: float,
) -> dict[str, Any]:
    """The report's time estimate, per chip: `estimate_cost`'s FLOPs and seconds of one step,
    the attention kernels' time at `kernel_efficiency` of the chip's peak FLOP/s (off a TPU
    there is no peak: no kernel time and no MFU), and the MFU and tokens/s they imply against
    `model_flops` (the model's FLOPs per chip per step); with a warning when XLA counted fewer
    FLOPs than the model needs."""
    tokens, chips = cfg.data.batch_size * cfg.data.seq_len, len(devices)
    kind, on_tpu = devices[0].device_kind, devices[0].platform == "tpu"
    cost = estimate_cost(cfg, devices)
    peak = chip_peak(kind, cfg.model.dtype) if on_tpu else None
    kernel_sec = cost["kernel_flops"] / (peak * kernel_efficiency) if peak else 0.0
    sec = cost["optimal_seconds"] + kernel_sec
    estimate = dict(
        xla_flops_per_chip=cost["flops"],
        bytes_accessed_per_chip=cost["bytes accessed"],
        xla_sec=cost["optimal_seconds"],
        kernel_flops_per_chip=cost["kernel_flops"],
        kernel_efficiency=kernel_efficiency,
        kernel_sec=kernel_sec,
        step_sec=sec,
        dcn_left_out=cfg.mesh.num_slices > 1,
        chip_peak_flops=peak,
        mfu=model_flops / (sec * peak) if peak and sec > 0 else None,
        tokens_per_sec_per_chip=tokens / chips / sec if sec > 0 else None,
        xla_over_model_flops=(cost["flops"] + cost["kernel_flops"]) / model_flops,
    )
    if estimate["xla_over_model_flops"] < 0.99:
        estimate["warning"] = (
            "XLA counted fewer FLOPs than the model needs (a loop counted once?): the time "
            "estimate is too low and its MFU too high"
        )
    return estimate


def aot_report(
    cfg: config_lib.ConfigDict,
    devices: Sequence[jax.Device],
    *,
    estimate: bool = True,
    dump_hlo: str | None = None,
    kernel_efficiency: float = 0.5,
) -> dict[str, Any]:
    """Compiles the configured step for `devices` and returns the report (per-chip numbers)."""
    run = run_lib.build_run(cfg, devices=devices, data=False)
    start = time.perf_counter()
    lowered, (params, opt_state, _) = lower_step(run)
    compiled = lowered.compile()
    compile_sec = time.perf_counter() - start
    mem = compiled.memory_analysis()
    kind, chips = devices[0].device_kind, len(devices)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    m = cfg.model
    report: dict[str, Any] = dict(
        device_kind=kind,
        chips=chips,
        mesh=dict(run.mesh.shape),
        model=dict(
            params=n_params,
            n_layers=m.n_layers,
            d_model=m.d_model,
            remat=m.remat,
            scan_layers=m.scan_layers,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
        ),
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        grad_accum=cfg.optim.grad_accum,
        compile_sec=compile_sec,
        memory=memory_report(mem, params, opt_state, devices[0]),
    )
    hlo = compiled.as_text()
    report["collectives"] = {op: sum(c.values()) for op, c in collective_summary(hlo).items()}
    if dump_hlo:
        write_hlo_dump(dump_hlo, hlo)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    model_flops = metrics.train_flops_per_token(
        run.model_cfg, cfg.data.seq_len, run.diffusion_cfg.block_size
    )
    model_flops *= tokens / chips
    report["model_flops_per_chip"] = model_flops
    if estimate:
        report["estimate"] = estimate_report(cfg, devices, model_flops, kernel_efficiency)
    return report


def format_report(r: dict[str, Any]) -> str:
    mem, g = r["memory"], lambda b: f"{b / GiB:8.2f} GiB"
    lines = [
        f"{r['chips']} x {r['device_kind']}, mesh {r['mesh']}; {r['model']['params'] / 1e9:.2f}B "
        f"params, remat={r['model']['remat']}, scan_layers={r['model']['scan_layers']}, "
        f"{r['model']['dtype']} compute / {r['model']['param_dtype']} params; batch "
        f"{r['batch_size']} x {r['seq_len']}, grad_accum {r['grad_accum']} (compiled in "
        f"{r['compile_sec']:.0f}s)",
        "per-chip memory (XLA memory_analysis):",
        f"  arguments   {g(mem['arguments'])}  (params + optimizer state {g(mem['state'])}, "
        f"+ batch)",
        f"  outputs     {g(mem['outputs'])}  (aliased with donated arguments {g(mem['aliased'])})",
        f"  temporaries {g(mem['temporaries'])}",
        f"  peak        {g(mem['peak'])}  (arguments + outputs - aliased + temporaries + code)",
    ]
    if mem["hbm"]:
        lines.append(
            f"  HBM         {g(mem['hbm'])}  headroom {g(mem['headroom'])} "
            f"({100 * mem['headroom'] / mem['hbm']:.0f}%): "
            f"{'fits' if mem['fits'] else 'DOES NOT FIT'}"
        )
    lines.append(f"collectives in the optimized HLO: {r['collectives']}")
    e = r.get("estimate")
    if e:
        lines.append(
            f"per-chip FLOPs/step: model {r['model_flops_per_chip'] / 1e12:.1f} T, executed "
            f"{(e['xla_flops_per_chip'] + e['kernel_flops_per_chip']) / 1e12:.1f} T "
            f"({e['xla_over_model_flops']:.2f}x: remat, elementwise)"
            + (
                f", of which attention kernels {e['kernel_flops_per_chip'] / 1e12:.1f} T"
                if e["kernel_flops_per_chip"]
                else ""
            )
        )
        lines.append(
            f"estimated step time {e['step_sec']:.2f} s (XLA cost model, sum over ops"
            + (
                " of one slice, the all-reduces between slices left out"
                if e["dcn_left_out"]
                else ""
            )
            + (
                f": {e['xla_sec']:.2f} s, + attention kernels at an assumed "
                f"{100 * e['kernel_efficiency']:.0f}% of peak: {e['kernel_sec']:.2f} s)"
                if e["kernel_flops_per_chip"]
                else ")"
            )
            + (
                f"; MFU {100 * e['mfu']:.1f}% of {e['chip_peak_flops'] / 1e12:.0f} TFLOP/s"
                if e["mfu"]
                else ""
            )
            + (
                f"; {e['tokens_per_sec_per_chip']:,.0f} tokens/s/chip"
                if e["tokens_per_sec_per_chip"]
                else ""
            )
        )
        if e.get("warning"):
            lines.append(f"WARNING: {e['warning']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        cfg = config_lib.from_command_line(argv, __doc__)
        if FLAGS.platform == "cpu":
            devices = jax.devices("cpu")
        else:
            if bool(FLAGS.tpu) == bool(FLAGS.topology):
                raise ValueError("give exactly one of --tpu=v5p-128 or --topology=v5p:4x4x4")
            topology = FLAGS.topology or topology_for(FLAGS.tpu)
            devices = topology_devices(topology, cfg.mesh.num_slices)
        if not 0 < FLAGS.kernel_efficiency <= 1:
            raise ValueError(f"--kernel_efficiency={FLAGS.kernel_efficiency} must be in (0, 1]")
        report = aot_report(
            cfg,
            devices,
            estimate=FLAGS.estimate,
            dump_hlo=FLAGS.dump_hlo,
            kernel_efficiency=FLAGS.kernel_efficiency,
        )
    except (ValueError, FileNotFoundError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.tpu or FLAGS.topology:
        slices = cfg.mesh.num_slices
        report["topology"] = (f"{slices} x " if slices > 1 else "") + (
            FLAGS.topology or topology_for(FLAGS.tpu)
        )
    print(
        json.dumps(report)
        if FLAGS.json
        else (f"topology {report['topology']}: " if "topology" in report else "")
        + format_report(report)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

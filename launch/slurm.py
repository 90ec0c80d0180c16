"""A training run on a SLURM GPU cluster: renders launch/slurm.sbatch and submits it.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 [--partition=P] [--account=A]
      [--time=24:00:00] [--job_name=llada] [--cpus_per_task=8] [--output=%x-%j.out]
      [--term_before_end=300] [--mem_fraction=0.9] [--env=KEY=VALUE ...] [--setup=LINE ...]
      [--python=python] [--chdir=REPO] [--script=JOB_NAME.sbatch] [--overlap_flags=true]
      [--dry_run] -- <train flags>

One task per GPU (nodes x gpus_per_node processes); each runs `srun --kill-on-bad-exit=1
PYTHON -u -m llada_jax.train <train flags>` from --chdir (default: this checkout) and JAX detects
the SLURM job (coordinator, process count and id, local GPU). --term_before_end=S asks SLURM
to send SIGTERM S seconds before the time limit, so the trainer saves a checkpoint and exits
(0 turns it off); resubmitting the same script resumes. --mem_fraction sets
XLA_PYTHON_CLIENT_MEM_FRACTION; --env exports more variables; --setup adds shell lines before
srun (e.g. --setup='source ~/venv/bin/activate'). The script adds to XLA_FLAGS the XLA flags
that overlap GPU collectives with computation (OVERLAP_FLAGS, each explained in the script); a
flag already in the job's XLA_FLAGS keeps its value, and --overlap_flags=false leaves XLA_FLAGS
alone. A --config.mesh.shape among the training flags (times --config.mesh.num_slices, if
given) must fit the job's nodes x gpus_per_node processes (one GPU each), else the launcher
stops with one error line (exit status 2).
Writes the script to --script and runs `sbatch SCRIPT`. --dry_run prints the script and then the
sbatch command line, writes nothing and exits 0.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")
NO_SPACE = re.compile(r"\S+")
MESH_FLAG = "--config.mesh.shape"
NUM_SLICES_FLAG = "--config.mesh.num_slices"  # the mesh of one slice is MESH_FLAG
# XLA flags that let GPU collectives run while computation goes on, as JAX's GPU performance
# tips (https://docs.jax.dev/en/latest/gpu_performance_tips.html) and NVIDIA's JAX-Toolbox
# (https://github.com/NVIDIA/JAX-Toolbox/blob/main/docs/GPU_performance.md) recommend; each
# with what it does, written into the script. All four are known to the pinned jaxlib (XLA aborts
# on an unknown flag in XLA_FLAGS).
# No NCCL_* variable is set: the values JAX's tips list (NCCL_LL_BUFFSIZE=-2,
# NCCL_LL128_BUFFSIZE=-2, NCCL_PROTO=SIMPLE,LL,LL128; for one node only) are NCCL's own defaults
# (-2 means unset in NCCL's src/init.cc) except that forcing LL128 overrides NCCL's per-platform
# choice, which its release notes warn can corrupt data where LL128 is unsafe
# (https://docs.nvidia.com/deeplearning/nccl/release-notes/rel_2-18-1.html). A cluster's own
# NCCL settings go in with --env.
OVERLAP_FLAGS = (
    (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "schedule collectives asynchronously, overlapped with independent computation",
    ),
    (
        "--xla_gpu_enable_pipelined_all_gather=true",
        "in loops (scanned layers), all-gather the next iteration's parameters during this one",
    ),
    (
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "in loops, finish an iteration's gradient reduce-scatter during the next one",
    ),
    (
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "in loops, finish an iteration's all-reduce during the next one",
    ),
)


def parse(argv: list[str]):
    own, train_args = _cli.split_argv(argv)
    p = _cli.Parser(
        prog="launch/slurm.py",
        description="Render and submit a SLURM batch script for GPU training.",
    )
    p.add_argument("--nodes", type=int, required=True, help="Number of nodes.")
    p.add_argument(
        "--gpus_per_node",
        type=int,
        required=True,
        help="GPUs per node = tasks (processes) per node.",
    )
    p.add_argument("--cpus_per_task", type=int, default=8, help="CPU cores per task.")
    p.add_argument("--time", default="24:00:00", help="Time limit (SLURM format).")
    p.add_argument("--job_name", default="llada", help="Job name.")
    p.add_argument("--output", default="%x-%j.out", help="Log file pattern.")
    p.add_argument("--partition", default=None, help="Partition.")
    p.add_argument("--account", default=None, help="Account to charge.")
    p.add_argument(
        "--term_before_end",
        type=int,
        default=300,
        help="SIGTERM the tasks this many seconds before the time limit (0: off).",
    )
    p.add_argument(
        "--mem_fraction", type=float, default=None, help="XLA_PYTHON_CLIENT_MEM_FRACTION (0, 1]."
    )
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE to export; repeatable.")
    p.add_argument(
        "--setup", action="append", default=[], help="Shell line to run before srun; repeatable."
    )
    p.add_argument("--python", default="python", help="Python on the compute nodes.")
    p.add_argument("--chdir", default=_cli.ROOT, help="Directory the tasks run in.")
    p.add_argument(
        "--script",
        default=None,
        help="Where to write the script (default: JOB_NAME.sbatch in the current directory).",
    )
    p.add_argument("--template", default=TEMPLATE, help="Batch script template.")
    _cli.add_bool(
        p,
        "overlap_flags",
        "Add the XLA flags that overlap collectives with computation (false: leave XLA_FLAGS "
        "as the job inherits it).",
        default=True,
    )
    _cli.add_bool(p, "dry_run", "Print the script and the sbatch command and exit.")
    args = p.parse_args(own)
    _cli.positive("nodes", args.nodes)
    _cli.positive("gpus_per_node", args.gpus_per_node)
    _cli.positive("cpus_per_task", args.cpus_per_task)
    _cli.positive("term_before_end", args.term_before_end, 0)
    if args.mem_fraction is not None and not 0 < args.mem_fraction <= 1:
        raise _cli.UsageError(f"--mem_fraction={args.mem_fraction} must be in (0, 1]")
    for flag in ("time", "job_name", "output", "partition", "account"):
        value = getattr(args, flag)
        if value is not None and not NO_SPACE.fullmatch(value):
            raise _cli.UsageError(f"--{flag}={value!r} must be one word without spaces")
    for kv in args.env:
        key = kv.split("=", 1)[0]
        if "=" not in kv or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise _cli.UsageError(f"--env={kv} must be KEY=VALUE with KEY a variable name")
    for line in args.setup:
        if "\n" in line:
            raise _cli.UsageError("--setup takes one line; repeat it for more")
    if not train_args:
        raise _cli.UsageError(
            "no training flags: give them after `--`, e.g. "
            "-- --config=configs/llada_1b.py --workdir=/shared/runs/x"
        )
    _cli.reject_flags(train_args, _cli.DISTRIBUTED_FLAGS, "JAX detects the SLURM job by itself")
    shape = last_flag_value(train_args, MESH_FLAG)
    slices = last_flag_value(train_args, NUM_SLICES_FLAG) or "1"
    if shape is not None and slices.isdigit() and int(slices) > 0:
        check_mesh(shape, args.nodes, args.gpus_per_node, int(slices))
    args.script = args.script or f"{args.job_name}.sbatch"
    return args, train_args


def last_flag_value(train_args: list[str], name: str) -> str | None:
    """The value of the last `name=VALUE` or `name VALUE` in `train_args` (the one absl keeps)."""
    value = None
    for i, a in enumerate(train_args):
        if a.startswith(f"{name}="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(train_args):
            value = train_args[i + 1]
    return value


def check_mesh(value: str, nodes: int, gpus_per_node: int, slices: int = 1):
    """Refuses a mesh shape of integers (the mesh of one of `slices` slices) that cannot cover the
    job's processes, one GPU each. A value that is not a tuple of integers is left to the trainer
    to report."""
    try:
        shape = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return
    if not isinstance(shape, (tuple, list)) or not all(type(s) is int for s in shape):
        return
    total = nodes * gpus_per_node
    job = (
        f"the job has {total} processes of one GPU each "
        f"(--nodes={nodes} x --gpus_per_node={gpus_per_node})"
    )
    mesh = f"{MESH_FLAG}={value}" + (f" x {NUM_SLICES_FLAG}={slices}" if slices > 1 else "")
    if total % slices:
        raise _cli.UsageError(f"{NUM_SLICES_FLAG}={slices} does not divide the processes; {job}")
    if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise _cli.UsageError(
            f"{MESH_FLAG}={value} must have entries >= 1 and at most one -1; {job}"
        )
    known = math.prod(s for s in shape if s != -1) * slices
    if -1 in shape and total % known:
        raise _cli.UsageError(
            f"{mesh}: the fixed entries ({known} devices) do not divide the processes; {job}"
        )
    if -1 not in shape and known != total:
        raise _cli.UsageError(f"{mesh} needs {known} devices but {job}")


def overlap_lines() -> list[str]:
    """Shell lines adding OVERLAP_FLAGS to XLA_FLAGS, each flag unless XLA_FLAGS names it."""
    lines = [
        "# XLA flags that overlap GPU collectives with computation (launch/slurm.py; a flag",
        "# already in XLA_FLAGS keeps its value):",
    ]
    lines += [f"#   {flag}: {why}" for flag, why in OVERLAP_FLAGS]
    return lines + [
        f"for flag in {' '.join(flag for flag, _ in OVERLAP_FLAGS)}; do",
        '  case " ${XLA_FLAGS:-} " in',
        '    *" ${flag%%=*}="*) ;;',
        '    *) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag" ;;',
        "  esac",
        "done",
        "export XLA_FLAGS",
    ]


def render(args, train_args: list[str]) -> str:
    optional = [f"#SBATCH --partition={args.partition}"] * bool(args.partition)
    optional += [f"#SBATCH --account={args.account}"] * bool(args.account)
    if args.term_before_end:
        optional.append(f"#SBATCH --signal=TERM@{args.term_before_end}")
    env = []
    if args.mem_fraction is not None:
        env.append(f"export XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction:g}")
    for kv in args.env:
        key, value = kv.split("=", 1)
        env.append(f"export {key}={shlex.quote(value)}")
    values = {
        "job_name": args.job_name,
        "nodes": str(args.nodes),
        "gpus_per_node": str(args.gpus_per_node),
        "cpus_per_task": str(args.cpus_per_task),
        "time": args.time,
        "output": args.output,
        "optional_sbatch": "\n".join(optional),
        "chdir": shlex.quote(os.path.abspath(args.chdir)),
        "setup": "\n".join(args.setup),
        "environment": "\n".join(env),
        "overlap": "\n".join(overlap_lines()) if args.overlap_flags else "",
        "command": shlex.join([args.python, "-u", "-m", "llada_jax.train", *train_args]),
    }
    try:
        with open(args.template, encoding="utf-8") as f:
            template = f.read()
    except OSError as e:
        raise _cli.UsageError(f"--template={args.template}: {e.strerror}") from None
    lines = []
    for line in template.splitlines():
        m = re.fullmatch(r"\{\{(\w+)\}\}", line)
        if m and m.group(1) in values and not values[m.group(1)]:
            continue  # an optional section left empty: no blank line
        lines.append(re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m.group(1), m.group(0)), line))
    script = "\n".join(lines) + "\n"
    left = re.findall(r"\{\{\w+\}\}", script)
    if left:
        raise _cli.UsageError(f"--template={args.template}: unknown placeholders {left}")
    return script


def main(argv: list[str]) -> int:
    try:
        args, train_args = parse(argv[1:])
        script = render(args, train_args)
    except _cli.UsageError as e:
        _cli.fail(str(e))
    submit = ["sbatch", args.script]
    if args.dry_run:
        sys.stdout.write(script)
        print(shlex.join(submit))
        return 0
    with open(args.script, "w", encoding="utf-8") as f:
        f.write(script)
    if shutil.which("sbatch") is None:
        _cli.fail(
            f"sbatch not found on PATH: the script is written to {args.script}; submit "
            f"it on the cluster with `{shlex.join(submit)}`",
            1,
        )
    print(f"+ {shlex.join(submit)}", file=sys.stderr, flush=True)
    return subprocess.run(submit).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""A training run on Cloud TPU VMs (one pod slice, or several as a multislice), through `gcloud`.

  python launch/tpu_pod.py COMMAND --name=NAME --zone=ZONE [--project=P] [--queued]
      [--num_slices=1] [--dry_run] [flags]

  create   --accelerator_type=v5p-128 --runtime_version=VERSION [--spot | --preemptible]
           `tpu-vm create`; with --queued a queued resource (`queued-resources create`, node
           NAME); with --num_slices=N > 1 a multislice of N slices NAME-0 ... NAME-(N-1)
  install  [--repo_url=URL [--branch=B]] [--remote_dir=llada_jax] [--venv=llada_venv]
           Puts the code on every worker (git clone of --repo_url, else `scp --recurse` of this
           checkout's setup.py, README.md, llada_jax/, configs/, tools/, launch/), then
           `pip install -e .[tpu]` into a virtual environment ~/VENV.
  run      --config=configs/x.py[:variant] --workdir=gs://BUCKET/RUN [--log=llada_train.log]
           [-- <more train flags>]
           Starts `python -m llada_jax.train` under nohup, in a session of its own, on all
           workers of all slices (JAX detects the pod; one process per worker), output appended
           to ~/LOG, pid in ~/LOG.pid. With --num_slices=N > 1 the trainer also gets
           --config.mesh.num_slices=N. Refuses to start where the previous run is still alive.
           Rerun it to resume from the workdir.
  tail     [--worker=0|N|all] [--slice=S|all] [--lines=100]
           follows ~/LOG on one worker, or on every worker (--worker=all) with each line
           prefixed by its worker, `[w3] ` (`[s1w3] ` in a multislice); Ctrl-C to leave
  stop     [--stop_timeout_sec=60] SIGTERM to the training process on all workers (it saves a
           checkpoint and exits), then SIGKILL to what is left of the run after the timeout
  delete   deletes the TPU VM (`queued-resources delete --force` for a queued resource: its
           nodes first); gcloud asks for confirmation

--queued, --num_slices and the remote paths (--remote_dir, --venv, --log: relative to the
workers' home) must be the same for every command on one TPU. --dry_run prints the exact gcloud
commands, one per line, and exits 0; otherwise they run in order (each echoed to stderr with
`+ `), stopping at the first that fails, with its status.
"""

# The gcloud command lines follow these reference pages (only flags they show are used):
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh       (--worker=all)
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
#     (--node-id=ID | --node-count=N --node-prefix=P; --spot; no --preemptible)
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete (--force)
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/ssh
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/scp
#     (--node=all --worker=all: every worker of every slice)
#   https://cloud.google.com/tpu/docs/queued-resources
#   https://cloud.google.com/tpu/docs/multislice-introduction (multislice needs queued resources)
#   https://cloud.google.com/python/docs/reference/tpu/latest/google.cloud.tpu_v2.types.QueuedResource.Tpu.NodeSpec.MultisliceParams
#     (node ids PREFIX-0 ... PREFIX-(N-1))
# A worker's index is the VM metadata attribute agent-worker-number and, in a multislice, its
# slice is MEGASCALE_SLICE_ID in the tpu-env attribute: where JAX reads them to join the slices
# (https://github.com/jax-ml/jax/blob/main/jax/_src/clusters/cloud_tpu_cluster.py), so the
# launcher sets no MEGASCALE_* variable itself.

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

# What `install` copies from a local checkout (no .git, runs, virtual environments, ...).
CHECKOUT_ITEMS = ("setup.py", "README.md", "llada_jax", "configs", "tools", "launch")
SIMPLE_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
NUM_SLICES_FLAG = "--config.mesh.num_slices"
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"


def parse(argv: list[str]):
    """(launcher arguments, training flags); a bad argument raises _cli.UsageError."""
    own, train_args = _cli.split_argv(argv)
    common = _cli.Parser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (or queued resource) name.")
    common.add_argument("--zone", required=True, help="Zone, e.g. us-east5-a.")
    common.add_argument("--project", default=None, help="Google Cloud project (else gcloud's).")
    _cli.add_bool(common, "queued", "A queued resource (gcloud compute tpus queued-resources).")
    common.add_argument(
        "--num_slices",
        type=int,
        default=1,
        help="Slices of a multislice (a queued resource); N > 1 implies --queued.",
    )
    common.add_argument(
        "--remote_dir", default="llada_jax", help="Code directory on the workers, relative to home."
    )
    common.add_argument(
        "--venv", default="llada_venv", help="Virtual environment on the workers, relative to home."
    )
    common.add_argument(
        "--log", default="llada_train.log", help="Training log on the workers, relative to home."
    )
    _cli.add_bool(common, "dry_run", "Print the gcloud commands and exit.")
    p = _cli.Parser(
        prog="launch/tpu_pod.py",
        description="Create, set up, run, watch and stop a TPU VM pod slice or multislice.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    create = sub.add_parser("create", parents=[common], help="Create the TPU VM(s).")
    create.add_argument("--accelerator_type", required=True, help="e.g. v5p-128, v4-32.")
    create.add_argument("--runtime_version", required=True, help="TPU VM software version.")
    _cli.add_bool(create, "spot", "Spot capacity.")
    _cli.add_bool(create, "preemptible", "Preemptible capacity (not with --queued).")
    install = sub.add_parser("install", parents=[common], help="Copy the code, pip install.")
    install.add_argument("--repo_url", default=None, help="git clone this instead of copying.")
    install.add_argument("--branch", default=None, help="Branch or tag to clone.")
    install.add_argument("--source_dir", default=_cli.ROOT, help="Local checkout to copy.")
    run = sub.add_parser("run", parents=[common], help="Start training on all workers.")
    run.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
    run.add_argument("--workdir", required=True, help="Shared run directory, e.g. gs://b/run.")
    tail = sub.add_parser("tail", parents=[common], help="Follow the log of one or all workers.")
    tail.add_argument("--worker", default="0", help="Worker index, or all.")
    tail.add_argument(
        "--slice",
        default=None,
        help="Queued resources: slice index, or all (default: all with --worker=all, else 0).",
    )
    tail.add_argument("--lines", type=int, default=100, help="Lines of history to show.")
    stop = sub.add_parser("stop", parents=[common], help="SIGTERM the training on all workers.")
    stop.add_argument(
        "--stop_timeout_sec",
        type=int,
        default=60,
        help="Seconds to wait after SIGTERM before SIGKILL.",
    )
    sub.add_parser("delete", parents=[common], help="Delete the TPU VM(s).")
    args = p.parse_args(own)
    check(args, train_args)
    return args, train_args


def check(args, train_args: list[str]):
    """Refuses contradictory or malformed arguments; normalises --queued, --worker, --slice."""
    for flag in ("remote_dir", "venv", "log"):
        value = getattr(args, flag)
        if not SIMPLE_PATH.fullmatch(value) or ".." in value.split("/"):
            raise _cli.UsageError(
                f"--{flag}={value} must be a plain path relative to the "
                "home directory (letters, digits, . _ - /)"
            )
    _cli.positive("num_slices", args.num_slices)
    args.queued = args.queued or args.num_slices > 1  # Multislice exists only as queued resources.
    if args.command == "create" and args.spot and args.preemptible:
        raise _cli.UsageError("--spot and --preemptible are exclusive: give one")
    if args.command == "create" and args.queued and args.preemptible:
        raise _cli.UsageError(
            "--preemptible is not available for queued resources: use --spot (or no --queued)"
        )
    if args.command == "tail":
        check_tail(args)
    if args.command == "stop":
        _cli.positive("stop_timeout_sec", args.stop_timeout_sec, 0)
    if args.command == "install" and args.repo_url is None:
        missing = [
            i for i in CHECKOUT_ITEMS[:3] if not os.path.exists(os.path.join(args.source_dir, i))
        ]
        if missing:
            raise _cli.UsageError(
                f"--source_dir={args.source_dir} is not a llada_jax checkout "
                f"(no {', '.join(missing)}); give --repo_url or a checkout"
            )
    if args.command == "install" and args.branch and not args.repo_url:
        raise _cli.UsageError("--branch needs --repo_url")
    if train_args and args.command != "run":
        raise _cli.UsageError(
            f"`{args.command}` takes no training flags (only `run` does): {shlex.join(train_args)}"
        )
    _cli.reject_flags(train_args, _cli.DISTRIBUTED_FLAGS, "JAX detects the pod by itself")
    _cli.reject_flags(
        train_args, ("--config", "--workdir"), "give it as a launcher flag before `--`"
    )
    for a in train_args:
        if _cli.flag_name(a) == NUM_SLICES_FLAG and a != f"{NUM_SLICES_FLAG}={args.num_slices}":
            raise _cli.UsageError(
                f"{a} in the training flags contradicts --num_slices={args.num_slices} "
                "(the launcher passes the slice count)"
            )


def check_tail(args):
    """--worker and --slice: an index >= 0 or `all`; --slice only for queued resources."""
    args.worker = index_or_all("worker", args.worker)
    _cli.positive("lines", args.lines, 0)
    if args.slice is None:
        args.slice = "all" if args.worker == "all" else "0"
    elif not args.queued:
        raise _cli.UsageError(f"--slice={args.slice} needs --queued or --num_slices")
    args.slice = index_or_all("slice", args.slice)
    if args.slice != "all" and int(args.slice) >= args.num_slices:
        raise _cli.UsageError(
            f"--slice={args.slice} must be < --num_slices={args.num_slices} (or all)"
        )


def index_or_all(name: str, value: str) -> str:
    """`all`, or the index `value` (an integer >= 0) as written by str(int)."""
    if value == "all":
        return value
    try:
        index = int(value)
    except ValueError:
        raise _cli.UsageError(f"--{name}={value} must be an index >= 0 or all") from None
    _cli.positive(name, index, 0)
    return str(index)


def gcloud(args, verb: str, *rest: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB ...` (`queued-resources VERB` with --queued)."""
    group = "queued-resources" if args.queued else "tpu-vm"
    cmd = ["gcloud", "compute", "tpus", group, verb, *rest, f"--zone={args.zone}"]
    return cmd + ([f"--project={args.project}"] if args.project else [])


def ssh(args, remote: str, worker: str = "all", node: str = "all") -> list[str]:
    """`remote` run on `worker` (of slice `node` for a queued resource) by gcloud ssh."""
    nodes = [f"--node={node}"] if args.queued else []
    return gcloud(args, "ssh", args.name) + nodes + [f"--worker={worker}", f"--command={remote}"]


def create(args) -> list[str]:
    if not args.queued:
        cmd = gcloud(args, "create", args.name) + [
            f"--accelerator-type={args.accelerator_type}",
            f"--version={args.runtime_version}",
        ]
        return cmd + ["--spot"] * args.spot + ["--preemptible"] * args.preemptible
    nodes = (
        [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]
        if args.num_slices > 1
        else [f"--node-id={args.name}"]
    )
    cmd = gcloud(args, "create", args.name) + [
        f"--accelerator-type={args.accelerator_type}",
        f"--runtime-version={args.runtime_version}",
        *nodes,
    ]
    return cmd + ["--spot"] * args.spot


def install(args, code: str, venv: str) -> list[list[str]]:
    # Images without python3-venv get it from the system package manager once.
    pip = (
        f"{{ python3 -m venv {venv} || {{ sudo apt-get update -q && sudo apt-get "
        f"install -y -q python3-venv && python3 -m venv --clear {venv}; }}; }} && "
        f"{venv}/bin/pip install --upgrade pip && "
        f"cd {code} && {venv}/bin/pip install -e '.[tpu]'"
    )
    if args.repo_url:
        branch = f" --branch={shlex.quote(args.branch)}" if args.branch else ""
        return [
            ssh(
                args,
                f"set -e; rm -rf {code}; git clone --depth=1{branch} "
                f"{shlex.quote(args.repo_url)} {code}; {pip}",
            )
        ]
    sources = [
        os.path.join(os.path.abspath(args.source_dir), i)
        for i in CHECKOUT_ITEMS
        if os.path.exists(os.path.join(args.source_dir, i))
    ]
    nodes = ["--node=all"] if args.queued else []
    return [
        ssh(args, f"rm -rf {code} && mkdir -p {code}"),
        gcloud(args, "scp", *sources, f"{args.name}:{args.remote_dir}")
        + ["--worker=all", *nodes, "--recurse"],
        ssh(args, pip),
    ]


def run_remote(args, train_args: list[str], code: str, venv: str, log: str) -> str:
    """Starts the trainer in the background, in a session of its own (setsid: its pid is its
    process group, so `stop` can kill whatever it started), unless the last one still runs."""
    pid = f"{log}.pid"
    slices = [f"{NUM_SLICES_FLAG}={args.num_slices}"] * (args.num_slices > 1)
    given = any(_cli.flag_name(a) == NUM_SLICES_FLAG for a in train_args)
    train = shlex.join(
        [
            "-u",
            "-m",
            "llada_jax.train",
            f"--config={args.config}",
            f"--workdir={args.workdir}",
            "--distributed",  # JAX reads the workers from the TPU VMs' metadata server
            *train_args,
            *([] if given else slices),
        ]
    )
    return (
        f"cd {code} || exit 1; "
        f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
        f'echo "$(hostname): training is still running (pid $(cat {pid}))" >&2; '
        f"exit 1; fi; "
        f"nohup setsid {venv}/bin/python {train} >> {log} 2>&1 < /dev/null & "
        f'echo $! > {pid}; echo "$(hostname): started pid $!, log {log}"'
    )


def stop_remote(pid: str, timeout: int) -> str:
    """SIGTERM to the trainer, up to `timeout` seconds for its process group (the trainer and
    what it started) to exit, then SIGKILL to what is left. The plain pid covers a run started
    before the trainer got a session of its own."""
    alive = 'kill -0 "$p" 2>/dev/null || kill -0 -- -"$p" 2>/dev/null'
    return (
        f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
        f'p=$(cat {pid}); kill -TERM "$p"; '
        f'echo "$(hostname): sent SIGTERM to $p, waiting up to {timeout}s for it to save and '
        f'exit"; '
        f"t=0; while {{ {alive}; }} && [ $t -lt {timeout} ]; do sleep 1; t=$((t+1)); done; "
        f"if {alive}; then "
        f'kill -9 -- -"$p" 2>/dev/null; kill -9 "$p" 2>/dev/null; '
        f'echo "$(hostname): still running after {timeout}s: sent SIGKILL to $p and its group"; '
        f'else echo "$(hostname): stopped"; fi; '
        f'else echo "$(hostname): not running"; fi'
    )


def tail_remote(args, log: str) -> str:
    """`tail -F` of the log; for every worker each line gets the worker's label in front
    (`[w3] `, `[s1w3] ` in a multislice; the host name where the metadata server is silent)."""
    follow = f"tail -n {args.lines} -F {log}"
    if args.worker != "all":
        return follow
    meta = f"m() {{ curl -sf -H Metadata-Flavor:Google {METADATA}/$1; }}; "
    # tpu-env holds lines like `MEGASCALE_SLICE_ID: '1'`.
    slice_id = (
        's$(m tpu-env | sed -n "s/^MEGASCALE_SLICE_ID:[^0-9]*\\([0-9]*\\).*/\\1/p")'
        if args.num_slices > 1
        else ""
    )
    return (
        f"{meta}l={slice_id}w$(m agent-worker-number) || l=$(hostname); "
        f'{follow} | sed -u "s/^/[$l] /"'
    )


def commands(args, train_args: list[str]) -> list[list[str]]:
    """The gcloud command lines of `args.command`, in order."""
    code, venv, log = f"~/{args.remote_dir}", f"~/{args.venv}", f"~/{args.log}"
    if args.command == "create":
        return [create(args)]
    if args.command == "install":
        return install(args, code, venv)
    if args.command == "run":
        return [ssh(args, run_remote(args, train_args, code, venv, log))]
    if args.command == "tail":
        return [ssh(args, tail_remote(args, log), worker=args.worker, node=args.slice)]
    if args.command == "stop":
        return [ssh(args, stop_remote(f"{log}.pid", args.stop_timeout_sec))]
    return [gcloud(args, "delete", args.name) + ["--force"] * args.queued]  # delete


def execute(cmds: list[list[str]]) -> int:
    if shutil.which("gcloud") is None:
        _cli.fail(
            "gcloud not found on PATH: install the Google Cloud CLI (and run `gcloud auth "
            "login`), or use --dry_run to see the commands",
            1,
        )
    for cmd in cmds:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            _cli.fail(
                f"gcloud exited with status {e.returncode}: {shlex.join(cmd)}",
                e.returncode if e.returncode > 0 else 1,
            )
        except KeyboardInterrupt:
            return 130
    return 0


def main(argv: list[str]) -> int:
    try:
        args, train_args = parse(argv[1:])
        cmds = commands(args, train_args)
    except _cli.UsageError as e:
        _cli.fail(str(e))
    if args.command == "run" and not args.workdir.startswith("gs://"):
        print(
            f"warning: --workdir={args.workdir} is not a gs:// path: every worker must see "
            "the same directory",
            file=sys.stderr,
        )
    if args.dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    return execute(cmds)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

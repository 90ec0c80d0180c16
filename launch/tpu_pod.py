"""A training run on a Cloud TPU VM pod slice, driven entirely through the `gcloud` command.

  python launch/tpu_pod.py COMMAND --name=NAME --zone=ZONE [--project=P] [--dry_run] [flags]

  create   --accelerator_type=v5p-128 --runtime_version=VERSION [--spot | --preemptible]
  install  [--repo_url=URL [--branch=B]] [--remote_dir=llada_jax] [--venv=llada_venv]
           Puts the code on every worker (git clone of --repo_url, else `tpu-vm scp --recurse`
           of this checkout's setup.py, README.md, llada_jax/, configs/, tools/, launch/), then
           `pip install -e .[tpu]` into a virtual environment ~/VENV.
  run      --config=configs/x.py[:variant] --workdir=gs://BUCKET/RUN [--log=llada_train.log]
           [-- <more train flags>]
           Starts `python -m llada_jax.train` under nohup on all workers (JAX detects the pod;
           one process per worker), output appended to ~/LOG, pid in ~/LOG.pid. Refuses to
           start where the previous run is still alive. Rerun it to resume from the workdir.
  tail     [--worker=0] [--lines=100]      follows ~/LOG on one worker (Ctrl-C to leave)
  stop     sends SIGTERM to the training process on all workers (it saves a checkpoint and
           exits) and waits for it to exit
  delete   deletes the TPU VM (gcloud asks for confirmation)

Remote paths (--remote_dir, --venv, --log) are relative to the workers' home directory.
--dry_run prints the exact gcloud commands, one per line, and exits 0; otherwise they run in
order (each echoed to stderr with `+ `), stopping at the first that fails, with its status.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

COMMANDS = ("create", "install", "run", "tail", "stop", "delete")
# What `install` copies from a local checkout (no .git, runs, virtual environments, ...).
CHECKOUT_ITEMS = ("setup.py", "README.md", "llada_jax", "configs", "tools", "launch")
SIMPLE_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def parse(argv: list[str]):
    own, train_args = _cli.split_argv(argv)
    common = _cli.Parser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name.")
    common.add_argument("--zone", required=True, help="Zone, e.g. us-east5-a.")
    common.add_argument("--project", default=None, help="Google Cloud project (else gcloud's).")
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
        description="Create, set up, run, watch and stop a TPU VM pod slice.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    create = sub.add_parser("create", parents=[common], help="Create the TPU VM.")
    create.add_argument("--accelerator_type", required=True, help="e.g. v5p-128, v4-32.")
    create.add_argument("--runtime_version", required=True, help="TPU VM software version.")
    _cli.add_bool(create, "spot", "Spot capacity.")
    _cli.add_bool(create, "preemptible", "Preemptible capacity.")
    install = sub.add_parser("install", parents=[common], help="Copy the code, pip install.")
    install.add_argument("--repo_url", default=None, help="git clone this instead of copying.")
    install.add_argument("--branch", default=None, help="Branch or tag to clone.")
    install.add_argument("--source_dir", default=_cli.ROOT, help="Local checkout to copy.")
    run = sub.add_parser("run", parents=[common], help="Start training on all workers.")
    run.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
    run.add_argument("--workdir", required=True, help="Shared run directory, e.g. gs://b/run.")
    tail = sub.add_parser("tail", parents=[common], help="Follow the log of one worker.")
    tail.add_argument("--worker", type=int, default=0, help="Worker index.")
    tail.add_argument("--lines", type=int, default=100, help="Lines of history to show.")
    sub.add_parser("stop", parents=[common], help="SIGTERM the training on all workers.")
    sub.add_parser("delete", parents=[common], help="Delete the TPU VM.")
    args = p.parse_args(own)

    for flag in ("remote_dir", "venv", "log"):
        value = getattr(args, flag)
        if not SIMPLE_PATH.fullmatch(value) or ".." in value.split("/"):
            raise _cli.UsageError(
                f"--{flag}={value} must be a plain path relative to the "
                "home directory (letters, digits, . _ - /)"
            )
    if args.command == "create" and args.spot and args.preemptible:
        raise _cli.UsageError("--spot and --preemptible are exclusive: give one")
    if args.command == "tail":
        _cli.positive("worker", args.worker, 0)
        _cli.positive("lines", args.lines, 0)
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
    return args, train_args


def gcloud(args, verb: str, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    return cmd + ([f"--project={args.project}"] if args.project else [])


def ssh(args, remote: str, worker: str = "all") -> list[str]:
    return gcloud(args, "ssh", args.name) + [f"--worker={worker}", f"--command={remote}"]


def commands(args, train_args: list[str]) -> list[list[str]]:
    code, venv, log = f"~/{args.remote_dir}", f"~/{args.venv}", f"~/{args.log}"
    pid = f"{log}.pid"
    if args.command == "create":
        cmd = gcloud(args, "create", args.name) + [
            f"--accelerator-type={args.accelerator_type}",
            f"--version={args.runtime_version}",
        ]
        return [cmd + ["--spot"] * args.spot + ["--preemptible"] * args.preemptible]
    if args.command == "install":
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
        return [
            ssh(args, f"rm -rf {code} && mkdir -p {code}"),
            gcloud(args, "scp", *sources, f"{args.name}:{args.remote_dir}")
            + ["--worker=all", "--recurse"],
            ssh(args, pip),
        ]
    if args.command == "run":
        train = shlex.join(
            [
                "-u",
                "-m",
                "llada_jax.train",
                f"--config={args.config}",
                f"--workdir={args.workdir}",
                *train_args,
            ]
        )
        return [
            ssh(
                args,
                (
                    f"cd {code} || exit 1; "
                    f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
                    f'echo "$(hostname): training is still running (pid $(cat {pid}))" >&2; '
                    f"exit 1; fi; "
                    f"nohup {venv}/bin/python {train} >> {log} 2>&1 < /dev/null & "
                    f'echo $! > {pid}; echo "$(hostname): started pid $!, log {log}"'
                ),
            )
        ]
    if args.command == "tail":
        return [ssh(args, f"tail -n {args.lines} -F {log}", worker=str(args.worker))]
    if args.command == "stop":
        return [
            ssh(
                args,
                (
                    f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
                    f'p=$(cat {pid}); kill -TERM "$p"; '
                    f'echo "$(hostname): sent SIGTERM to $p, waiting for it to save and exit"; '
                    f'while kill -0 "$p" 2>/dev/null; do sleep 2; done; '
                    f'echo "$(hostname): stopped"; '
                    f'else echo "$(hostname): not running"; fi'
                ),
            )
        ]
    return [gcloud(args, "delete", args.name)]  # delete


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

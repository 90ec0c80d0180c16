"""Several training processes on this machine, joined by jax.distributed over localhost.

  python launch/local.py --num_processes=2 [--devices_per_process=4] [--gpus_per_process=G]
      [--port=0] [--kill_after=30] [--python=PYTHON] [--dry_run] -- <train flags...>

Process i runs `PYTHON -u -m llada_jax.train <train flags> --coordinator=127.0.0.1:PORT
--num_processes=N --process_id=i` in the current directory (a single process gets no
distributed flags). --devices_per_process=D sets XLA_FLAGS=--xla_force_host_platform_device_count=D
(D fake CPU devices per process, for testing; other XLA_FLAGS are kept);
--gpus_per_process=G gives process i the GPUs i*G .. i*G+G-1 via CUDA_VISIBLE_DEVICES (counted
within an inherited CUDA_VISIBLE_DEVICES, if any). --port=0 picks a free port.

Output: with more than one process every line of process i's stdout (stderr) is written to
this stdout (stderr) prefixed with `[i] `; a single process writes unprefixed. The exit status is
0 when all processes exit 0, else the first failure's status (128+N for death by signal N). When
one process fails the others get SIGTERM and, if still running --kill_after seconds later,
SIGKILL. SIGTERM or SIGINT sent to the launcher is forwarded to every process (the trainer saves
a checkpoint on SIGTERM and exits 0); a second one kills them. The processes run in their own
session and get SIGTERM if the launcher dies.
--dry_run prints the command of each process, one per line with its environment assignments
(as a shell would take them), and exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def parse(argv: list[str]):
    own, train_args = _cli.split_argv(argv)
    p = _cli.Parser(
        prog="launch/local.py",
        description="Run N training processes on this machine (jax.distributed).",
    )
    p.add_argument("--num_processes", type=int, required=True, help="Number of processes.")
    p.add_argument(
        "--devices_per_process",
        type=int,
        default=None,
        help="Fake CPU devices per process (XLA_FLAGS), for testing.",
    )
    p.add_argument(
        "--gpus_per_process",
        type=int,
        default=None,
        help="GPUs per process: CUDA_VISIBLE_DEVICES split in consecutive groups.",
    )
    p.add_argument("--port", type=int, default=0, help="Coordinator port; 0 picks a free one.")
    p.add_argument(
        "--kill_after",
        type=float,
        default=30.0,
        help="Seconds between SIGTERM and SIGKILL when stopping after a failure.",
    )
    p.add_argument("--python", default=sys.executable, help="Python interpreter to run.")
    _cli.add_bool(p, "dry_run", "Print the commands and exit.")
    args = p.parse_args(own)
    _cli.positive("num_processes", args.num_processes)
    if args.devices_per_process is not None:
        _cli.positive("devices_per_process", args.devices_per_process)
    if args.gpus_per_process is not None:
        _cli.positive("gpus_per_process", args.gpus_per_process)
    if not 0 <= args.port <= 65535:
        raise _cli.UsageError(f"--port={args.port} must be in [0, 65535] (0 picks a free port)")
    if args.kill_after < 0:
        raise _cli.UsageError(f"--kill_after={args.kill_after} must be >= 0")
    if not train_args:
        raise _cli.UsageError(
            "no training flags: give them after `--`, e.g. "
            "-- --config=configs/tiny.py --workdir=runs/x"
        )
    _cli.reject_flags(train_args, _cli.DISTRIBUTED_FLAGS, "local.py sets it for each process")
    return args, train_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(args, train_args: list[str], environ) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, environment variables set by the launcher) of each process."""
    n = args.num_processes
    port = args.port or free_port()
    gpus = (
        _cli.gpu_groups(
            n,
            args.gpus_per_process,
            environ.get("CUDA_VISIBLE_DEVICES"),
            f"--num_processes={n} x --gpus_per_process={args.gpus_per_process}",
        )
        if args.gpus_per_process
        else None
    )
    out = []
    for i in range(n):
        env = {}
        if args.devices_per_process:
            env["XLA_FLAGS"] = _cli.xla_device_count(
                environ.get("XLA_FLAGS", ""), args.devices_per_process
            )
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        argv = [args.python, "-u", "-m", "llada_jax.train", *train_args]
        if n > 1:
            argv += [f"--coordinator=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
        out.append((argv, env))
    return out


def _die_with_parent():
    """In the child: SIGTERM when the launcher dies (Linux), so no run outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: best effort
        pass


def _status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def run(cmds, kill_after: float) -> int:
    n = len(cmds)
    received: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: received.append(signum))
    if n == 1:  # nothing to interleave: the process writes straight to our stdout/stderr
        argv, env = cmds[0]
        procs = [
            subprocess.Popen(
                argv,
                env=dict(os.environ, **env),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        ]
    else:
        procs = [
            subprocess.Popen(
                argv,
                env=dict(os.environ, **env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            for argv, env in cmds
        ]
    # Readers start after every process is forked (preexec_fn and threads do not mix).
    lock = threading.Lock()
    threads = []
    if n > 1:
        for i, p in enumerate(procs):
            for pipe, out in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
                t = threading.Thread(
                    target=_cli.pump_lines, args=(pipe, out, f"[{i}] ".encode(), lock), daemon=True
                )
                t.start()
                threads.append(t)

    def send(sig):
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def note(msg):
        with lock:
            sys.stdout.flush()
            print(f"launch/local.py: {msg}", file=sys.stderr, flush=True)

    failure = None  # exit status of the first process that failed on its own
    forwarded = 0  # signals forwarded from the user
    kill_at = None  # when to SIGKILL what is left after a failure
    reported = set()
    while True:
        while received:
            sig = received.pop(0)
            forwarded += 1
            if forwarded == 1:
                note(f"got {signal.Signals(sig).name}; forwarding it to the processes")
                send(sig)
            else:
                note("second signal: killing the processes")
                send(signal.SIGKILL)
        running = False
        for i, p in enumerate(procs):
            rc = p.poll()
            if rc is None:
                running = True
            elif i not in reported:
                reported.add(i)
                if rc != 0 and failure is None:
                    failure = _status(rc)
                    if not forwarded and any(q.poll() is None for q in procs):
                        note(
                            f"process {i} exited with status {failure}; sending SIGTERM to "
                            f"the others"
                        )
                        send(signal.SIGTERM)
                        kill_at = time.monotonic() + kill_after
        if not running:
            break
        if kill_at is not None and time.monotonic() >= kill_at:
            note(f"still running {kill_after:g}s after SIGTERM: killing")
            send(signal.SIGKILL)
            kill_at = None
        time.sleep(0.05)
    for t in threads:
        t.join()
    return failure or 0


def main(argv: list[str]) -> int:
    try:
        args, train_args = parse(argv[1:])
        cmds = commands(args, train_args, os.environ)
    except _cli.UsageError as e:
        _cli.fail(str(e))
    if args.dry_run:
        for cmd, env in cmds:
            print(_cli.shell_line(cmd, env))
        return 0
    return run(cmds, args.kill_after)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Expand an ablation config into its runs, run them (resumably), show them.

  python launch/sweep.py --config=configs/ablations/<name>.py --sweep_dir=DIR [--dry_run]
      [--only=RUN,RUN] [--evaluate=true|false] [--python=PYTHON]
      [--parallel=N [--gpus_per_run=G | --devices_per_run=D]]
      [--submit=slurm|tpu_pod --submit_args="..."]
  python launch/sweep.py status DIR

Each run of the config's SWEEP (llada_jax/sweep.py) trains in DIR/runs/<run name> with
`python -m llada_jax.train --config=FILE:<run name>`, then `tools/evaluate.py --watch` scores each
of its checkpoints on the held-out data (same tokens and masks for every run). A run whose last
step is evaluated (trained, with --evaluate=false) is finished and skipped; an interrupted run
resumes from its checkpoints, so the whole sweep can be killed and started again at any moment.
DIR/sweep.json records the config and its runs. `status DIR` prints a table: each run's state,
step, last training loss and latest bits per token.

--parallel=N runs N at once, each on its own slice of the devices: --gpus_per_run=G gives slot i
the GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES), --devices_per_run=D gives every run D fake CPU
devices (testing); without either they share the machine. Their output lines are prefixed with
the run's name.
--submit hands each unfinished run's training to a cluster launcher instead: `launch/slurm.py
SUBMIT_ARGS -- <train flags>` (one batch job per run, --job_name defaults to the run's name) or
`launch/tpu_pod.py run SUBMIT_ARGS <train flags>` (one TPU per run: name it with `{run}`, e.g.
--submit_args="--name=abl-{run} --zone=Z"); `{run}` in SUBMIT_ARGS is replaced by the run's name.
The sweep directory must then be one every job can write (gs://... for TPU pods). Once the jobs
are done, the same command without --submit evaluates the trained runs.
DIR may be a gs://bucket/... prefix (the `gcs` extra): its files (sweep.json, the runs'
workdirs) are read and written through llada_jax/files.py, locally or with --submit alike, and
`status gs://...` reads them from any machine (sweep.json records each run's final step, so the
config file need not be there).
--dry_run prints the commands instead of running them. A run that fails stops the sweep (runs
already going finish) with its exit status; bad arguments are one error line, exit 2.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import shlex
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _cli  # noqa: E402

from llada_jax import files  # noqa: E402

SWEEP_FILE = "sweep.json"
SUBMITTERS = ("slurm", "tpu_pod")


def load_sweep(path: str):
    """The SWEEP of an ablation config file, checked."""
    import importlib.util

    from llada_jax import config as config_lib

    if not os.path.isfile(path):
        raise _cli.UsageError(f"--config={path!r} does not exist")
    spec = importlib.util.spec_from_file_location("ablation_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = getattr(module, "SWEEP", None)
    if sweep is None:
        raise _cli.UsageError(f"--config={path!r} defines no SWEEP (see llada_jax/sweep.py)")
    try:
        sweep.check()
    except config_lib.ConfigError as e:
        raise _cli.UsageError(str(e)) from None
    return sweep


def run_dir(sweep_dir: str, name: str) -> str:
    return files.join(sweep_dir, "runs", name)


def final_step(sweep, name: str) -> int:
    return sweep.run_config(name).train.steps


def finished(workdir: str, steps: int, evaluate: bool) -> bool:
    if evaluate:
        return files.isfile(files.join(workdir, "eval", f"step_{steps}.json"))
    return files.isfile(files.join(workdir, "checkpoints", str(steps), "commit_success.txt"))


def commands(args, name: str) -> list[list[str]]:
    workdir = run_dir(args.sweep_dir, name)
    cmds = [
        [
            args.python,
            "-m",
            "llada_jax.train",
            f"--config={args.config}:{name}",
            f"--workdir={workdir}",
        ]
    ]
    if args.evaluate:
        evaluate = os.path.join(_cli.ROOT, "tools", "evaluate.py")
        cmds.append([args.python, evaluate, f"--workdir={workdir}", "--watch"])
        cmds[-1] += ["--idle_timeout=1", "--poll_sec=1", "--progress=false"]
    return cmds


def submit_command(args, name: str) -> list[str]:
    """The cluster launcher's command line that trains run `name` (--submit)."""
    workdir = run_dir(args.sweep_dir, name)
    extra = [a.replace("{run}", name) for a in shlex.split(args.submit_args)]
    # The jobs run in a checkout of their own: name a config inside this one relative to it.
    config = os.path.abspath(args.config)
    if config.startswith(_cli.ROOT + os.sep):
        config = os.path.relpath(config, _cli.ROOT)
    train = [f"--config={config}:{name}", f"--workdir={workdir}"]
    launcher = os.path.join(_cli.ROOT, "launch", f"{args.submit}.py")
    if args.submit == "slurm":
        if not any(_cli.flag_name(a) == "--job_name" for a in extra):
            extra.append(f"--job_name={name}")
        return [args.python, launcher, *extra, "--", *train]
    return [args.python, launcher, "run", *extra, *train]


def slot_envs(args, environ) -> list[dict[str, str]]:
    """What each of the --parallel slots adds to the environment: its slice of the devices."""
    n = args.parallel
    if args.gpus_per_run:
        asked = f"--parallel={n} x --gpus_per_run={args.gpus_per_run}"
        groups = _cli.gpu_groups(n, args.gpus_per_run, environ.get("CUDA_VISIBLE_DEVICES"), asked)
        return [{"CUDA_VISIBLE_DEVICES": g} for g in groups]
    if args.devices_per_run:
        flags = _cli.xla_device_count(environ.get("XLA_FLAGS", ""), args.devices_per_run)
        return [{"XLA_FLAGS": flags} for _ in range(n)]
    return [{} for _ in range(n)]


def call(cmd: list[str], env: dict[str, str], prefix: str, lock: threading.Lock) -> int:
    """Runs cmd to its end; with a prefix its output lines are copied prefixed."""
    if not prefix:
        return subprocess.call(cmd, env=dict(os.environ, **env))
    proc = subprocess.Popen(
        cmd, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    _cli.pump_lines(proc.stdout, sys.stdout.buffer, prefix.encode(), lock)
    return proc.wait()


def run_sweep(args) -> int:
    sweep = load_sweep(args.config)
    names = sweep.run_names()
    only = [n for n in args.only.split(",") if n] if args.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise _cli.UsageError(f"--only: unknown run {unknown[0]!r}; runs: {', '.join(names)}")
    envs = slot_envs(args, os.environ)
    if args.dry_run:
        for i, name in enumerate(only):
            if args.submit:
                print(_cli.shell_line(submit_command(args, name)))
                continue
            for cmd in commands(args, name):
                print(_cli.shell_line(cmd, envs[i % args.parallel]))
        return 0
    write_record(args, sweep, names)
    todo = []
    for i, name in enumerate(only, 1):
        workdir = run_dir(args.sweep_dir, name)
        if finished(workdir, final_step(sweep, name), args.evaluate and not args.submit):
            print(f"[sweep] {i}/{len(only)} {name}: finished, skipped", flush=True)
        else:
            todo.append((i, name))
    if args.submit:
        for i, name in todo:
            print(f"[sweep] {i}/{len(only)} {name}: submitted", flush=True)
            rc = subprocess.call(submit_command(args, name))
            if rc != 0:
                print(f"[sweep] submitting {name} failed (exit {rc})", flush=True)
                return rc
        return 0
    rc = run_local(args, todo, len(only), envs)
    if rc == 0:
        print(
            f"[sweep] all {len(only)} runs finished; python launch/sweep.py status {args.sweep_dir}"
        )
    return rc


def write_record(args, sweep, names: list[str]) -> None:
    """DIR/sweep.json, replaced in one step: the config, the runs, whether they are evaluated
    and each run's final step (what `status` needs, so it reads without the config file)."""
    files.makedirs(files.join(args.sweep_dir, "runs"))
    record = {
        "config": os.path.abspath(args.config),
        "runs": names,
        "evaluate": args.evaluate,
        "steps": {name: final_step(sweep, name) for name in names},
    }
    files.write_atomically(files.join(args.sweep_dir, SWEEP_FILE), json.dumps(record, indent=1))


def run_local(args, todo: list[tuple[int, str]], total: int, envs: list[dict[str, str]]) -> int:
    """Runs the runs of `todo` on --parallel slots; the first failure's exit status, else 0.
    After a failure no new run starts."""
    slots: queue.Queue = queue.Queue()
    for env in envs:
        slots.put(env)
    lock = threading.Lock()
    failures: list[int] = []

    def one(i: int, name: str) -> None:
        env = slots.get()
        try:
            if failures:
                return
            print(f"[sweep] {i}/{total} {name}", flush=True)
            prefix = f"[{name}] " if args.parallel > 1 else ""
            for cmd in commands(args, name):
                rc = call(cmd, env, prefix, lock)
                if rc != 0:
                    print(f"[sweep] {name} failed (exit {rc}); run the sweep again to resume")
                    failures.append(rc)
                    return
        finally:
            slots.put(env)

    pool = concurrent.futures.ThreadPoolExecutor(args.parallel)
    futures = [pool.submit(one, i, name) for i, name in todo]
    try:
        for future in futures:
            future.result()
    except KeyboardInterrupt:  # the runs got it too: let them stop, start no new one
        failures.append(130)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return failures[0] if failures else 0


def status(sweep_dir: str) -> int:
    sweep_dir = checked_dir(sweep_dir)
    path = files.join(sweep_dir, SWEEP_FILE)
    if not files.isfile(path):
        raise _cli.UsageError(f"{sweep_dir!r} holds no {SWEEP_FILE} (not a sweep directory)")
    record = read_json(path)
    if not isinstance(record.get("runs"), list):
        raise _cli.UsageError(f"{path} holds no list of runs (not a sweep record)")
    final = record.get("steps")  # absent from the records of older versions: ask the config
    if not isinstance(final, dict) or any(name not in final for name in record["runs"]):
        if not isinstance(record.get("config"), str):
            raise _cli.UsageError(f"{path} names no config (not a sweep record)")
        sweep = load_sweep(record["config"])
        final = {name: final_step(sweep, name) for name in record["runs"]}
    rows = [("run", "state", "step", "loss", "bits/token")]
    for name in record["runs"]:
        workdir, steps = run_dir(sweep_dir, name), final[name]
        metrics = last_line(files.join(workdir, "metrics.jsonl"))
        evaluated = last_eval(workdir)
        step = metrics.get("step", 0)
        if finished(workdir, steps, record["evaluate"]):
            state = "finished"
        elif step:
            state = "trained" if step >= steps else "interrupted"
        else:
            state = "not started"
        bits = (
            f"{evaluated['bits_per_token']:.4f} +- {evaluated['bits_stderr']:.4f}"
            if evaluated
            else "-"
        )
        loss = f"{metrics['loss']:.4f}" if "loss" in metrics else "-"
        rows.append((name, state, f"{step}/{steps}", loss, bits))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def last_line(path: str) -> dict:
    """The last record of a metrics file ({} if none), read as the trainer reads it (a line cut
    short by a kill is dropped; any other bad line is a UsageError naming it)."""
    from llada_jax import metrics

    try:
        records = metrics.read_jsonl(path)
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None
    return records[-1] if records else {}


def last_eval(workdir: str) -> dict | None:
    """The newest evaluation of a workdir (eval/step_<N>.json of the largest N), None if none."""
    directory = files.join(workdir, "eval")
    steps = [
        int(n[5:-5])
        for n in files.listdir(directory)
        if n.startswith("step_") and n.endswith(".json") and n[5:-5].isdigit()
    ]
    if not steps:
        return None
    return read_json(files.join(directory, f"step_{max(steps)}.json"))


def read_json(path: str) -> dict:
    """A JSON object file (local or gs://); a UsageError naming it if it is not one."""
    try:
        value = json.loads(files.read_bytes(path).decode("utf-8"))
    except ValueError as e:  # invalid UTF-8 or JSON
        raise _cli.UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise _cli.UsageError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def checked_dir(sweep_dir: str, check: bool = True) -> str:
    """A sweep directory as given, a URI without its trailing slash; with `check`, a UsageError
    (one line) if the URI's file system is not installed (gs:// without the gcs extra)."""
    if not files.is_uri(sweep_dir):
        return sweep_dir
    if check:
        try:
            files.check_uri(sweep_dir)
        except ValueError as e:
            raise _cli.UsageError(str(e)) from None
    return sweep_dir.rstrip("/")


def parse(argv: list[str]):
    p = _cli.Parser(prog="launch/sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="An ablation config file (defines SWEEP).")
    p.add_argument("--sweep_dir", required=True, help="Where the runs' workdirs go.")
    p.add_argument("--only", default="", help="Comma-separated run names (default: all).")
    p.add_argument("--python", default=sys.executable, help="Python of the runs.")
    _cli.add_bool(p, "dry_run", "Print the commands and exit.")
    p.add_argument(
        "--evaluate", type=_cli.boolean, default=True, help="Evaluate each run's checkpoints."
    )
    p.add_argument("--parallel", type=int, default=1, help="Runs at once on this machine.")
    p.add_argument("--gpus_per_run", type=int, default=0, help="GPUs of each parallel slot.")
    p.add_argument("--devices_per_run", type=int, default=0, help="Fake CPU devices per run.")
    p.add_argument("--submit", default="", help=f"Submit training via: {', '.join(SUBMITTERS)}.")
    p.add_argument("--submit_args", default="", help="Flags for the --submit launcher.")
    args = p.parse_args(argv)
    _cli.positive("parallel", args.parallel)
    for name in ("gpus_per_run", "devices_per_run"):
        if getattr(args, name):
            _cli.positive(name, getattr(args, name))
    if args.gpus_per_run and args.devices_per_run:
        raise _cli.UsageError("--gpus_per_run and --devices_per_run: give one of them")
    if args.submit and args.submit not in SUBMITTERS:
        raise _cli.UsageError(f"--submit={args.submit!r}: valid choices: {', '.join(SUBMITTERS)}")
    if args.submit_args and not args.submit:
        raise _cli.UsageError("--submit_args needs --submit=slurm|tpu_pod")
    args.sweep_dir = checked_dir(args.sweep_dir, check=not args.dry_run)  # a dry run reads none
    return args


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["status"]:
            if len(argv) != 2:
                raise _cli.UsageError("usage: launch/sweep.py status DIR")
            return status(argv[1])
        return run_sweep(parse(argv))
    except _cli.UsageError as e:
        _cli.fail(str(e))
    except KeyboardInterrupt:
        print("[sweep] interrupted; run the sweep again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

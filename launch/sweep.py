"""Expand an ablation config into its runs, run them one after another (resumably), show them.

  python launch/sweep.py --config=configs/ablations/<name>.py --sweep_dir=DIR [--dry_run]
      [--only=RUN,RUN] [--evaluate=true|false] [--python=PYTHON]
  python launch/sweep.py status DIR

Each run of the config's SWEEP (llada_jax/sweep.py) trains in DIR/runs/<run name> with
`python -m llada_jax.train --config=FILE:<run name>`, then `tools/evaluate.py --watch` scores each
of its checkpoints on the held-out data (same tokens and masks for every run). A run whose last
step is evaluated (trained, with --evaluate=false) is finished and skipped; an interrupted run
resumes from its checkpoints, so the whole sweep can be killed and started again at any moment.
DIR/sweep.json records the config and its runs. --dry_run prints the commands. `status DIR`
prints a table: each run's state, step, last training loss and latest bits per token. A run that
fails stops the sweep with its exit status; bad arguments are one error line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _cli  # noqa: E402

SWEEP_FILE = "sweep.json"


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
    return os.path.join(sweep_dir, "runs", name)


def final_step(sweep, name: str) -> int:
    return sweep.run_config(name).train.steps


def finished(workdir: str, steps: int, evaluate: bool) -> bool:
    if evaluate:
        return os.path.isfile(os.path.join(workdir, "eval", f"step_{steps}.json"))
    return os.path.isfile(os.path.join(workdir, "checkpoints", str(steps), "commit_success.txt"))


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


def run_sweep(args) -> int:
    sweep = load_sweep(args.config)
    names = sweep.run_names()
    only = [n for n in args.only.split(",") if n] if args.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise _cli.UsageError(f"--only: unknown run {unknown[0]!r}; runs: {', '.join(names)}")
    if args.dry_run:
        for name in only:
            for cmd in commands(args, name):
                print(_cli.shell_line(cmd))
        return 0
    os.makedirs(os.path.join(args.sweep_dir, "runs"), exist_ok=True)
    record = {"config": os.path.abspath(args.config), "runs": names, "evaluate": args.evaluate}
    tmp = os.path.join(args.sweep_dir, SWEEP_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(args.sweep_dir, SWEEP_FILE))
    for i, name in enumerate(only, 1):
        workdir = run_dir(args.sweep_dir, name)
        if finished(workdir, final_step(sweep, name), args.evaluate):
            print(f"[sweep] {i}/{len(only)} {name}: finished, skipped", flush=True)
            continue
        print(f"[sweep] {i}/{len(only)} {name}", flush=True)
        for cmd in commands(args, name):
            rc = subprocess.call(cmd)
            if rc != 0:
                print(f"[sweep] {name} failed (exit {rc}); run the sweep again to resume")
                return rc
    print(f"[sweep] all {len(only)} runs finished; python launch/sweep.py status {args.sweep_dir}")
    return 0


def status(sweep_dir: str) -> int:
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        raise _cli.UsageError(f"{sweep_dir!r} holds no {SWEEP_FILE} (not a sweep directory)")
    with open(path) as f:
        record = json.load(f)
    sweep = load_sweep(record["config"])
    rows = [("run", "state", "step", "loss", "bits/token")]
    for name in record["runs"]:
        workdir, steps = run_dir(sweep_dir, name), final_step(sweep, name)
        metrics = last_line(os.path.join(workdir, "metrics.jsonl"))
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
    """The last complete JSON line of a metrics file ({} if none)."""
    if not os.path.isfile(path):
        return {}
    record = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                pass
    return record


def last_eval(workdir: str) -> dict | None:
    directory = os.path.join(workdir, "eval")
    if not os.path.isdir(directory):
        return None
    steps = [
        int(n[5:-5]) for n in os.listdir(directory) if n.startswith("step_") and n.endswith(".json")
    ]
    if not steps:
        return None
    with open(os.path.join(directory, f"step_{max(steps)}.json")) as f:
        return json.load(f)


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
    return p.parse_args(argv)


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

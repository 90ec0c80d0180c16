"""Two real processes on localhost (CPU, gloo collectives), started by launch/local.py: same losses
as one process with the same global batch; checkpoints move between 2 and 1 processes; only
process 0 writes."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETERMINISTIC = ("loss", "grad_norm", "lr", "num_masked", "masked_ce", "skipped")


def launch(workdir, processes, steps):
    """Runs the tiny config over 8 devices in total through launch/local.py: 8 fake CPU devices
    in one process, or 4 in each of 2. Returns each process's stdout (the launcher prefixes the
    lines of process i with `[i] ` when there are several)."""
    train = ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.sample.num_samples=0",
             "--config.train.log_every=1", f"--config.train.steps={steps}",
             "--config.checkpoint.save_every=3"]
    p = subprocess.run([sys.executable, "launch/local.py", f"--num_processes={processes}",
                        f"--devices_per_process={8 // processes}", "--", *train],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if processes == 1:
        return [p.stdout]
    lines = p.stdout.splitlines(keepends=True)
    assert all(line.startswith(tuple(f"[{i}] " for i in range(processes))) for line in lines)
    return ["".join(line[len(f"[{i}] "):] for line in lines if line.startswith(f"[{i}] "))
            for i in range(processes)]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: r[k] for k in ("step",) + DETERMINISTIC} for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    two, one = str(root / "two"), str(root / "one")
    stdout_two = launch(two, 2, 6)
    launch(one, 1, 6)
    return two, one, stdout_two


def assert_close(a, b):
    """Same steps and counts; floats equal up to the order of cross-process reductions."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5), (x, y)


def test_two_processes_match_one(runs):
    two, one, stdout = runs
    assert_close(metrics(two), metrics(one))
    assert "step 6/6" in stdout[0] and "step" not in stdout[1]  # only process 0 logs


def test_checkpoints_move_between_process_counts(runs):
    """The 2-process checkpoint resumes in 1 process and the 1-process one in 2: both continue
    with the same metrics."""
    two, one, _ = runs
    launch(two, 1, 8)
    launch(one, 2, 8)
    continued = metrics(two)
    assert [r["step"] for r in continued] == list(range(1, 9))
    assert_close(continued, metrics(one))

"""Two real processes on localhost (CPU, gloo collectives), started by launch/local.py: same losses
as one process with the same global batch; checkpoints move between 2 and 1 processes; only
process 0 writes; a SIGTERM to one process stops both at one saved step."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llada_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETERMINISTIC = ("loss", "grad_norm", "lr", "num_masked", "masked_ce", "skipped")


def launch(workdir, processes, steps):
    """Runs the tiny config over 8 devices in total through launch/local.py: 8 fake CPU devices
    in one process, or 4 in each of 2. Returns each process's stdout (the launcher prefixes the
    lines of process i with `[i] ` when there are several)."""
    train = [
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.sample.num_samples=0",
        "--config.train.log_every=1",
        f"--config.train.steps={steps}",
        "--config.checkpoint.save_every=3",
    ]
    p = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            f"--num_processes={processes}",
            f"--devices_per_process={8 // processes}",
            "--",
            *train,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    if processes == 1:
        return [p.stdout]
    lines = p.stdout.splitlines(keepends=True)
    assert all(line.startswith(tuple(f"[{i}] " for i in range(processes))) for line in lines)
    return [
        "".join(line[len(f"[{i}] ") :] for line in lines if line.startswith(f"[{i}] "))
        for i in range(processes)
    ]


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


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(runs):
    """The 2-process checkpoint resumes in 1 process and the 1-process one in 2: both continue
    with the same metrics."""
    two, one, _ = runs
    launch(two, 1, 8)
    launch(one, 2, 8)
    continued = metrics(two)
    assert [r["step"] for r in continued] == list(range(1, 9))
    assert_close(continued, metrics(one))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_saved_step(tmp_path):
    """A preemption notice reaching one process only: both save the same checkpoint (the save
    is collective) and exit 0, instead of the signalled one saving alone while the other hangs
    in its next step. The processes are launch/local.py's (its --dry_run commands), started
    here so that only process 1 gets the signal."""
    workdir = str(tmp_path / "preempted")
    train = [
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.sample.num_samples=0",
        "--config.train.log_every=1",
        "--config.train.steps=2000",
    ]
    dry = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            "--num_processes=2",
            "--devices_per_process=4",
            "--dry_run",
            "--",
            *train,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    procs = []
    for line in dry.stdout.splitlines():  # ENV=VALUE ... python -u -m llada_jax.train ...
        words = shlex.split(line)
        n_env = next(i for i, w in enumerate(words) if not re.match(r"[A-Z_][A-Z0-9_]*=", w))
        procs.append(
            subprocess.Popen(
                words[n_env:],
                cwd=ROOT,
                env=dict(os.environ, **dict(w.split("=", 1) for w in words[:n_env])),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    try:
        metrics_file, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 300
        while not (os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    saved = checkpoint.Checkpointer(workdir).latest_step()
    assert 3 <= saved < 2000
    assert f"SIGTERM: saved a checkpoint at step {saved}; exiting" in outputs[0][0]


@pytest.mark.slow
def test_a_damaged_step_is_set_aside_by_both_processes_together(runs, tmp_path):
    """Bytes flipped in what process 1 wrote of the latest step: whichever process fails to
    read or verify it, both agree, set it aside once, and resume from the step before (a
    process deciding alone would leave the other in a collective)."""
    two = str(tmp_path / "two")
    shutil.copytree(runs[0], two)
    directory = checkpoint.checkpoint_dir(two)
    *_, before, latest = checkpoint.complete_steps(directory)
    params = os.path.join(directory, str(latest), "params")
    written = [os.path.join(params, n, "d") for n in ("ocdbt.process_1", "ocdbt.process_0", "")]
    data = next(d for d in written if os.path.isdir(d) and os.listdir(d))
    path = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
    with open(path, "r+b") as f:
        blob = bytearray(f.read())
        for i in range(20):
            blob[len(blob) // 2 + 3 * i] ^= 0xFF
        f.seek(0)
        f.write(blob)
    original = metrics(two)
    stdout = launch(two, 2, latest)
    assert f"checkpoint step {latest} in" in stdout[0] and "is damaged" in stdout[0]
    assert f"resumed at step {before}" in stdout[0]
    assert os.listdir(os.path.join(two, "damaged_checkpoints")) == [str(latest)]
    assert checkpoint.complete_steps(directory)[-1] == latest
    assert_close(metrics(two), original)

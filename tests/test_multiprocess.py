"""Real processes on localhost (CPU, gloo collectives), started by launch/local.py: same losses as
one process with the same global batch, also when processes share batch rows (a tensor axis
across them); the end-of-run samples and bound on every process; checkpoints move between 2 and
1 processes; only process 0 writes; a SIGTERM to one process stops all at one saved step; the
step to start from is process 0's whatever the others' listings show."""

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


def train_args(workdir, *extra):
    """The tiny config on an FSDP mesh (the pod configs' layout), with its default end of run
    (samples) and the held-out bound: the parts a multi-process run can hang in."""
    return [
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.mesh.shape=(1,-1,1)",
        "--config.train.final_bound=True",
        "--config.train.log_every=1",
        *extra,
    ]


def launch(workdir, processes, steps, *extra, devices=8):
    """Runs the tiny config over `devices` in total through launch/local.py: all in one process,
    or split evenly over `processes`. Returns each process's stdout (the launcher prefixes the
    lines of process i with `[i] ` when there are several)."""
    args = train_args(workdir, f"--config.train.steps={steps}", "--config.checkpoint.save_every=3")
    p = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            f"--num_processes={processes}",
            f"--devices_per_process={devices // processes}",
            "--",
            *args,
            *extra,
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


def start(args, processes, devices_per_process, env_of=lambda i: {}):
    """The processes of launch/local.py (its --dry_run commands) started here, each with its own
    environment added (`env_of(i)`), so that a test can signal or alter one of them."""
    dry = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            f"--num_processes={processes}",
            f"--devices_per_process={devices_per_process}",
            "--dry_run",
            "--",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    procs = []
    for i, line in enumerate(dry.stdout.splitlines()):  # ENV=VALUE ... python -u -m ...
        words = shlex.split(line)
        n_env = next(k for k, w in enumerate(words) if not re.match(r"[A-Z_][A-Z0-9_]*=", w))
        env = dict(os.environ, **dict(w.split("=", 1) for w in words[:n_env]), **env_of(i))
        procs.append(
            subprocess.Popen(
                words[n_env:],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def finish(procs, timeout=300):
    """Each process's (stdout, stderr), once all have exited 0 (killed if one does not)."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), [e[-2000:] for _, e in outputs]
    return outputs


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


@pytest.mark.slow
def test_two_processes_match_one(runs):
    """Same losses; both processes take part in the end-of-run samples and held-out bound on
    the FSDP mesh (parameters sharded over both) and exit 0; process 0 alone prints."""
    two, one, stdout = runs
    assert_close(metrics(two), metrics(one))
    assert "step 6/6" in stdout[0] and "step" not in stdout[1]  # only process 0 logs
    for printed in ("samples (4 steps", "sample words, trained", "held-out bound (16384 tokens"):
        assert stdout[0].count(printed) == 1 and printed not in stdout[1], printed


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
    """A preemption notice reaching one process only, in a run that saves on a clock
    (checkpoint.save_every_sec): both save the same checkpoint (the save is collective) and
    exit 0, instead of the signalled one saving alone while the other hangs in its next step;
    the clock saves before it were taken together too (each process's own clock would disagree
    on the step)."""
    workdir = str(tmp_path / "preempted")
    args = train_args(
        workdir,
        "--config.train.steps=2000",
        "--config.checkpoint.save_every=0",
        "--config.checkpoint.save_every_sec=1",
        "--config.checkpoint.max_to_keep=None",
    )
    procs = start(args, 2, 4)
    metrics_file, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 300
    try:
        while not (os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= 40):
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs, timeout=120)
    *by_clock, saved = checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir))
    assert by_clock and 40 <= saved < 2000
    assert f"SIGTERM: saved a checkpoint at step {saved}; exiting" in outputs[0][0]
    assert "samples (" not in outputs[0][0]  # preempted: no end-of-run work


HIDE = """
import os

_listdir = os.listdir


def listdir(path="."):
    names = _listdir(path)
    if os.path.abspath(path) == os.environ["HIDE_IN_DIR"]:
        names = [n for n in names if n != os.environ["HIDE_NAME"]]
    return names


os.listdir = listdir
"""


@pytest.mark.slow
def test_processes_with_different_listings_start_from_the_same_step(runs, tmp_path):
    """Process 1's listing of train.init_from's checkpoints does not show its newest step (a
    shared filesystem's attribute cache, an object store's listing during a save): both
    processes still start from the step process 0 sees, so the first loss equals a run in
    which every process sees it."""
    source = runs[0]
    newest = checkpoint.complete_steps(checkpoint.checkpoint_dir(source))[-1]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE)
    hidden = {
        "PYTHONPATH": str(hook),
        "HIDE_IN_DIR": checkpoint.checkpoint_dir(source),
        "HIDE_NAME": str(newest),
    }
    args = lambda w: train_args(  # noqa: E731
        w,
        "--config.train.steps=4",
        f"--config.train.init_from={source}",
        "--config.sample.num_samples=0",
        "--config.train.final_bound=False",
    )
    finish(start(args(str(tmp_path / "views")), 2, 4, lambda i: hidden if i == 1 else {}))
    finish(start(args(str(tmp_path / "same")), 2, 4))
    assert_close(metrics(str(tmp_path / "views")), metrics(str(tmp_path / "same")))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["(2,1,2)", "(1,2,2)"])
def test_processes_sharing_batch_rows_match_one(tmp_path, mesh):
    """4 processes of 1 device with the tensor axis across processes: the two processes of each
    tensor pair hold the same batch rows, read the same ones, and every step's loss equals a
    one-process run on 4 devices."""
    four, one = str(tmp_path / "four"), str(tmp_path / "one")
    extra = (f"--config.mesh.shape={mesh}", "--config.train.final_bound=False")
    stdout = launch(four, 4, 4, *extra, devices=4)
    launch(one, 1, 4, *extra, devices=4)
    assert_close(metrics(four), metrics(one))
    assert stdout[0].count("samples (") == 1


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

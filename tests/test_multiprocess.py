"""Two real processes on localhost (CPU, gloo collectives): same losses as one process with the
same global batch; checkpoints move between 2 and 1 processes; only process 0 writes."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETERMINISTIC = ("loss", "grad_norm", "lr", "num_masked", "masked_ce", "skipped")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, processes, steps):
    """Runs the tiny config over 8 devices in total: 8 per process, or 4 in each of 2."""
    args = [sys.executable, "-m", "llada_jax.train", "--config=configs/tiny.py",
            f"--workdir={workdir}", "--config.sample.num_samples=0", "--config.train.log_every=1",
            f"--config.train.steps={steps}", "--config.checkpoint.save_every=3"]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
    if processes == 1:
        procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)]
    else:
        port = free_port()
        procs = [subprocess.Popen(args + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                          f"--process_id={i}"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


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

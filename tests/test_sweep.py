"""Ablation sweeps: grids expanded into named runs (llada_jax/sweep.py), and launch/sweep.py
running them resumably after the whole job is killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llada_jax import config as config_lib
from llada_jax.sweep import Sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = [sys.executable, "launch/sweep.py"]


def tiny():
    return config_lib.load_config_file("configs/tiny.py")


def test_grid_expands_into_named_runs_with_their_settings():
    sweep = Sweep(
        base=tiny,
        axes={
            "schedule": {
                "linear": {"diffusion.schedule": "linear"},
                "cos": {"diffusion.schedule": "cosine"},
            },
            "t": {"iid": {}, "strat": {"diffusion.t_sampling": "stratified"}},
        },
        seeds=(0, 3),
    )
    sweep.check()
    names = sweep.run_names()
    assert len(names) == 8 and names[0] == "linear-iid-seed0" and names[-1] == "cos-strat-seed3"
    c = sweep.run_config("cos-strat-seed3")
    assert (c.diffusion.schedule, c.diffusion.t_sampling, c.seed) == ("cosine", "stratified", 3)
    assert c.eval.seed == tiny().eval.seed  # the same held-out masks for every run
    with pytest.raises(config_lib.ConfigError, match="unknown run 'cos-iid-seed1'"):
        sweep.run_config("cos-iid-seed1")


def test_unfair_grids_and_bad_labels_are_refused():
    wider = Sweep(base=tiny, axes={"width": {"a": {}, "b": {"model.d_model": 128}}})
    with pytest.raises(config_lib.ConfigError, match="differ in model.d_model.*vary_shapes"):
        wider.check()
    Sweep(base=tiny, axes=wider.axes, vary_shapes=True).check()
    longer = Sweep(base=tiny, axes={"steps": {"a": {}, "b": {"train.steps": 12}}})
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        longer.check()
    with pytest.raises(config_lib.ConfigError, match="label 'a-b' is invalid"):
        Sweep(base=tiny, axes={"x": {"a-b": {}}}).check()
    with pytest.raises(config_lib.ConfigError, match="unknown config key"):
        Sweep(base=tiny, axes={"x": {"a": {"diffusion.nope": 1}}}).check()


ABLATION = """
from llada_jax import config as config_lib
from llada_jax.sweep import Sweep

def base():
    c = config_lib.load_config_file("configs/tiny.py")
    c.checkpoint.save_every = 2
    c.sample.num_samples = 0
    c.eval.update(num_tokens=128, num_samples=2, generate=False)
    return c

SWEEP = Sweep(base=base, axes={"schedule": {
    "linear": {"diffusion.schedule": "linear"},
    "cosine": {"diffusion.schedule": "cosine"},
}})

def get_config(variant=""):
    return SWEEP.run_config(variant)
"""


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_runs(tmp_path):
    """The whole job (launcher, trainer, evaluator) is SIGKILLed once the first run is
    finished and the second has started; started again, the sweep skips the first (its files
    untouched) and finishes the second from its checkpoints."""
    config = tmp_path / "ablation.py"
    config.write_text(ABLATION)
    sweep_dir = tmp_path / "sweep"
    cmd = SWEEP + [f"--config={config}", f"--sweep_dir={sweep_dir}"]
    first = sweep_dir / "runs" / "linear-seed0"
    second = sweep_dir / "runs" / "cosine-seed0"
    job = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 600
    while not (second / "checkpoints").exists() and time.time() < deadline:
        assert job.poll() is None, job.communicate()[0].decode()[-3000:]
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate()
    assert (first / "eval" / "step_6.json").is_file()
    before = {p: os.stat(first / p).st_mtime_ns for p in ("metrics.jsonl", "eval/step_6.json")}

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1/2 linear-seed0: finished, skipped" in proc.stdout
    assert {p: os.stat(first / p).st_mtime_ns for p in before} == before
    assert sorted(os.listdir(second / "eval")) == ["step_2.json", "step_4.json", "step_6.json"]
    with open(sweep_dir / "sweep.json") as f:
        assert json.load(f)["runs"] == ["linear-seed0", "cosine-seed0"]

    table = subprocess.run(
        SWEEP + ["status", str(sweep_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["run", "state", "step"]
    for line, name in zip(lines[1:], ["linear-seed0", "cosine-seed0"]):
        assert line.split()[:3] == [name, "finished", "6/6"] and "+-" in line
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("finished, skipped") == 2


def test_bad_arguments_give_one_clear_line(tmp_path):
    cases = [
        ([f"--config={tmp_path}/none.py", f"--sweep_dir={tmp_path}"], "does not exist"),
        (["--config=configs/tiny.py", f"--sweep_dir={tmp_path}"], "defines no SWEEP"),
        (["status", str(tmp_path)], "not a sweep directory"),
    ]
    procs = [
        subprocess.Popen(
            SWEEP + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args, _ in cases
    ]
    for proc, (_, message) in zip(procs, cases):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines

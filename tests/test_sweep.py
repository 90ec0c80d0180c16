"""Ablation sweeps: grids expanded into named runs (llada_jax/sweep.py), and launch/sweep.py
running them resumably after the whole job is killed."""

import json
import os
import random
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
    # Values are checked by their sections, as the trainer checks them, before anything runs.
    with pytest.raises(config_lib.ConfigError, match=r"run 'b-seed0': diffusion.schedule='nope'"):
        Sweep(base=tiny, axes={"x": {"a": {}, "b": {"diffusion.schedule": "nope"}}}).check()


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
    "poly2": {"diffusion.schedule": "polynomial"},
}})

def get_config(variant=""):
    return SWEEP.run_config(variant)
"""


RUNS = ["linear-seed0", "cosine-seed0", "poly2-seed0"]


def eval_files(run_dir):
    directory = run_dir / "eval"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


@pytest.mark.slow
def test_a_sweep_killed_again_and_again_finishes_without_rerunning_finished_runs(tmp_path):
    """The whole job (launcher, two parallel runs' trainers and evaluators) is SIGKILLed at
    random moments, again and again, and started again each time. A run seen finished is never
    touched again; in the end every run is finished with every checkpoint evaluated."""
    config = tmp_path / "ablation.py"
    config.write_text(ABLATION)
    sweep_dir = tmp_path / "sweep"
    cmd = SWEEP + [f"--config={config}", f"--sweep_dir={sweep_dir}", "--parallel=2"]
    cmd += ["--devices_per_run=1"]
    rng = random.Random(0)
    seen_finished: dict[str, dict[str, int]] = {}  # run -> mtimes when first seen finished
    kills = 0

    def check_finished_untouched():
        for name in RUNS:
            run = sweep_dir / "runs" / name
            if "step_6.json" in eval_files(run):
                stamp = {p: os.stat(run / p).st_mtime_ns for p in ("metrics.jsonl", "eval")}
                assert seen_finished.setdefault(name, stamp) == stamp, f"{name} was rerun"

    def progress():
        """Checkpoints and evaluations on disk so far, over every run."""
        runs = sweep_dir / "runs"
        names = os.listdir(runs) if runs.is_dir() else []
        ckpts = [runs / n / "checkpoints" for n in names]
        return sum(len(eval_files(runs / n)) for n in names) + sum(
            len(os.listdir(c)) for c in ckpts if c.is_dir()
        )

    # Each start is killed a random moment after it has made some progress (keyed to progress,
    # not to a clock, so a fast machine cannot finish before the faults are exercised).
    while kills < 5:
        before = progress()
        log = open(tmp_path / "job.log", "w")  # a file, not a pipe: nobody reads it meanwhile
        job = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while job.poll() is None and progress() <= before:
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 3))
        if job.poll() is not None:
            log.close()
            assert job.returncode == 0, (tmp_path / "job.log").read_text()[-3000:]
            break
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        log.close()
        kills += 1
        check_finished_untouched()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_finished_untouched()
    assert kills >= 3, kills  # the fault was exercised, not one lucky uninterrupted start
    for name in RUNS:
        assert eval_files(sweep_dir / "runs" / name) == [
            "step_2.json",
            "step_4.json",
            "step_6.json",
        ]
    with open(sweep_dir / "sweep.json") as f:
        assert json.load(f)["runs"] == RUNS

    table = subprocess.run(
        SWEEP + ["status", str(sweep_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["run", "state", "step"]
    for line, name in zip(lines[1:], RUNS):
        assert line.split()[:3] == [name, "finished", "6/6"] and "+-" in line
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("finished, skipped") == 3


def test_dry_run_shows_device_slices_and_cluster_submissions(tmp_path):
    config = tmp_path / "ablation.py"
    config.write_text(ABLATION)
    base = SWEEP + [f"--config={config}", f"--sweep_dir={tmp_path}/s", "--dry_run"]
    runs = {
        "parallel": base + ["--parallel=2", "--gpus_per_run=2"],
        "slurm": base + ["--submit=slurm", "--submit_args=--nodes=2 --gpus_per_node=8"],
        "tpu": base + ["--submit=tpu_pod", "--submit_args=--name=abl-{run} --zone=z"],
    }
    procs = {
        k: subprocess.Popen(v, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, v in runs.items()
    }
    out = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        out[k] = stdout.strip().splitlines()
    # Train and evaluate per run, slots taking turns: GPUs 0,1 / 2,3 / 0,1.
    gpus = [line.split()[0] for line in out["parallel"]]
    assert (
        gpus
        == ["CUDA_VISIBLE_DEVICES=0,1"] * 2
        + ["CUDA_VISIBLE_DEVICES=2,3"] * 2
        + ["CUDA_VISIBLE_DEVICES=0,1"] * 2
    )
    assert f"--config={config}:cosine-seed0" in out["parallel"][2]
    assert len(out["slurm"]) == 3 and len(out["tpu"]) == 3
    for name, slurm, tpu in zip(RUNS, out["slurm"], out["tpu"]):
        words = slurm.split()
        assert words[1].endswith("launch/slurm.py") and f"--job_name={name}" in words
        assert words[words.index("--") + 1 :] == [
            f"--config={config}:{name}",
            f"--workdir={tmp_path}/s/runs/{name}",
        ]
        words = tpu.split()
        assert words[1].endswith("launch/tpu_pod.py") and words[2] == "run"
        assert f"--name=abl-{name}" in words and "--zone=z" in words


def test_bad_arguments_give_one_clear_line(tmp_path):
    cases = [
        ([f"--config={tmp_path}/none.py", f"--sweep_dir={tmp_path}"], "does not exist"),
        (["--config=configs/tiny.py", f"--sweep_dir={tmp_path}"], "defines no SWEEP"),
        (["status", str(tmp_path)], "not a sweep directory"),
        (["--config=c.py", "--sweep_dir=d", "--submit=lsf"], "--submit='lsf': valid choices"),
        (["--config=c.py", "--sweep_dir=d", "--parallel=0"], "--parallel=0 must be >= 1"),
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

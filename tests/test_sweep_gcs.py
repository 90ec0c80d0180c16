"""Ablation sweeps whose directory is on Google Cloud Storage (a real GCS server on localhost):
launch/sweep.py runs, skips, submits and shows runs under gs://, and tools/compare_runs.py
reports on such a sweep."""

import json
import os
import subprocess
import sys

import pytest

from llada_jax import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = [sys.executable, "launch/sweep.py"]

# The smallest grid with two runs: two steps, one checkpoint, one small evaluation each.
ABLATION = """
from llada_jax import config as config_lib
from llada_jax.sweep import Sweep

def base():
    c = config_lib.load_config_file("configs/tiny.py")
    c.train.update(steps=2, log_every=1, final_bound=False)
    c.optim.update(warmup_steps=1, decay_steps=1)
    c.checkpoint.save_every = 2
    c.sample.num_samples = 0
    c.eval.update(num_tokens=64, num_samples=2, generate=False)
    return c

SWEEP = Sweep(base=base, axes={"schedule": {
    "linear": {"diffusion.schedule": "linear"},
    "cosine": {"diffusion.schedule": "cosine"},
}})

def get_config(variant=""):
    return SWEEP.run_config(variant)
"""
RUNS = ["linear-seed0", "cosine-seed0"]


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def status_rows(sweep_dir):
    """`launch/sweep.py status DIR`: {run: its row's words}."""
    lines = ok(run(SWEEP + ["status", sweep_dir], timeout=120)).stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["run", "state", "step"], lines
    return {line.split()[0]: line.split() for line in lines[1:]}


@pytest.mark.slow  # the default run stays under 15 minutes
def test_a_sweep_on_gs_runs_shows_its_runs_finished_and_is_compared(gcs_dir, tmp_path):
    config = tmp_path / "ablation.py"
    config.write_text(ABLATION)
    sweep_dir = f"{gcs_dir}/sweep"
    # One device per run (the evaluation's batch is too small to split over 8); a trailing slash.
    cmd = SWEEP + [f"--config={config}", f"--sweep_dir={sweep_dir}/", "--devices_per_run=1"]
    out = ok(run(cmd)).stdout
    assert "all 2 runs finished" in out, out[-3000:]
    for name in RUNS:
        workdir = files.join(sweep_dir, "runs", name)
        assert files.listdir(files.join(workdir, "eval")) == ["step_2.json"]
        assert files.isfile(files.join(workdir, "checkpoints", "2", "commit_success.txt"))
    record = json.loads(files.read_text(files.join(sweep_dir, "sweep.json")))
    assert record["runs"] == RUNS and record["steps"] == {n: 2 for n in RUNS}
    assert not any(n.startswith("sweep.json.") for n in files.listdir(sweep_dir))  # no temp file

    rows = status_rows(sweep_dir)
    assert list(rows) == RUNS
    for name in RUNS:
        assert rows[name][1:3] == ["finished", "2/2"] and "+-" in rows[name], rows[name]
    again = ok(run(cmd)).stdout
    assert again.count("finished, skipped") == 2, again  # read on gs://, nothing rerun

    report = tmp_path / "report"
    out = ok(run([sys.executable, "tools/compare_runs.py", sweep_dir, f"--output={report}"]))
    text = (report / "report.md").read_text()
    assert "| linear |" in text and "| cosine |" in text
    assert (report / "eval_bits.png").stat().st_size > 0
    assert f"report: {report}/report.md" in out.stdout
    # Without --output the report goes into the sweep directory, on gs:// too.
    ok(run([sys.executable, "tools/compare_runs.py", sweep_dir]))
    assert {"report.md", "table.csv", "eval_bits.png", "train_loss.png"} <= set(
        files.listdir(files.join(sweep_dir, "report"))
    )
    table = files.read_text(files.join(sweep_dir, "report", "table.csv"))
    assert table == (report / "table.csv").read_text()


@pytest.mark.slow
def test_submit_on_gs_records_the_sweep_skips_trained_runs_and_status_reads_it(gcs_dir, tmp_path):
    """--submit on gs:// writes sweep.json there and skips a run whose last checkpoint is
    committed; `status gs://...` then reads the runs' metrics and evaluations from the bucket,
    without the config file (gone, as on another machine). Before gs:// sweep directories were
    read and written by the launcher, it wrote no sweep.json there and resubmitted every run."""
    config = tmp_path / "ablation.py"
    config.write_text(ABLATION)
    sweep_dir = f"{gcs_dir}/sweep"
    trained = files.join(sweep_dir, "runs", "linear-seed0")
    files.write_atomically(files.join(trained, "checkpoints", "2", "commit_success.txt"), "")
    cmd = SWEEP + [f"--config={config}", f"--sweep_dir={sweep_dir}", "--submit=slurm"]
    out = ok(run(cmd + ["--submit_args=--nodes=1 --gpus_per_node=1 --dry_run"])).stdout
    assert "1/2 linear-seed0: finished, skipped" in out, out
    assert "2/2 cosine-seed0: submitted" in out, out
    assert f"--workdir={sweep_dir}/runs/cosine-seed0" in out  # the job trains on gs://
    assert f"--workdir={trained}" not in out
    record = json.loads(files.read_text(files.join(sweep_dir, "sweep.json")))
    assert record["runs"] == RUNS and record["steps"] == {n: 2 for n in RUNS}

    # The trained run's job logged and its evaluation scored it; the other has not started.
    files.write_atomically(
        files.join(trained, "metrics.jsonl"),
        json.dumps({"step": 1, "loss": 8.5}) + "\n" + json.dumps({"step": 2, "loss": 8.25}) + "\n",
    )
    evaluation = {"step": 2, "bits_per_token": 11.5, "bits_stderr": 0.25}
    files.write_atomically(files.join(trained, "eval", "step_2.json"), json.dumps(evaluation))
    config.unlink()
    rows = status_rows(sweep_dir + "/")
    assert rows["linear-seed0"][1:] == ["finished", "2/2", "8.2500", "11.5000", "+-", "0.2500"]
    assert rows["cosine-seed0"][1:] == ["not", "started", "0/2", "-", "-"]

    bad = run(SWEEP + ["status", f"{gcs_dir}/nothing"], timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: '{gcs_dir}/nothing' holds no sweep.json (not a sweep directory)"
    ]

"""tools/compare_runs.py: cells, standard errors and significance against hand-derived values,
and the report (table, plots, Markdown) of hand-made workdirs."""

import json
import math
import os
import subprocess
import sys

import pytest

from llada_jax import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(name, finals, stderr=0.05):
    cell, _, seed = name.rpartition("-seed")
    return compare.RunRecord(
        name,
        cell,
        int(seed),
        100,
        [10, 20],
        [finals + 0.5, finals],
        [stderr, stderr],
        [10, 20],
        [7.0, 6.5],
        1000.0,
    )


def test_significance_by_hand():
    runs = [
        record("a-seed0", 9.0),
        record("a-seed1", 9.2),  # mean 9.1, s 0.1414, se 0.1
        record("b-seed0", 9.6),
        record("b-seed1", 9.8),  # mean 9.7, se 0.1
        record("c-seed0", 9.05),
        record("c-seed1", 9.35),  # mean 9.2, s 0.2121, se 0.15
        record("d-seed0", 9.5, stderr=0.04),  # one run: its Monte-Carlo error
    ]
    a, b, c, d = compare.cells(runs)
    assert (a.mean, a.stderr) == pytest.approx((9.1, 0.1))
    assert (c.mean, c.stderr) == pytest.approx((9.2, 0.15))
    assert d.stderr == 0.04
    ab = compare.difference(b, a)  # 0.6 +- sqrt(0.02) = 0.1414: z 4.24
    assert (ab.delta, ab.stderr, ab.z) == pytest.approx(
        (0.6, math.sqrt(0.02), 0.6 / math.sqrt(0.02))
    )
    assert ab.significant
    ac = compare.difference(c, a)  # 0.1 +- sqrt(0.0325) = 0.180: not significant
    assert ac.stderr == pytest.approx(math.sqrt(0.0325)) and not ac.significant
    da = compare.difference(d, a)  # 0.4 +- sqrt(0.0016 + 0.01) = 0.1077: significant
    assert da.stderr == pytest.approx(math.sqrt(0.0116)) and da.significant


def write_run(root, name, bits, losses, diffusion=None):
    w = os.path.join(root, name)
    os.makedirs(os.path.join(w, "eval"))
    with open(os.path.join(w, "config.json"), "w") as f:
        json.dump({"data": {"batch_size": 4, "seq_len": 8}, "diffusion": diffusion or {}}, f)
    for step, b in zip((2, 4), bits):
        result = {"step": step, "bits_per_token": b, "bits_stderr": 0.01}
        result["objective"] = {"loss_std": b / 10, "grad_norm_std": b / 100}
        with open(os.path.join(w, "eval", f"step_{step}.json"), "w") as f:
            json.dump(result, f)
    with open(os.path.join(w, "metrics.jsonl"), "w") as f:
        for step, loss in zip((1, 2, 3, 4), losses):
            record = {"step": step, "loss": loss, "tokens_per_sec": 100.0 * step}
            record["step_time_sec"] = 2.0 * step
            f.write(json.dumps(record) + "\n")
    return w


def test_report_of_workdirs(tmp_path):
    unweighted = {"schedule": "cosine", "loss_weight": "none"}
    root = tmp_path / "sweep" / "runs"
    runs = [
        write_run(root, "linear-seed0", [10.0, 9.0], [8, 7, 6, 5]),
        write_run(root, "linear-seed1", [10.2, 9.2], [8, 7, 6, 5]),
        write_run(root, "cosine-seed0", [10.5, 9.6], [8, 7.5, 7, 6.5], unweighted),
        write_run(root, "cosine-seed1", [10.6, 9.8], [8, 7.5, 7, 6.5], unweighted),
    ]
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "tools/compare_runs.py", *runs, f"--output={out}", "--baseline=linear"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (out / "table.csv").read_text().strip().splitlines()
    assert rows[1].split(",")[:4] == ["linear", "2", "9.1000", "0.1000"]
    cosine = rows[2].split(",")
    assert cosine[:7] == ["cosine", "2", "9.7000", "0.1000", "+0.6000", "0.1414", "yes"]
    assert cosine[7] == "128"  # 4 steps x 4 rows x 8 tokens
    assert cosine[8] == "18"  # logged steps 2, 3, 4 at 4, 6, 8 s each
    assert (rows[1].split(",")[10], cosine[10]) == ("bound", "not a bound")
    assert cosine[11:] == ["0.9700", "0.0970"]  # the last evaluations' spreads, seed means
    for png in ("eval_bits.png", "train_loss.png", "estimator_spread.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| cosine | 2 | 9.7000 |" in md and "![eval_bits](eval_bits.png)" in md
    assert "`cosine`: unweighted masked cross-entropy: not a bound" in md
    # A sweep directory stands for its runs; its report goes into it.
    proc = subprocess.run(
        [sys.executable, "tools/compare_runs.py", str(tmp_path / "sweep"), "--baseline=linear"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    swept = (tmp_path / "sweep" / "report" / "table.csv").read_text().splitlines()
    assert sorted(swept) == sorted((out / "table.csv").read_text().splitlines())
    bad = subprocess.run(
        [sys.executable, "tools/compare_runs.py", str(root), f"--output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")
    assert len(bad.stderr.strip().splitlines()) == 1

"""tools/benchmark.py: the paired MFU arithmetic (metrics.paired_mfu), and one real train-mode
run of the tiny config."""

import json
import os
import platform
import subprocess
import sys

import pytest

from llada_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paired_mfu_takes_the_better_neighbouring_probe():
    # Steps of 1 s, 2 s, 4 s for 100 FLOPs; probes around them 200, 400, 100, 50 FLOP/s.
    # Step 0: 100 / max(200, 400) = 0.25; step 1: 50 / max(400, 100) = 0.125;
    # step 2: 25 / max(100, 50) = 0.25. Median 0.25.
    assert metrics.paired_mfu(100.0, [1.0, 2.0, 4.0], [200.0, 400.0, 100.0, 50.0]) == 0.25
    assert metrics.paired_mfu(100.0, [1.0, 2.0], [400.0, 400.0, 100.0]) == pytest.approx(
        (0.25 + 0.125) / 2
    )
    with pytest.raises(ValueError, match="3 probes for 3 steps"):
        metrics.paired_mfu(100.0, [1.0, 2.0, 4.0], [1.0, 2.0, 3.0])


def benchmark(*flags, **env):
    """tools/benchmark.py's JSON result for `flags` on one CPU device, as a user's run."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), *flags, "--json"],
        cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS="", **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_mode_reports_both_mfus():
    result = benchmark("--config=configs/tiny.py", "--steps=2", "--warmup=1")
    assert result["mode"] == "train" and result["steps"] == 2
    # One CPU device, float32: the MKL kernels where the test extra installed them.
    linux_x86 = sys.platform == "linux" and platform.machine() == "x86_64"
    assert result["matmul"] == ("mkl" if linux_x86 else "xla")
    achieved = result["achieved_gflops"]
    assert result["mfu"] == pytest.approx(achieved / result["peak_gflops"], rel=1e-6)
    # The overall peak is the best of every probe, the paired ones included.
    assert result["peak_gflops"] >= max(result["peak_gflops_before"], result["peak_gflops_after"])
    assert 0 < result["mfu"] <= result["mfu_paired"]


@pytest.mark.slow
@pytest.mark.parametrize("letters", [0, 4])
def test_likelihood_mode_agrees_with_the_reference_style_estimate(tmp_path, letters):
    """lm-eval requests scored by our model (batched, the head on the targets; packed several
    per row and one per row) and by the reference harness's way (one request at a time, the full
    head) on the same masks: the same estimates. Lettered answers (2 questions, " A" to " D"):
    one mask per question is scored, the four answers read from its slot."""
    result = benchmark(
        "--mode=likelihood",
        "--config=configs/tiny.py",
        f"--num_requests={8 if letters else 3}",
        f"--lettered_choices={letters}",
        "--mc_num=8",
        "--lm_batch_size=8",
        "--steps=1",
        "--warmup=0",
        XDG_CACHE_HOME=str(tmp_path),
    )
    assert result["requests"] == (8 if letters else 3) and result["mc_num"] == 8
    assert result["max_estimate_difference"] < 1e-3
    assert result["max_packed_unpacked_difference"] < 1e-3
    if letters:
        assert result["continuation_tokens_mean"] == 1
        assert result["scored_masks_ratio"] == 2 / (8 * 8)
    else:  # 1 to 6 words of continuation against 8 samples: some masks are drawn twice
        assert 0 < result["scored_masks_ratio"] < 1
    for layout in ("packed", "unpacked"):
        assert result[f"{layout}_requests_per_sec"] > 0
        assert 1 <= result[f"padded_tokens_ratio_{layout}"]
        assert 0 < result[f"head_positions_ratio_{layout}"] <= 1
    assert result["bound_tokens_per_sec"] > 0
    # The speed-up is the matmul work saved times the FLOP rate gained.
    assert result["work_ratio_baseline_to_packed"] > 0
    assert result["packed_speedup_vs_baseline"] == pytest.approx(
        result["work_ratio_baseline_to_packed"]
        * result["packed_gflop_per_sec"]
        / result["baseline_gflop_per_sec"],
        rel=1e-6,
    )


@pytest.mark.slow
def test_block_model_train_against_full_and_its_sampler_cache():
    """--against times the full model's step beside the block model's, and the block sampler
    with its exact cache gives the tokens it gives without it."""
    train = benchmark(
        "--mode=train",
        "--config=configs/tiny.py",
        "--config.diffusion.block_size=16",
        "--against=diffusion.block_size=0",
        "--steps=2",
        "--warmup=1",
    )
    assert train["against"] == "diffusion.block_size=0"
    # The block model's layers run on the row and its clean copy: more FLOPs per step.
    assert train["model_tflop_per_step"] > 1.1 * train["against_model_tflop_per_step"]
    assert train["step_sec_ratio_to_against"] > 0
    sample = benchmark(
        "--mode=sample",
        "--config=configs/tiny.py",
        "--config.diffusion.block_size=16",
        "--config.sample.gen_length=32",
        "--config.sample.steps=8",
        "--steps=1",
        "--warmup=0",
    )
    assert sample["block_size"] == 16 and sample["cache_tokens_identical_to_no_cache"]
    assert sample["cache_nfe"] == sample["no_cache_nfe"] == 8
    # --gen_length overrides the sample section; --baseline=false leaves the slow loop out.
    full = benchmark(
        "--mode=sample",
        "--config=configs/tiny.py",
        "--gen_length=32",
        "--sample_steps=8",
        "--block_length=16",
        "--baseline=false",
        "--steps=1",
        "--warmup=0",
    )
    assert (full["gen_length"], full["steps"], full["block_length"]) == (32, 8, 16)
    assert full["exact_nfe"] == 8 and "baseline_tokens_per_sec" not in full

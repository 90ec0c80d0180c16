"""The training command end to end (real subprocesses), and its one-line errors."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(workdir, *extra, config="configs/tiny.py"):
    return [
        sys.executable,
        "-m",
        "llada_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """40 steps of the tiny config on 8 fake devices (the conftest's XLA_FLAGS are inherited),
    step 2 profiled, compiling into a cache of its own beside the workdir (jax_cache)."""
    workdir = str(tmp_path_factory.mktemp("run") / "tiny")
    cache = os.path.join(os.path.dirname(workdir), "jax_cache")
    proc = subprocess.run(
        train_cmd(
            workdir,
            "--config.train.steps=40",
            "--config.train.log_every=10",
            "--config.optim.lr=0.003",
            "--config.optim.warmup_steps=5",
            "--config.optim.decay_steps=5",
            "--config.train.final_bound=True",
            "--config.train.compare_untrained=True",
            "--config.eval.num_tokens=256",
            "--config.eval.num_samples=2",
            "--config.train.profile_steps=(1,1)",
            f"--config.train.compilation_cache={cache}",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


@pytest.mark.slow
def test_the_compilation_cache_holds_the_train_step(tiny_run):
    """train.compilation_cache=DIR: JAX's persistent cache holds the run's compilations, the
    train step among them (a restart loads it; "" writes none: the SFT test below)."""
    workdir, _ = tiny_run
    entries = os.listdir(os.path.join(os.path.dirname(workdir), "jax_cache"))
    assert any(e.startswith("jit_train_step-") and e.endswith("-cache") for e in entries), entries


def test_profile_steps_write_a_trace_and_say_where(tiny_run):
    """train.profile_steps=(1,1): step 2 is traced under DIR/profile, and one line names the
    trace and how to view it."""
    workdir, stdout = tiny_run
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
    lines = [x for x in stdout.splitlines() if x.startswith("profile: ")]
    assert lines == [
        f"profile: step 2 traced in {traces[0]}; view: tensorboard "
        f"--logdir={os.path.join(workdir, 'profile')} (Profile tab: pip install "
        f"tensorboard-plugin-profile) or open {os.path.dirname(traces[0])}/perfetto_trace.json.gz "
        "at https://ui.perfetto.dev"
    ], lines


def test_training_writes_config_metrics_and_events(tiny_run):
    workdir, stdout = tiny_run
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["train"]["steps"] == 40 and cfg["model"]["d_model"] == 64
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40]
    assert "tokens_per_sec" not in rows[0]  # the first step includes compilation
    for r in rows[1:]:
        for key in (
            "loss",
            "grad_norm",
            "lr",
            "tokens_per_sec",
            "masked_tokens_per_sec",
            "mfu",
            "eta_sec",
        ):
            assert key in r, key
        assert 0 < r["masked_tokens_per_sec"] < r["tokens_per_sec"]
        assert 0 < r["mfu"] < 1
    assert rows[-1]["eta_sec"] == 0
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert "step 40/40 | loss" in stdout and "mfu" in stdout and "eta" in stdout


def test_tiny_model_learns(tiny_run):
    """ln(4096) = 8.3 at the start; learning the unigram statistics alone gets well below 7."""
    workdir, _ = tiny_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f][1:]
    assert losses[-1] < 7.0 and losses[-1] < losses[0] - 0.5, losses


def test_samples_are_printed(tiny_run):
    _, stdout = tiny_run
    assert "samples (" in stdout and "--- 'In the beginning' ->" in stdout
    assert "sample words, trained: " in stdout and "sample words, untrained: " in stdout


def test_the_end_prints_the_evaluation_jobs_bound_beside_the_untrained_models(tiny_run):
    """The untrained model predicts all but uniformly, so its bound is ln(4096) nats per token;
    the trained one's is what the evaluation job computes for the last checkpoint."""
    from llada_jax.evaluate import Evaluator

    workdir, stdout = tiny_run
    line = next(x for x in stdout.splitlines() if x.startswith("held-out bound"))
    assert line.startswith("held-out bound (256 tokens, 2 masks per row): trained "), line
    numbers = re.findall(r"(\d+\.\d+) \+- (\d+\.\d+) nats/token \((\d+\.\d+) bits\)", line)
    (trained, trained_se, trained_bits), (untrained, untrained_se, _) = [
        tuple(map(float, n)) for n in numbers
    ]
    assert abs(untrained - np.log(4096)) < 0.05 + 3 * untrained_se, line
    assert trained < untrained - 0.5 and trained_bits == pytest.approx(
        trained / np.log(2), abs=2e-3
    )
    job = Evaluator(workdir, progress=False, num_tokens=256, num_samples=2, generate=False)
    result = job.evaluate(40)
    assert result["nll_per_token"] == pytest.approx(trained, abs=1e-3)
    assert result["nll_stderr"] == pytest.approx(trained_se, abs=1e-3)


BAD = {
    "unknown_key": (["--config.model.bogus=3"], "unknown config key 'model.bogus'"),
    "wrong_type": (["--config.model.d_model=abc"], "config.model.d_model='abc' is not a valid int"),
    "unknown_variant": ([], "unknown config variant 'huge'"),
    "missing_parent": ([], "parent directory"),
    "batch_not_divisible": (
        ["--config.data.batch_size=6"],
        "data.batch_size=6 is not divisible by the data-parallel size 8",
    ),
    "unknown_section": (["--config.modle.d_model=3"], "unknown config key 'modle'"),
    "splash_length": (
        ["--config.kernels.attention=splash"],
        "needs a sequence length (data.seq_len) divisible by 128, got 64",
    ),
    # Checked before training starts, although the samples are printed after it.
    "sample_blocks": (
        ["--config.sample.block_length=5"],
        "sample.block_length=5 does not divide sample.gen_length=16",
    ),
    "diffusion_schedule": (
        ["--config.diffusion.schedule=cosin"],
        "diffusion.schedule='cosin' is invalid; valid choices: ('linear', 'cosine', 'polynomial')",
    ),
    "sft_overflow": (
        ["--config.data.sft_overflow=cut"],
        "data.sft_overflow='cut' is invalid; valid choices: ('truncate', 'drop')",
    ),
    "profile_steps": (
        ["--config.train.profile_steps=(-1,2)"],
        "train.profile_steps=(-1, 2) is invalid; valid: (first, count), two integers >= 0",
    ),
    "compilation_cache": (
        ["--config.train.compilation_cache=README.md/cache"],
        "train.compilation_cache='README.md/cache': cannot write the directory",
    ),
}


def test_bad_inputs_give_one_clear_line(tmp_path):
    """All cases run at once (each is a fresh interpreter); nothing is written to the workdir."""
    procs = {}
    for name, (extra, _) in BAD.items():
        workdir = str(tmp_path / name)
        config = "configs/tiny.py:huge" if name == "unknown_variant" else "configs/tiny.py"
        if name == "missing_parent":
            workdir = str(tmp_path / "no" / "such" / "dir")
        procs[name] = (
            workdir,
            subprocess.Popen(
                train_cmd(workdir, *extra, config=config),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for name, (workdir, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert BAD[name][1] in lines[0], (name, lines[0])
        assert not os.path.exists(workdir), name


@pytest.mark.slow
def test_sft_training_on_prepared_pairs(tmp_path):
    """The SFT objective end to end: prepared chat pairs, packed rows, a few steps."""
    chat = tmp_path / "chat.jsonl"
    with open(chat, "w") as f:
        for i in range(20):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i} plus {i}?"},
                            {"role": "assistant", "content": f"It is {2 * i}."},
                            {"role": "user", "content": "Thanks."},
                            {"role": "assistant", "content": "You are welcome."},
                        ]
                    }
                )
                + "\n"
            )
    prep = subprocess.run(
        [
            sys.executable,
            "tools/prepare_data.py",
            f"--input={chat}",
            f"--output_dir={tmp_path / 'sft'}",
            "--format=sft",
            "--workers=1",
            "--noprogress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prep.returncode == 0, prep.stderr
    workdir = str(tmp_path / "run")
    proc = subprocess.run(
        train_cmd(
            workdir,
            "--config.train.objective=sft",
            "--config.train.steps=4",
            f"--config.data.datasets=(('{tmp_path / 'sft'}', 1.0),)",
            "--config.data.sft_pairs_per_row=2",
            "--config.diffusion.random_length_prob=0.0",
            "--config.diffusion.cfg_prompt_dropout=0.1",
            "--config.sample.num_samples=0",
            "--config.train.compilation_cache=",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        # "" turns the cache off, also one the environment names.
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "jax_cache")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["loss"]) and rows[-1]["num_masked"] > 0
    # Overflow counts reach the metrics (their exact values are checked in test_pipeline.py).
    assert all(
        isinstance(r[k], int) and r[k] >= 0 for r in rows for k in ("sft_dropped", "sft_truncated")
    )

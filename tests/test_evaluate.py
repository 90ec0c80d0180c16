"""The evaluation job: the held-out bound on a real checkpoint, on any devices and batching;
--watch beside a real trainer, killed and restarted; its errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llada_jax import evaluate, likelihood
from llada_jax.data import corpus, datasets, prepare
from llada_jax.run import build_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = [sys.executable, "tools/evaluate.py"]
SMALL = dict(num_tokens=512, num_samples=4, generate=False, progress=False)


def train(workdir, *overrides, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "llada_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.sample.num_samples=0",
        *overrides,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tiny_run):
    return tiny_run  # only read; tests that write results copy it


def test_bound_is_the_same_on_any_devices_and_batching(workdir):
    """One device, batches of 3, against 8 devices with FSDP-sharded weights, batches of 16."""
    one = evaluate.Evaluator(workdir, jax.devices()[:1], batch_size=3, **SMALL)
    eight = evaluate.Evaluator(workdir, jax.devices()[:8], batch_size=16, fsdp=True, **SMALL)
    assert eight.model.run.mesh.size == 8 and eight.batch_size == 16 and one.batch_size == 3
    np.testing.assert_array_equal(one.rows, eight.rows)
    a = evaluate.score_rows(one.scorer, one.model.params, one.rows, one.settings, one.batch_size)
    b = evaluate.score_rows(
        eight.scorer, eight.model.params, eight.rows, eight.settings, eight.batch_size
    )
    assert a.shape == (512 // 64, 4)
    np.testing.assert_allclose(a, b, rtol=2e-5)
    # Another seed draws other masks, and the bound agrees within its error.
    other = evaluate.Evaluator(workdir, jax.devices()[:1], batch_size=8, seed=1, **SMALL)
    c = evaluate.score_rows(other.scorer, other.model.params, other.rows, other.settings, 8)
    assert not np.allclose(a, c)
    ea, ec = likelihood.estimate(a, a.size), likelihood.estimate(c, c.size)
    assert abs(ea.nll - ec.nll) < 4 * np.hypot(ea.stderr, ec.stderr)


def test_held_out_rows_come_from_the_books_kept_out_of_training(workdir):
    ev = evaluate.Evaluator(workdir, jax.devices()[:1], **SMALL)
    tok = ev.model.run.tokenizer
    books = corpus.read_default_corpus().split(datasets.SHIPPED_CORPUS_SEPARATOR)
    held = [b for b in books if b.split("\n")[0] in ("Habakkuk", "Romans", "1 John")]
    assert len(held) == 3
    for row in ev.rows[:4]:
        text = tok.decode([t for t in row.tolist() if t != tok.eos_id])
        assert any(text[5:-5] in b for b in held)  # edges may cut a multi-byte piece


def test_result_file_and_its_units(tiny_copy):
    workdir = tiny_copy
    settings = dict(SMALL, generate=True, objective_draws=16, objective_rows=8)
    ev = evaluate.Evaluator(workdir, jax.devices()[:1], **settings)
    result = ev.evaluate(2)
    ev.close()
    with open(evaluate.result_path(workdir, 2)) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    assert saved["tokens"] == 512 and saved["rows"] == 8
    assert saved["bits_per_token"] == pytest.approx(saved["nll_per_token"] / np.log(2))
    assert 0 < saved["nll_stderr"] < 0.1 * saved["nll_per_token"]
    g = saved["generate"]
    assert len(g["texts"]) == len(g["prompts"]) == 4 and g["nfe"] == 4  # tiny: sample.steps=4
    assert evaluate.evaluated_steps(workdir) == [2]
    # The run's own training loss (linear schedule: weight 1/t) on the same 8 rows estimates the
    # same ELBO per token as the bound: they agree within their errors; its draws do vary.
    o = saved["objective"]
    assert o["draws"] == 16 and o["rows"] == 8 and o["loss_std"] > 0 and o["grad_norm_std"] > 0
    loss_se = o["loss_std"] / np.sqrt(16)
    assert abs(o["loss_mean"] - saved["nll_per_token"]) < 4 * np.hypot(loss_se, saved["nll_stderr"])


@pytest.mark.slow
def test_watch_evaluates_every_checkpoint_once_across_restarts(tmp_path):
    """The evaluator is started before the trainer has saved anything, killed (SIGKILL) three
    times at different moments and started again; at the end every checkpoint the trainer
    wrote has one result, and no step was evaluated twice."""
    workdir = str(tmp_path / "run")
    steps, every = 16, 2
    trainer = train(
        workdir,
        f"--config.train.steps={steps}",
        f"--config.checkpoint.save_every={every}",
        "--config.checkpoint.max_to_keep=100",
        "--config.train.log_every=1",
        wait=False,
    )
    cmd = EVALUATE + [
        f"--workdir={workdir}",
        "--watch",
        "--poll_sec=0.2",
        "--num_tokens=256",
        "--num_samples=2",
        "--generate=false",
        "--progress=false",
    ]
    printed = []
    try:
        for kill_after_lines in (0, 1, 2, None):
            watcher = subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            lines = []
            if kill_after_lines == 0:
                time.sleep(4)  # while it starts up or waits for the first checkpoint
            else:
                for line in watcher.stdout:
                    lines.append(line)
                    if kill_after_lines is not None and len(lines) >= kill_after_lines:
                        break
            if kill_after_lines is not None:
                watcher.send_signal(signal.SIGKILL)
            rest, _ = watcher.communicate(timeout=600)
            lines += rest.splitlines() if kill_after_lines is None else []
            printed += [int(ln.split(":")[0].split()[1]) for ln in lines if ln.startswith("step ")]
            if kill_after_lines is None:
                assert watcher.returncode == 0
    finally:
        trainer.kill() if trainer.poll() is None else None
    trainer.communicate(timeout=600)
    assert trainer.returncode == 0
    saved = list(range(every, steps + 1, every))
    assert evaluate.evaluated_steps(workdir) == saved
    assert len(printed) == len(set(printed)), printed
    for step in saved:
        with open(evaluate.result_path(workdir, step)) as f:
            assert json.load(f)["step"] == step


def test_a_dataset_without_a_held_out_split_is_one_clear_error(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("some words to prepare " * 50)
    out = str(tmp_path / "prepared")
    prepare.prepare([str(text)], out, seq_len=16, workers=1, progress=False, log=lambda *_: None)

    class Data:
        datasets = ((out, 1.0),)
        seq_len = 16

    from llada_jax.data.tokenizer import default_tokenizer

    with pytest.raises(ValueError, match="no held-out split.*--validation_fraction"):
        datasets.validation_sources(Data, default_tokenizer(), 4096)


def test_bad_inputs_give_one_clear_line(workdir, tmp_path):
    cases = [
        (["--workdir={missing}"], "holds no checkpoints/ directory"),
        (["--workdir={workdir}", "--step=999"], "no checkpoint at step 999"),
        (["--workdir={workdir}", "--num_samples=0"], "--num_samples=0 is invalid"),
        (["--workdir={workdir}", "--step=2", "--watch"], "exclude each other"),
        (["--workdir={workdir}", "--num_tokens=100000000"], "num_tokens=100000000 needs"),
    ]
    procs = [
        subprocess.Popen(
            EVALUATE + [a.format(workdir=workdir, missing=str(tmp_path / "none")) for a in args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _ in cases
    ]
    for proc, (_, message) in zip(procs, cases):
        _, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("schedule", ["cosine", "polynomial"])
def test_the_bound_is_the_same_whatever_schedule_the_config_names(workdir, schedule):
    """One checkpoint, its config saying it was trained with another noise schedule and
    t-sampling: the held-out bound names no schedule, so its value is the same."""
    ev = evaluate.Evaluator(workdir, jax.devices()[:1], **SMALL)
    plain = evaluate.score_rows(ev.scorer, ev.model.params, ev.rows, ev.settings, 8)
    cfg = ev.model.run.cfg.copy_and_resolve_references()
    cfg.unlock()
    cfg.diffusion.schedule, cfg.diffusion.t_sampling = schedule, "stratified"
    run = build_run(cfg, devices=jax.devices()[:1], data=False)
    assert run.diffusion_cfg.schedule == schedule
    other = dataclasses.replace(ev.model, run=run)
    scorer = evaluate.make_scorer(other.run, ev.settings)
    np.testing.assert_array_equal(
        evaluate.score_rows(scorer, other.params, ev.rows, ev.settings, 8), plain
    )

"""Checkpoints: exact resume, SIGTERM, kill -9 during a save, NaN skip, mesh change, refusal."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import checkpoint, config, train
from llada_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETERMINISTIC = ("loss", "grad_norm", "lr", "num_masked", "masked_ce", "num_valid", "skipped")
RUN = ["--config.sample.num_samples=0", "--config.train.log_every=1",
       "--config.checkpoint.save_every=2", "--config.train.steps=8"]


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "llada_jax.train", "--config=configs/tiny.py",
            f"--workdir={workdir}", *RUN, *extra]


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(cmd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wait_for_step(workdir, step, proc, timeout=300):
    """Blocks until metrics.jsonl has a line for `step` (the run is past it)."""
    path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if os.path.exists(path) and any(json.loads(x)["step"] >= step for x in open(path) if x.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ckpt") / "straight")
    run(train_cmd(workdir))
    return workdir


def assert_same_metrics(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}, (x, y)


def test_sigterm_saves_and_resume_is_bit_identical(uninterrupted, tmp_path):
    workdir = str(tmp_path / "interrupted")
    # A slowed-down copy of the same run (slower logging only), so SIGTERM lands mid-run.
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    saved = checkpoint.Checkpointer(workdir).latest_step()
    if saved < 8:  # the signal arrived mid-run (else the run had already finished)
        assert f"SIGTERM: saved a checkpoint at step {saved}" in stdout
    run(train_cmd(workdir))
    assert_same_metrics(read_metrics(uninterrupted), read_metrics(workdir))


def test_kill_9_during_saves_then_resume(uninterrupted, tmp_path):
    """kill -9 at several moments of a run that saves every step: the restart always finds a
    complete checkpoint (or none) and finishes with the uninterrupted run's metrics."""
    workdir = str(tmp_path / "killed")
    for delay in (0.0, 0.15, 0.3):
        proc = subprocess.Popen(train_cmd(workdir, "--config.checkpoint.save_every=1"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_step(workdir, 1, proc)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if os.path.isdir(os.path.join(workdir, "checkpoints")) and \
                checkpoint.Checkpointer(workdir).latest_step() == 8:
            break
    run(train_cmd(workdir, "--config.checkpoint.save_every=1"))
    assert_same_metrics(read_metrics(uninterrupted), read_metrics(workdir))


def test_changed_model_shapes_are_refused(uninterrupted):
    before = sorted(os.listdir(os.path.join(uninterrupted, "checkpoints")))
    proc = subprocess.run(train_cmd(uninterrupted, "--config.model.n_layers=3",
                                    "--config.model.mlp_hidden=96", "--config.optim.lr=0.1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "changes model shapes: model.n_layers: 2 -> 3; model.mlp_hidden: 128 -> 96" in line
    assert "optim.lr" not in line
    assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints"))) == before


def test_restore_on_another_mesh_and_params_only(uninterrupted, tmp_path):
    """Saved on 8 devices (mesh 8x1x1); restored params-only on 4 devices as a 1x2x2 mesh."""
    script = (
        "import sys, numpy as np, jax; from llada_jax import checkpoint, config, train\n"
        "cfg = config.load('configs/tiny.py', [('mesh.shape', '(1,2,2)')])\n"
        "r = train.prepare(cfg, sys.argv[1]); _, params, _, _ = train.create_state(r)\n"
        "p, _ = checkpoint.Checkpointer(sys.argv[1]).restore(8, params)\n"
        "k = p['blocks']['mlp']['up']['kernel'][...]\n"
        "assert len(k.sharding.device_set) == 4 and k.sharding.spec[1:] == ('fsdp', 'tensor')\n"
        "np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(p)])\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = str(tmp_path / "restored.npz")
    run([sys.executable, "-c", script, uninterrupted, out], env=env)
    cfg = config.load("configs/tiny.py", [])
    _, params, _, _ = train.create_state(train.prepare(cfg, uninterrupted))
    want, _ = checkpoint.Checkpointer(uninterrupted).restore(8, params)
    got = np.load(out)
    leaves = jax.tree.leaves(want)
    assert len(got.files) == len(leaves)
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(got[f"arr_{i}"], np.asarray(leaf))
    assert not np.array_equal(np.asarray(leaves[0]), np.asarray(jax.tree.leaves(params)[0]))


def test_nonfinite_step_is_skipped(tmp_path):
    """A NaN loss leaves params and optimizer state untouched and is reported as skipped."""
    run_ = train.prepare(config.load("configs/tiny.py", []), str(tmp_path / "w"))
    graphdef, params, opt_state, tx = train.create_state(run_)
    step_fn = train.make_step_fn(run_, graphdef, params, opt_state, tx)
    batch = pipeline.to_global(run_.batches[0], run_.mesh, run_.cfg.data.batch_size)
    clean = jax.tree.map(np.asarray, (params, opt_state))
    bad = jax.tree.map(lambda x: x, params)
    scale = bad["final_norm"]["scale"]
    scale[...] = jax.device_put(scale[...].at[0].set(jnp.nan), scale[...].sharding)
    before = jax.tree.map(np.asarray, (bad, opt_state))
    new_params, new_opt, out = step_fn(bad, opt_state, batch, jnp.int32(0))
    assert int(out["skipped"]) == 1 and not np.isfinite(float(out["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, (new_params, new_opt)),
                 before)
    # The same step from clean parameters is taken.
    restored = jax.tree.map(lambda a, ref: jax.device_put(a, ref.sharding), clean, (new_params, new_opt))
    stepped, opt, ok = step_fn(*restored, batch, jnp.int32(0))
    assert int(ok["skipped"]) == 0 and np.isfinite(float(ok["loss"]))
    stepped, _, _ = step_fn(stepped, opt, batch, jnp.int32(1))  # the first update has lr 0
    assert not np.array_equal(np.asarray(stepped["embed"]["embedding"][...]),
                              clean[0]["embed"]["embedding"][...])


def test_interval_stats_count_skips_in_a_row():
    steps = [(1.0, 0), (np.nan, 1), (2.0, 0), (np.nan, 1), (np.inf, 1)]
    interval = [{"loss": jnp.float32(x), "skipped": jnp.int32(s)} for x, s in steps]
    means, in_a_row = train.interval_stats(interval, skipped_before=5)
    assert means["skipped"] == 3 and in_a_row == 2
    assert train.interval_stats(interval[-2:], skipped_before=5)[1] == 7  # the run goes on


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    """A learning rate that blows the weights up: every later step is skipped, and the run stops
    with one error line once more than max_skipped_in_a_row happened in a row."""
    proc = subprocess.run(
        train_cmd(str(tmp_path / "w"), "--config.optim.lr=1e30", "--config.optim.clip_norm=0.0",
                  "--config.train.max_skipped_in_a_row=2", "--config.train.steps=20"),
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 3 steps in a row") and "max_skipped_in_a_row=2" in line

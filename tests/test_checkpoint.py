"""Checkpoints: exact resume, SIGTERM, kill -9 restart loops, leftovers of interrupted saves, NaN
skip, mesh change, refusal."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import checkpoint, config
from llada_jax import run as run_lib
from llada_jax.data import pipeline
from llada_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETERMINISTIC = ("loss", "grad_norm", "lr", "num_masked", "masked_ce", "num_valid", "skipped")
RUN = [
    "--config.sample.num_samples=0",
    "--config.train.log_every=1",
    "--config.checkpoint.save_every=2",
    "--config.train.steps=8",
]


def train_cmd(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "llada_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *RUN,
        *extra,
    ]


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(cmd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wait_for_step(workdir, step, proc, timeout=300):
    """Blocks until metrics.jsonl has a line for `step` (the run is past it)."""
    path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if os.path.exists(path) and any(
            json.loads(x)["step"] >= step for x in open(path) if x.strip()
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ckpt") / "straight")
    run(train_cmd(workdir))
    return workdir


def assert_same_metrics(a, b, steps=8):
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}, (x, y)


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_bit_identical(uninterrupted, tmp_path):
    workdir = str(tmp_path / "interrupted")
    # A slowed-down copy of the same run (slower logging only), so SIGTERM lands mid-run.
    proc = subprocess.Popen(
        train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    saved = checkpoint.Checkpointer(workdir).latest_step()
    if saved < 8:  # the signal arrived mid-run (else the run had already finished)
        assert f"SIGTERM: saved a checkpoint at step {saved}" in stdout
    run(train_cmd(workdir))
    assert_same_metrics(read_metrics(uninterrupted), read_metrics(workdir))


class Watched:
    """A training process whose output is read as it comes (threads), so a test can act on it."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stdout, self.stderr = [], []
        self.readers = [
            threading.Thread(target=lambda s=s, out=out: out.extend(s), daemon=True)
            for s, out in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for r in self.readers:
            r.start()

    def steps_logged(self):
        return sum(bool(re.match(r"step \d+", line)) for line in list(self.stdout))

    def logged_a_step(self):
        return self.steps_logged() > 0

    def wait_for(self, condition, timeout=300):
        """True once `condition()` holds, False if the process exited first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            if condition():
                return True
            time.sleep(0.002)
        raise TimeoutError(self.proc.args)

    def finish(self, timeout=300):
        self.proc.wait(timeout)
        for r in self.readers:
            r.join(timeout)
        return self.proc.returncode, "".join(self.stdout), "".join(self.stderr)


def saving(workdir):
    """Whether a save is in progress (Orbax's temporary directory exists)."""
    ckpts = checkpoint.checkpoint_dir(workdir)
    return os.path.isdir(ckpts) and any(checkpoint.TMP_SUFFIX in n for n in os.listdir(ckpts))


def interrupt(run, moment, workdir, rng):
    """Kills `run` at one kind of moment; returns whether the SIGKILL found it alive."""
    if moment == "starting":  # importing, compiling, cleaning up or restoring
        time.sleep(rng.uniform(0.2, 3.0))
    elif not run.wait_for(run.logged_a_step):
        return False
    elif moment == "saving":
        run.wait_for(lambda: saving(workdir))
    elif moment == "stepping":  # a few steps on, between a step's log line and its save's end
        more = rng.randint(1, 3)
        run.wait_for(lambda: run.steps_logged() > more)
        time.sleep(rng.uniform(0.0, 0.05))
    elif moment == "preempted":  # SIGTERM, then SIGKILL during the save it makes
        run.proc.send_signal(signal.SIGTERM)
        run.wait_for(lambda: saving(workdir), timeout=rng.uniform(0.0, 0.3))
    alive = run.proc.poll() is None
    run.proc.kill()
    return alive


LONG_STEPS = 40  # more than the kills below can get through, so that each finds the run alive


def long_cmd(workdir, *extra):
    """A run long enough to be interrupted many times, saving every step."""
    return train_cmd(
        workdir, "--config.checkpoint.save_every=1", f"--config.train.steps={LONG_STEPS}", *extra
    )


@pytest.fixture(scope="module")
def straight_long(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ckpt") / "straight_long")
    run(long_cmd(workdir))
    return workdir


@pytest.mark.slow
def test_restart_loop_of_kills_loses_nothing(straight_long, tmp_path):
    """A preemptible job's life: killed (SIGKILL) again and again at varied moments, during
    saves too (one every step), and restarted with the same command each time. Every restart
    exits 0 or is the one killed, none prints a traceback, the last one finishes, and the
    metrics of every step equal an uninterrupted run's."""
    steps, cmd = LONG_STEPS, long_cmd
    workdir, rng = str(tmp_path / "killed"), random.Random(0)
    moments = [
        "starting",
        "saving",
        "stepping",
        "preempted",
        "saving",
        "starting",
        "stepping",
        "saving",
        "preempted",
        "saving",
        "stepping",
    ]
    kills, outputs = 0, []
    for moment in moments:
        r = Watched(cmd(workdir))
        kills += interrupt(r, moment, workdir, rng)
        outputs.append((moment, *r.finish()))
    final = Watched(cmd(workdir))
    outputs.append(("final", *final.finish()))
    for moment, rc, _, stderr in outputs:
        assert rc == 0 or (rc == -signal.SIGKILL and moment != "final"), (moment, stderr[-3000:])
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, (moment, stderr)
    assert kills >= 8, kills
    assert_same_metrics(read_metrics(straight_long), read_metrics(workdir), steps)
    assert checkpoint.leftovers(checkpoint.checkpoint_dir(workdir)) == []
    with checkpoint.Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == steps


@pytest.mark.slow
def test_a_restarted_trainer_waits_for_the_one_it_replaces(straight_long, tmp_path):
    """The restart overlaps the old job (a killed launcher's trainer gets SIGTERM and saves
    while the new one starts): the new trainer waits for the old one instead of clearing its
    save in progress; one that may not wait that long stops with one error line."""
    workdir = str(tmp_path / "overlap")
    old = Watched(long_cmd(workdir))
    assert old.wait_for(old.logged_a_step)
    old.proc.send_signal(signal.SIGSTOP)  # a slow old job: it holds the workdir until SIGCONT
    impatient = subprocess.run(
        long_cmd(workdir, "--config.checkpoint.wait_for_writer_sec=0.5"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert impatient.returncode == 2, impatient.stderr[-2000:]
    line = impatient.stderr.strip().splitlines()[-1]
    holder = f"({socket.gethostname()} pid {old.proc.pid})"  # the host too: pods have many
    assert line.startswith("error: --workdir=") and holder in line, line
    assert "checkpoint.wait_for_writer_sec" in line and "Traceback" not in impatient.stderr
    new = Watched(long_cmd(workdir))
    assert new.wait_for(lambda: any("waiting up to" in x for x in list(new.stdout)))
    old.proc.send_signal(signal.SIGTERM)
    old.proc.send_signal(signal.SIGCONT)
    rc, stdout, stderr = old.finish()
    assert rc == 0 and "SIGTERM: saved a checkpoint" in stdout, stderr[-3000:]
    rc, stdout, stderr = new.finish()
    assert rc == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert_same_metrics(read_metrics(straight_long), read_metrics(workdir), LONG_STEPS)


def plant_leftovers(workdir):
    """What interrupted saves leave, by hand, in a run saved at steps 4, 6 and 8: step 8 cut off
    while it was written into its temporary directory, step 6 renamed without its commit file,
    and step 2 half deleted by the clean-up of old steps. Returns the planted names."""
    ckpts = checkpoint.checkpoint_dir(workdir)
    shutil.rmtree(os.path.join(ckpts, "8"))
    shutil.copytree(os.path.join(ckpts, "6"), os.path.join(ckpts, "8" + checkpoint.TMP_SUFFIX))
    tmp = os.path.join(ckpts, "8" + checkpoint.TMP_SUFFIX)
    os.remove(os.path.join(tmp, checkpoint.COMMIT_FILE))
    os.rename(os.path.join(tmp, "params"), os.path.join(tmp, "params" + checkpoint.TMP_SUFFIX))
    os.remove(os.path.join(ckpts, "6", checkpoint.COMMIT_FILE))
    shutil.copytree(os.path.join(ckpts, "4", "meta"), os.path.join(ckpts, "2", "meta"))
    return ["2", "6", "8" + checkpoint.TMP_SUFFIX]


def test_leftovers_of_interrupted_saves_are_removed(uninterrupted, tmp_path):
    workdir = str(tmp_path / "leftovers")
    shutil.copytree(uninterrupted, workdir)
    planted = plant_leftovers(workdir)
    assert checkpoint.leftovers(checkpoint.checkpoint_dir(workdir)) == planted
    with checkpoint.Checkpointer(workdir) as reader:  # a reader sees the complete steps only
        assert reader.complete_steps() == [4] and reader.latest_step() == 4
    assert checkpoint.leftovers(checkpoint.checkpoint_dir(workdir)) == planted  # left alone
    proc = run(train_cmd(workdir))
    removed = [line for line in proc.stdout.splitlines() if line.startswith("checkpoints: ")]
    assert len(removed) == 1 and removed[0].endswith(", ".join(planted)), proc.stdout[-3000:]
    assert "resumed at step 4" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert_same_metrics(read_metrics(uninterrupted), read_metrics(workdir))
    assert checkpoint.leftovers(checkpoint.checkpoint_dir(workdir)) == []
    with checkpoint.Checkpointer(workdir) as ckpt:
        assert ckpt.complete_steps() == [4, 6, 8]


def test_save_of_an_existing_step_keeps_a_complete_one_and_replaces_an_incomplete_one(tmp_path):
    workdir = str(tmp_path / "w")
    tree = lambda v: {"w": jnp.full((4, 3), v, jnp.float32)}
    with checkpoint.Checkpointer(workdir, async_save=False, writer=True) as ckpt:
        assert ckpt.save(1, tree(1.0), None, {"step": 1})
        assert not ckpt.save(1, tree(2.0), None, {"step": 1})  # complete: kept
        # Step 2 appears without its commit file while the run goes on: replaced.
        shutil.copytree(os.path.join(ckpt.directory, "1"), os.path.join(ckpt.directory, "2"))
        os.remove(os.path.join(ckpt.directory, "2", checkpoint.COMMIT_FILE))
        assert ckpt.save(2, tree(3.0), None, {"step": 2})
    with checkpoint.Checkpointer(workdir) as ckpt:
        assert ckpt.complete_steps() == [1, 2]
        for step, value in ((1, 1.0), (2, 3.0)):
            params, _ = ckpt.restore(step, tree(0.0))
            np.testing.assert_array_equal(np.asarray(params["w"]), np.full((4, 3), value))


def test_changed_model_shapes_are_refused(uninterrupted):
    before = sorted(os.listdir(os.path.join(uninterrupted, "checkpoints")))
    proc = subprocess.run(
        train_cmd(
            uninterrupted,
            "--config.model.n_layers=3",
            "--config.model.mlp_hidden=96",
            "--config.optim.lr=0.1",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "changes model shapes: model.n_layers: 2 -> 3; model.mlp_hidden: 128 -> 96" in line
    assert "optim.lr" not in line
    assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints"))) == before


@pytest.mark.slow
def test_restore_on_another_mesh_and_params_only(uninterrupted, tmp_path):
    """Saved on 8 devices (mesh 8x1x1); restored params-only on 4 devices as a 1x2x2 mesh."""
    script = (
        "import sys, numpy as np, jax; from llada_jax import checkpoint, config, run\n"
        "cfg = config.load('configs/tiny.py', [('mesh.shape', '(1,2,2)')])\n"
        "r = run.build_run(cfg, workdir=sys.argv[1]); _, params, _ = run.create_state(r)\n"
        "p, _ = checkpoint.Checkpointer(sys.argv[1]).restore(8, params)\n"
        "k = p['blocks']['mlp']['up']['kernel'][...]\n"
        "assert len(k.sharding.device_set) == 4 and k.sharding.spec[1:] == ('fsdp', 'tensor')\n"
        "np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(p)])\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = str(tmp_path / "restored.npz")
    run([sys.executable, "-c", script, uninterrupted, out], env=env)
    cfg = config.load("configs/tiny.py", [])
    _, params, _ = run_lib.create_state(run_lib.build_run(cfg, workdir=uninterrupted))
    want, _ = checkpoint.Checkpointer(uninterrupted).restore(8, params)
    got = np.load(out)
    leaves = jax.tree.leaves(want)
    assert len(got.files) == len(leaves)
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(got[f"arr_{i}"], np.asarray(leaf))
    assert not np.array_equal(np.asarray(leaves[0]), np.asarray(jax.tree.leaves(params)[0]))


def test_nonfinite_step_is_skipped(tmp_path):
    """A NaN loss leaves params and optimizer state untouched and is reported as skipped."""
    run_ = run_lib.build_run(config.load("configs/tiny.py", []), workdir=str(tmp_path / "w"))
    graphdef, params, opt_state = run_lib.create_state(run_)
    step_fn = run_lib.make_step_fn(run_, graphdef, params, opt_state)
    batch = pipeline.to_global(run_.batches[0], run_.mesh, run_.cfg.data.batch_size)
    clean = jax.tree.map(np.asarray, (params, opt_state))
    bad = jax.tree.map(lambda x: x, params)
    scale = bad["final_norm"]["scale"]
    scale[...] = jax.device_put(scale[...].at[0].set(jnp.nan), scale[...].sharding)
    before = jax.tree.map(np.asarray, (bad, opt_state))
    new_params, new_opt, out = step_fn(bad, opt_state, batch, jnp.int32(0))
    assert int(out["skipped"]) == 1 and not np.isfinite(float(out["loss"]))
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, (new_params, new_opt)), before
    )
    # The same step from clean parameters is taken.
    restored = jax.tree.map(
        lambda a, ref: jax.device_put(a, ref.sharding), clean, (new_params, new_opt)
    )
    stepped, opt, ok = step_fn(*restored, batch, jnp.int32(0))
    assert int(ok["skipped"]) == 0 and np.isfinite(float(ok["loss"]))
    stepped, _, _ = step_fn(stepped, opt, batch, jnp.int32(1))  # the first update has lr 0
    assert not np.array_equal(
        np.asarray(stepped["embed"]["embedding"][...]), clean[0]["embed"]["embedding"][...]
    )


def test_interval_stats_count_skips_in_a_row():
    steps = [(1.0, 0), (np.nan, 1), (2.0, 0), (np.nan, 1), (np.inf, 1)]
    interval = [{"loss": jnp.float32(x), "skipped": jnp.int32(s)} for x, s in steps]
    means, in_a_row = loop.interval_stats(interval, skipped_before=5)
    assert means["skipped"] == 3 and in_a_row == 2
    assert loop.interval_stats(interval[-2:], skipped_before=5)[1] == 7  # the run goes on


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    """A learning rate that blows the weights up: every later step is skipped, and the run stops
    with one error line once more than max_skipped_in_a_row happened in a row."""
    proc = subprocess.run(
        train_cmd(
            str(tmp_path / "w"),
            "--config.optim.lr=1e30",
            "--config.optim.clip_norm=0.0",
            "--config.train.max_skipped_in_a_row=2",
            "--config.train.steps=20",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 3 steps in a row") and "max_skipped_in_a_row=2" in line

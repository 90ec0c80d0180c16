"""Faults as they happen to a run, through the real command lines: damaged checkpoints (the
trainer falls back to the newest good step, read-only tools refuse with one line), an
evaluation job beside a trainer that deletes old steps and is killed, a full disk during a
save, a resume with changed optimizer settings, and signals at every phase of a run.

Input errors that stop a run before it starts are in test_faults_config.py and
test_faults_data.py."""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from llada_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20  # the trained run: checkpoints at 5, 10, 15 and 20, a metrics line every 2 steps
RUN = [
    "--config=configs/tiny.py",
    "--config.sample.num_samples=0",
    "--config.train.final_bound=false",
    "--config.checkpoint.max_to_keep=10",
]


def trainer(workdir, *extra):
    cmd = [sys.executable, "-m", "llada_jax.train", f"--workdir={workdir}", *RUN]
    return cmd + [f"--config.train.steps={STEPS}", "--config.checkpoint.save_every=5", *extra]


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def sample_cmd(workdir, *extra):
    cmd = [sys.executable, "tools/sample.py", f"--workdir={workdir}", "--prompt=In the"]
    return cmd + ["--gen_length=8", "--steps=8", "--block_length=8", *extra]


def evaluate_cmd(workdir, *extra):
    cmd = [sys.executable, "tools/evaluate.py", f"--workdir={workdir}", "--num_tokens=64"]
    return cmd + ["--generate=false", "--progress=false", *extra]


def losses(workdir):
    """{step: loss} of metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def snapshot(directory):
    """{relative path: sha256} of every file under `directory` but the lock (it holds the pid
    of its last holder)."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in set(names) - {"writer.lock"}:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_line(proc, code):
    """The one error line of a failed command: exit `code`, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("faults") / "run")
    proc = run(trainer(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir)) == [5, 10, 15, 20]
    return workdir


@pytest.fixture
def copy(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


# --------------------------------------------------------------------------------------------
# Damage, as it happens to files
# --------------------------------------------------------------------------------------------
def step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step))


def data_files(workdir, step, item="params"):
    d = os.path.join(step_dir(workdir, step), item, "d")
    return sorted((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)


def flip_bytes(workdir, step):
    """20 bytes flipped in the middle of the item's largest data file."""
    path = data_files(workdir, step)[-1]
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(20):
            data[len(data) // 2 + 3 * i] ^= 0xFF
        f.seek(0)
        f.write(data)


def truncate(workdir, step):
    path = data_files(workdir, step)[-1]
    os.truncate(path, os.path.getsize(path) // 2)


def swap_params(workdir, step):
    """The parameters of the step before, in place of this step's: readable, but not what
    this step saved (only the fingerprints can tell)."""
    shutil.rmtree(os.path.join(step_dir(workdir, step), "params"))
    shutil.copytree(
        os.path.join(step_dir(workdir, step - 5), "params"),
        os.path.join(step_dir(workdir, step), "params"),
    )


def remove_params(workdir, step):
    shutil.rmtree(os.path.join(step_dir(workdir, step), "params"))


def remove_opt_state(workdir, step):
    shutil.rmtree(os.path.join(step_dir(workdir, step), "opt_state"))


def garbage_meta(workdir, step):
    with open(os.path.join(step_dir(workdir, step), "meta", "metadata"), "w") as f:
        f.write('{"step": 20, "conf')


def raw_items(workdir, step):
    """A step's params and opt_state as saved (numpy arrays on the default device)."""
    out = {}
    for item in ("params", "opt_state"):
        path = epath.Path(os.path.join(step_dir(workdir, step), item))
        tree = ocp.StandardCheckpointHandler().metadata(path).tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
        with ocp.StandardCheckpointer() as c:
            out[item] = c.restore(path, target)
    return out


def rewrite_step(workdir, step, params, opt_state):
    """Saves `step` again, with its meta, from the given trees (fingerprints of those trees)."""
    ckpt = checkpoint.Checkpointer(workdir)
    meta = ckpt.meta(step)
    ckpt.close()
    shutil.rmtree(step_dir(workdir, step))
    with checkpoint.Checkpointer(workdir, async_save=False, writer=True) as ckpt:
        ckpt.save(step, params, opt_state, {k: v for k, v in meta.items() if k != "checksums"})


def nan_params(workdir, step):
    """NaN in the embedding, saved properly (the fingerprints match): only the NaN check can
    refuse it."""
    items = raw_items(workdir, step)
    embedding = np.array(items["params"]["embed"]["embedding"]["value"])
    embedding[3, :5] = np.nan
    items["params"]["embed"]["embedding"]["value"] = embedding
    rewrite_step(workdir, step, items["params"], items["opt_state"])


DAMAGE = {
    "flipped_bytes": flip_bytes,
    "nan_params": nan_params,
    "truncated_file": truncate,
    "swapped_params": swap_params,
    "missing_params": remove_params,
    "missing_opt_state": remove_opt_state,
    "garbage_meta": garbage_meta,
}
FAST = ("flipped_bytes",)  # the rest run with -m slow


@pytest.mark.parametrize(
    "damage",
    [d if d in FAST else pytest.param(d, marks=pytest.mark.slow) for d in DAMAGE],
)
def test_a_damaged_latest_step_is_refused_by_tools_and_skipped_by_the_trainer(
    trained, copy, damage
):
    DAMAGE[damage](copy, 20)
    before = snapshot(copy)

    # Read-only tools: one line naming the step and the good one; nothing changed on disk.
    if damage != "missing_opt_state":  # they read the parameters only
        line = error_line(run(sample_cmd(copy)), 2)
        assert "checkpoint step 20" in line and "damaged" in line, line
        assert "the newest good step is 15: pass --step=15" in line, line
        if damage == "flipped_bytes":
            line = error_line(run(evaluate_cmd(copy)), 2)
            assert "step 20" in line and "--step=15" in line, line
            hf_dir = os.path.join(os.path.dirname(copy), "hf")
            export = [sys.executable, "tools/convert_hf.py", f"--workdir={copy}", "--export"]
            line = error_line(run(export + [f"--hf_dir={hf_dir}"]), 2)
            assert "checkpoint step 20" in line and "--step=15" in line, line
            assert not os.path.exists(hf_dir)
        assert snapshot(copy) == before

    # The trainer: sets step 20 aside, resumes at 15, replays 16..20 exactly, goes on to 24.
    proc = run(trainer(copy, "--config.train.steps=24"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    pattern = r"checkpoints: checkpoint step 20 in \S+ is damaged: .*; moved it to"
    assert re.search(pattern, proc.stdout), proc.stdout[-3000:]
    assert "resumed at step 15" in proc.stdout
    moved = snapshot(os.path.join(copy, "damaged_checkpoints", "20"))
    assert moved == {
        os.path.relpath(k, "checkpoints/20"): v
        for k, v in before.items()
        if k.startswith("checkpoints/20/")
    }, "the damaged step is moved as it was, not deleted"
    original, resumed = losses(trained), losses(copy)
    for step in (18, 20):
        assert resumed[step] == original[step], step
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(copy))[-1] == 24


@pytest.mark.slow  # the default run stays under 15 minutes
def test_two_damaged_steps_fall_back_twice(trained, copy):
    """Step 20 truncated and step 15 with flipped bytes: the run resumes at 10."""
    truncate(copy, 20)
    flip_bytes(copy, 15)
    proc = run(trainer(copy))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "resumed at step 10" in proc.stdout
    assert sorted(os.listdir(os.path.join(copy, "damaged_checkpoints"))) == ["15", "20"]
    original, resumed = losses(trained), losses(copy)
    assert all(resumed[s] == original[s] for s in (14, 16, 18, 20))  # 11 is logged alone
    # The steps saved again are good: the tools read them.
    assert run(sample_cmd(copy, "--step=20")).returncode == 0


# --------------------------------------------------------------------------------------------
# The evaluation job beside a trainer that removes old steps and is killed
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_watch_beside_a_killed_trainer_evaluates_every_surviving_step_once(tmp_path):
    """save_every=2, max_to_keep=2: the trainer deletes a step every 2 steps while the watcher
    lists and reads them, and it is SIGKILLed 4 times at random moments after a save."""
    workdir, total = str(tmp_path / "run"), 60
    cmd = trainer(workdir, f"--config.train.steps={total}", "--config.checkpoint.save_every=2")
    cmd += ["--config.checkpoint.max_to_keep=2"]
    watcher = subprocess.Popen(
        evaluate_cmd(workdir, "--watch", "--poll_sec=0.2"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rng, kills = random.Random(0), 0
    for _ in range(4):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir))
        while proc.poll() is None:  # a new checkpoint, then a random moment
            now = checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir))
            if now and now[-1] > (seen[-1] if seen else 0):
                time.sleep(rng.uniform(0.0, 1.0))
                proc.kill()
                kills += 1
                break
            time.sleep(0.05)
        proc.wait()
    final = run(cmd)
    assert final.returncode == 0, final.stderr[-3000:]
    out, err = watcher.communicate(timeout=600)
    assert watcher.returncode == 0, err[-3000:]
    assert "Traceback" not in err and kills >= 3, (kills, err[-3000:])
    scored = [int(s) for s in re.findall(r"^step (\d+): NLL bound", out, re.M)]
    assert len(scored) == len(set(scored)), "a step evaluated twice"
    results = sorted(int(n[5:-5]) for n in os.listdir(os.path.join(workdir, "eval")))
    assert sorted(scored) == results and total in results
    surviving = checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir))
    assert set(surviving) <= set(results)
    skipped = [int(s) for s in re.findall(r"^step (\d+): removed by the trainer", out, re.M)]
    assert not set(skipped) & set(results)


# --------------------------------------------------------------------------------------------
# A full disk during a save
# --------------------------------------------------------------------------------------------
def in_small_filesystem(mib, small, script, timeout=600):
    """Runs `script` (sh) with a `mib`-MiB tmpfs mounted at $SMALL, in a user and mount
    namespace of its own (nothing is mounted for the rest of the machine)."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to mount a small file system")
    mount = f'mount -t tmpfs -o size={mib}m tmpfs "$SMALL" && '
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount + script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, SMALL=small),
    )


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_failed_save_with_one_line(trained, tmp_path):
    small, out = tmp_path / "small", str(tmp_path / "out")
    small.mkdir()
    cmd = " ".join(trainer('"$SMALL/run"', "--config.checkpoint.save_every=2"))
    proc = in_small_filesystem(9, str(small), f'{cmd}; rc=$?; cp -a "$SMALL/run" {out}; exit $rc')
    line = error_line(proc, 1)
    assert re.match(
        r"error: saving checkpoint step \d+ to \S+ failed: No space left on device", line
    )
    assert "MiB free there" in line and "intact" in line
    failed = int(re.search(r"step (\d+)", line)[1])
    steps = checkpoint.complete_steps(checkpoint.checkpoint_dir(out))
    assert steps and steps[-1] == failed - 2, (steps, line)
    # Space freed (the run moved to a larger disk): it resumes exactly.
    proc = run(trainer(out, "--config.checkpoint.save_every=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed at step {steps[-1]}" in proc.stdout
    original, resumed = losses(trained), losses(out)
    assert all(resumed[s] == original[s] for s in range(failed + 2, STEPS + 1, 2))


# --------------------------------------------------------------------------------------------
# Resuming with changed settings
# --------------------------------------------------------------------------------------------
def test_optimizer_settings_change_on_resume(copy):
    """clip_norm off (once a change of the optimizer state's structure), another lr and more
    steps: the run resumes, and config.json says what it ran with."""
    proc = run(trainer(copy, "--config.optim.clip_norm=0", "--config.optim.lr=5e-4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(trainer(copy, "--config.optim.clip_norm=0", "--config.train.steps=24"))
    assert proc.returncode == 0 and "resumed at step 20" in proc.stdout, proc.stderr[-3000:]
    with open(os.path.join(copy, "config.json")) as f:
        saved = json.load(f)
    assert saved["optim"]["clip_norm"] == 0 and saved["train"]["steps"] == 24


def test_an_optimizer_state_of_another_structure_is_one_line_and_nothing_changes(copy):
    """A checkpoint whose optimizer state is not the one the config makes (as one saved when
    clipping was left out of the chain): one line before anything is written."""
    items = raw_items(copy, 20)
    rewrite_step(copy, 20, items["params"], items["opt_state"][1])  # AdamW's state alone
    before = snapshot(copy)
    line = error_line(run(trainer(copy, "--config.train.steps=24")), 2)
    assert "checkpoint step 20" in line and "opt_state does not match the config" in line, line
    assert snapshot(copy) == before


# --------------------------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_max_to_keep_1_keeps_the_final_step_across_restarts(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = trainer(workdir, "--config.train.steps=8", "--config.checkpoint.save_every=2")
    cmd += ["--config.checkpoint.max_to_keep=1"]
    assert run(cmd).returncode == 0
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir)) == [8]
    assert run(cmd + ["--config.train.steps=10"]).returncode == 0
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir)) == [10]
    assert run(sample_cmd(workdir)).returncode == 0


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------
@pytest.mark.slow  # the default run stays under 15 minutes
def test_sigterm_at_random_moments_of_start_up_exits_0(tmp_path):
    """From the interpreter's start to the first step (imports, config, data, compile)."""
    rng = random.Random(1)
    for i in range(4):
        workdir = str(tmp_path / f"run{i}")
        proc = subprocess.Popen(
            trainer(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(rng.uniform(0.05, 4.0))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (i, err[-3000:])
        assert "Traceback" not in err, err[-3000:]


def test_sigterm_after_the_last_step_exits_0(tmp_path):
    """While the end-of-run samples are drawn: the final checkpoint is already complete."""
    workdir = str(tmp_path / "run")
    cmd = trainer(workdir, "--config.train.steps=4", "--config.sample.num_samples=2")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("step 4/4"):
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir)) == [4]


@pytest.mark.slow
def test_sigint_stops_after_the_step_and_finishes_the_save_in_flight(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = trainer(workdir, "--config.train.steps=100000", "--config.checkpoint.save_every=1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 20/"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "SIGINT: stopping after this step" in out
    directory = checkpoint.checkpoint_dir(workdir)
    assert checkpoint.leftovers(directory) == [], "the save in flight was finished"
    last = int(re.findall(r"^step (\d+)/", out, re.M)[-1])
    assert checkpoint.complete_steps(directory)[-1] >= last - 1

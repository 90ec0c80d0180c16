"""A run's workdir on Google Cloud Storage (gs://), against a real GCS server on 127.0.0.1
(fake-gcs-server, started by the `gcs_server` fixture): the path layer, training killed at
random moments and resumed, the evaluation job, sampling and reports on gs:// runs, and the
writer lock on object storage."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from llada_jax import checkpoint, files, writer_lock
from llada_jax.data.corpus import read_default_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config=configs/tiny.py",
    "--config.sample.num_samples=0",
    "--config.train.final_bound=false",
    "--config.train.log_every=1",
]
DETERMINISTIC = ("loss", "grad_norm", "lr", "num_masked", "masked_ce", "skipped")


def trainer(workdir, *extra):
    return [sys.executable, "-m", "llada_jax.train", f"--workdir={workdir}", *TINY, *extra]


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def metrics(workdir):
    with files.as_epath(files.join(workdir, "metrics.jsonl")).open() as f:
        return [{k: r[k] for k in ("step",) + DETERMINISTIC} for r in map(json.loads, f)]


def prepare(text, output_dir):
    """tools/prepare_data.py of a text file into rows of configs/tiny.py's 64 tokens."""
    return [
        sys.executable,
        "tools/prepare_data.py",
        f"--input={text}",
        f"--output_dir={output_dir}",
    ] + [
        "--seq_len=64",
        "--shard_mb=0.04",
        "--doc_separator=\\n",
        "--noprogress",
    ]


def steps_of(workdir):
    return checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir))


# --------------------------------------------------------------------------------------------
# The path layer
# --------------------------------------------------------------------------------------------
def test_the_path_layer_treats_gs_as_a_local_directory(gcs_dir, tmp_path):
    for base in (str(tmp_path / "local"), gcs_dir):
        files.makedirs(files.join(base, "a"))
        files.write_atomically(files.join(base, "a", "x.json"), '{"v": 1}')
        files.write_atomically(files.join(base, "a", "x.json"), '{"v": 2}')  # replaced
        assert files.read_text(files.join(base, "a", "x.json")) == '{"v": 2}', base
        assert files.listdir(base) == ["a"] and files.listdir(files.join(base, "a")) == ["x.json"]
        assert files.isdir(files.join(base, "a")) and files.isfile(files.join(base, "a", "x.json"))
        assert (
            not files.exists(files.join(base, "b")) and files.listdir(files.join(base, "b")) == []
        )
        assert files.mtime(files.join(base, "a", "x.json")) > 0
        assert files.mtime(files.join(base, "nope")) is None
        files.rename(files.join(base, "a"), files.join(base, "b"))
        assert files.listdir(base) == ["b"] and files.read_bytes(files.join(base, "b", "x.json"))
        files.rmtree(files.join(base, "b"))
        assert files.listdir(base) == []
    assert files.resolve(gcs_dir + "/") == gcs_dir  # a URI is never made absolute
    assert files.basename(gcs_dir + "/run/") == "run"


# --------------------------------------------------------------------------------------------
# Training, killed at random moments
# --------------------------------------------------------------------------------------------
def kill_everything_of(workdir):
    """SIGKILL to every process whose command line names `workdir` (a launcher and its
    trainers, which run in a session of their own)."""
    for p in psutil.process_iter(["cmdline"]):
        if any(f"--workdir={workdir}" == a for a in p.info["cmdline"] or []):
            p.kill()


@pytest.mark.slow
def test_a_two_process_run_on_gs_killed_at_random_moments_resumes_exactly(gcs_dir, tmp_path):
    """launch/local.py, 2 processes x 4 devices, workdir and prepared data on gs://, SIGKILLed 5
    times (a random 0-1.5 s after a new checkpoint, so also during saves), then run to the end:
    every step's metrics equal those of an uninterrupted run on local disk (its data prepared
    there from the same text)."""
    steps = 40
    train = [*TINY, f"--config.train.steps={steps}", "--config.checkpoint.save_every=2"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(read_default_corpus()[:200_000], encoding="utf-8")
    local_data, data = str(tmp_path / "data"), f"{gcs_dir}/data"
    for output_dir in (local_data, data):
        ok(run(prepare(str(corpus), output_dir)))

    def launch(workdir, data):
        cmd = [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=4"]
        return cmd + [
            "--",
            f"--workdir={workdir}",
            *train,
            f"--config.data.datasets=(('{data}', 1.0),)",
        ]

    local, remote = str(tmp_path / "local"), f"{gcs_dir}/run"
    ok(run(launch(local, local_data)))
    rng, kills = random.Random(0), 0
    while kills < 5:
        proc = subprocess.Popen(launch(remote, data), cwd=ROOT, stdout=subprocess.DEVNULL)
        seen = steps_of(remote)
        while proc.poll() is None:
            now = steps_of(remote)
            if now and now != seen:
                time.sleep(rng.uniform(0.0, 1.5))
                kill_everything_of(remote)
                proc.kill()
                kills += 1
                break
            time.sleep(0.1)
        proc.wait()
        if steps_of(remote)[-1:] == [steps]:
            break  # finished before a kill: the loop needs more steps to be a fault test
    assert kills == 5, f"the run ended after {kills} kills"
    ok(run(launch(remote, data)))
    assert metrics(remote) == metrics(local)
    assert steps_of(remote)[-1] == steps


# --------------------------------------------------------------------------------------------
# The tools on gs:// runs
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_watch_sample_and_compare_follow_gs_runs(gcs_dir, tmp_path):
    first, second = f"{gcs_dir}/seed0", f"{gcs_dir}/seed1"
    watch = [sys.executable, "tools/evaluate.py", f"--workdir={first}", "--watch"]
    watch += ["--poll_sec=0.2", "--num_tokens=64", "--generate=false", "--progress=false"]
    watcher = subprocess.Popen(
        watch, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    cmd = ["--config.train.steps=6", "--config.checkpoint.save_every=2"]
    ok(run(trainer(first, *cmd)))
    out, err = watcher.communicate(timeout=300)
    assert watcher.returncode == 0 and "Traceback" not in err, err[-3000:]
    scored = [int(s) for s in re.findall(r"^step (\d+): NLL bound", out, re.M)]
    assert sorted(scored) == [2, 4, 6], out[-3000:]
    assert files.listdir(files.join(first, "eval")) == [f"step_{s}.json" for s in (2, 4, 6)]
    events = files.listdir(files.join(first, "tensorboard"))  # the trainer's and the watcher's
    assert len([n for n in events if n.startswith("events.out.tfevents")]) == 2, events

    sample = [sys.executable, "tools/sample.py", f"--workdir={first}", "--prompt=In the"]
    out = ok(run(sample + ["--gen_length=8", "--steps=8", "--block_length=8", "--json"])).stdout
    assert len(json.loads(out.strip().splitlines()[-1])["tokens"]) == 8

    # Also the compilation cache and a profiler trace on gs://.
    extra = [f"--config.train.compilation_cache={gcs_dir}/jax_cache"]
    extra += ["--config.train.profile_steps=(1,1)"]
    out = ok(run(trainer(second, *cmd, "--config.seed=1", *extra)))
    assert any(n.startswith("jit_train_step-") for n in files.listdir(f"{gcs_dir}/jax_cache"))
    xplane = re.search(r"^profile: step 2 traced in (gs://\S+\.xplane\.pb);", out.stdout, re.M)
    assert xplane and files.size(xplane.group(1)) > 0, out.stdout[-3000:]
    evaluate = [sys.executable, "tools/evaluate.py", f"--workdir={second}", "--num_tokens=64"]
    ok(run(evaluate + ["--generate=false", "--progress=false"]))
    report = str(tmp_path / "report")
    ok(run([sys.executable, "tools/compare_runs.py", first, second, f"--output={report}"]))
    with open(os.path.join(report, "report.md")) as f:
        text = f.read()
    assert "seed0" in text and "seed1" in text


# --------------------------------------------------------------------------------------------
# The writer lock on object storage
# --------------------------------------------------------------------------------------------
def test_the_object_lock_excludes_a_second_writer_and_is_lost_when_taken_over(gcs_dir):
    from google.cloud import storage

    held = writer_lock.ObjectLock(gcs_dir, wait_sec=0, stale_sec=0.4)
    with pytest.raises(writer_lock.WorkdirBusy, match="still written by another process"):
        writer_lock.ObjectLock(gcs_dir, wait_sec=0.3, stale_sec=60)
    assert not held.lost
    time.sleep(0.5)
    assert not held.lost  # renewed meanwhile
    bucket, _, prefix = gcs_dir[len("gs://") :].partition("/")
    storage.Client().bucket(bucket).blob(f"{prefix}/writer.lock").upload_from_string("other")
    deadline = time.time() + 5
    while not held.lost and time.time() < deadline:
        time.sleep(0.05)
    assert held.lost
    held.release()


@pytest.mark.slow  # the default run stays under 15 minutes
def test_two_trainers_on_one_gs_workdir(gcs_dir):
    """The second trainer refuses with one line while the first runs; after a kill -9 of the
    first (its lock is never released), a new one takes the stale lock over and finishes; the
    checkpoints stay readable throughout."""
    workdir = f"{gcs_dir}/run"
    long = ["--config.train.steps=100000", "--config.checkpoint.save_every=5"]
    first = subprocess.Popen(
        trainer(workdir, *long), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not steps_of(workdir):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.2)
    second = run(trainer(workdir, *long, "--config.checkpoint.wait_for_writer_sec=2"))
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert "is still written by another process" in second.stderr
    assert first.poll() is None, "the first trainer goes on"
    first.send_signal(signal.SIGKILL)
    first.wait()
    saved = steps_of(workdir)[-1]
    third = ok(
        run(
            trainer(
                workdir,
                f"--config.train.steps={saved + 3}",
                "--config.checkpoint.lock_stale_sec=2",
            )
        )
    )
    assert "took over" in third.stdout and f"resumed at step {saved}" in third.stdout
    assert steps_of(workdir)[-1] == saved + 3

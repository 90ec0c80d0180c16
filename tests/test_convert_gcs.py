"""tools/convert_hf.py with the workdir on Google Cloud Storage (a real GCS server on 127.0.0.1,
the `gcs_server` fixture): import to gs:// and export back byte for byte, sampling and lm-eval
on the imported workdir, and an import killed mid-upload (no complete step; a rerun replaces
the partial upload, while any other non-empty target is refused)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import fsspec
import jax
import numpy as np
import pytest
from test_convert import CLI, FIXTURE, read_all

from llada_jax import checkpoint, files, inference
from llada_jax.convert import hf, hf_llada
from llada_jax.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "gs://bucket/test_convert_gcs"
STEP_COMMIT = f"checkpoints/0/{checkpoint.COMMIT_FILE}"


def start(args, env=None):
    return subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def ok(proc):
    rc, out, err = finish(proc)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    return out


def one_error_line(proc, expected):
    rc, _, err = finish(proc)
    # google.auth warns that it finds no metadata server (none on 127.0.0.1): not ours.
    lines = [s for s in err.splitlines() if s.strip() and not s.startswith("WARNING:google.auth")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert expected in lines[0], lines[0]
    return lines[0]


def objects(uri):
    """Every object under `uri`, relative to it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return sorted(p[len(path) + 1 :] for p in fs.find(path))


def local_files(directory):
    return sorted(
        os.path.relpath(os.path.join(d, n), directory)
        for d, _, ns in os.walk(directory)
        for n in ns
    )


@pytest.fixture(scope="module")
def imported(gcs_server, tmp_path_factory):
    """The fixture checkpoint imported to gs:// and, for reference, to a local directory."""
    remote, local = f"{BASE}/llada_tiny", str(tmp_path_factory.mktemp("conv") / "llada_tiny")
    procs = [start(CLI + [f"--hf_dir={FIXTURE}", f"--workdir={w}"]) for w in (remote, local)]
    for proc in procs:
        ok(proc)
    return remote, local


# ----------------------------------------------------------------------------------------------
def test_import_to_gs_then_export_is_byte_identical(imported, tmp_path):
    remote, local = imported
    assert files.listdir(remote) == ["checkpoints", "config.json"]  # no import marker left
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(remote)) == [0]
    # The workdir a local import makes: config, meta (fingerprints too), files, params metadata.
    assert files.read_text(files.join(remote, "config.json")) == open(f"{local}/config.json").read()
    with checkpoint.Checkpointer(remote) as a, checkpoint.Checkpointer(local) as b:
        assert a.meta(0) == b.meta(0)
    ckpt = files.join(remote, "checkpoints", "0")
    assert len(objects(ckpt)) == len(local_files(f"{local}/checkpoints/0"))
    assert (
        files.read_text(files.join(ckpt, "params", "_METADATA"))
        == open(f"{local}/checkpoints/0/params/_METADATA").read()
    )

    out = str(tmp_path / "hf")
    export = start(CLI + [f"--workdir={remote}", f"--hf_dir={out}", "--export"])
    to_gs = start(CLI + [f"--workdir={remote}", f"--hf_dir={BASE}/exported", "--export"])
    ok(export)
    one_error_line(to_gs, "export writes a local directory")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert read_all(out) == read_all(FIXTURE)
    with open(f"{out}/config.json") as f, open(f"{FIXTURE}/config.json") as g:
        exported = json.load(f)
        assert exported.pop("auto_map") == hf_llada.remote_auto_map()  # no code was imported
        assert exported == json.load(g)
    assert not files.exists(f"{BASE}/exported")


def test_sample_from_the_gs_workdir(imported):
    """tools/sample.py gives the tokens it gives on the local import."""
    args = ["--prompt_ids=5,6,7", "--gen_length=8", "--steps=4", "--block_length=8", "--json"]
    procs = [start([sys.executable, "tools/sample.py", f"--workdir={w}"] + args) for w in imported]
    remote, local = (json.loads(ok(p).strip().splitlines()[-1]) for p in procs)
    del remote["seconds"], local["seconds"]
    assert remote == local and len(remote["tokens"]) == 8 and remote["nfe"] == 4


@pytest.mark.slow
def test_lm_eval_model_on_the_gs_workdir(imported):
    """The model loads the imported parameters and scores with them. (The fixture has no
    tokenizer, and the shipped one's ids exceed its 256-token vocabulary: ids are given.)"""
    from llada_jax.lm_eval_model import LLaDAJaxLM

    remote, local = imported
    lm = LLaDAJaxLM(workdir=remote, mc_num=4, batch_size=8, progress=False)
    assert lm.model.step == 0 and lm.max_length == 64
    reference = inference.load(local, devices=jax.local_devices())
    for a, b in zip(jax.tree.leaves(lm.model.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    nll = lm.score_rows([([5, 6, 7, 8, 9, 10], 2), ([11, 12, 13], 1)], "test")
    assert nll.shape == (2, 4) and np.isfinite(nll).all() and (nll > 0).all()


@pytest.mark.slow
def test_tokenizer_files_go_up_with_the_workdir(gcs_dir, hf_tokenizer_dir, tmp_path):
    """An HF directory's tokenizer files are uploaded to DIR/tokenizer/, where the config points."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(FIXTURE, hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_tokenizer_dir, name), hf_dir / name)
    ok(start(CLI + [f"--hf_dir={hf_dir}", f"--workdir={gcs_dir}"]))
    assert files.listdir(gcs_dir) == ["checkpoints", "config.json", "tokenizer"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        uploaded = files.read_bytes(files.join(gcs_dir, "tokenizer", name))
        assert uploaded == (hf_dir / name).read_bytes()
    cfg = json.loads(files.read_text(files.join(gcs_dir, "config.json")))
    assert cfg["data"]["tokenizer"] == f"{gcs_dir}/tokenizer/tokenizer.json"
    assert (cfg["tokens"]["mask_id"], cfg["tokens"]["eos_id"]) == (255, 1)
    # ... and the tools read it there: the same tokens and special ids as the local files.
    remote, local = load_tokenizer(cfg["data"]["tokenizer"]), load_tokenizer(str(hf_dir))
    text = "In the beginning God created the heaven and the earth."
    assert remote.encode(text) == local.encode(text) and remote.eos_id == local.eos_id
    assert remote.chat_template == local.chat_template


# ----------------------------------------------------------------------------------------------
FAULTY = """
import os, runpy, signal, sys
from llada_jax import files
upload, calls = files.upload, []
def faulty_upload(local, target):
    calls.append(target)
    if len(calls) == {at} or target.endswith({suffix!r}):
        {fault}
    upload(local, target)
files.upload = faulty_upload
sys.argv = {argv!r}
runpy.run_path("tools/convert_hf.py", run_name="__main__")
"""
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
FAIL = "raise OSError('HTTP 503 from the store')"


def faulty_import(workdir, fault, at=0, suffix="never", env=None):
    """The converter importing the fixture to `workdir`, with `fault` as it starts its `at`-th
    file upload or the upload of the file whose name ends with `suffix`."""
    argv = ["tools/convert_hf.py", f"--hf_dir={FIXTURE}", f"--workdir={workdir}"]
    code = FAULTY.format(at=at, suffix=suffix, fault=fault, argv=argv)
    return start([sys.executable, "-c", code], env=env)


@pytest.mark.slow  # the default run stays under 15 minutes
def test_an_import_killed_mid_upload_leaves_no_complete_step_and_a_rerun_replaces_it(
    imported, tmp_path
):
    """Killed after its first uploads, or as the step's commit file was to go up: no complete
    step; a rerun removes the partial upload (it holds hf.IMPORT_MARKER) and imports again. An
    upload that fails removes what it uploaded. Any other non-empty target is refused."""
    remote, _ = imported
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the killed imports' local build stays here
    early, late, failed = (f"{BASE}/{n}" for n in ("killed_early", "killed_late", "failed"))
    procs = [
        faulty_import(early, KILL, at=3, env=env),
        faulty_import(late, KILL, suffix=STEP_COMMIT, env=env),
        faulty_import(failed, FAIL, at=3, env=env),
    ]
    for proc in procs[:2]:
        assert finish(proc)[0] == -signal.SIGKILL
    # An upload that fails: one line, and what was uploaded is removed.
    line = one_error_line(procs[2], "HTTP 503 from the store")
    assert line.startswith(f"error: cannot write {failed}/"), line
    assert objects(failed) == []
    assert len([n for n in os.listdir(tmp_path) if n.startswith("llada-import-")]) == 2
    for workdir in (early, late):
        assert checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir)) == []
        assert hf.IMPORT_MARKER in files.listdir(workdir)
    # Killed as the step's commit file was to go up: everything else is there.
    uploaded = objects(late)
    assert STEP_COMMIT not in uploaded
    assert {"config.json", "checkpoints/0/params/_METADATA", "checkpoints/0/meta/metadata"} <= set(
        uploaded
    )
    assert len(uploaded) == len(objects(remote))  # the marker instead of the commit file

    # Reruns; other non-empty targets, and an HF directory on gs://, are refused.
    foreign = f"{BASE}/foreign"
    files.write_atomically(f"{foreign}/notes.txt", "not an import")
    reruns = [start(CLI + [f"--hf_dir={FIXTURE}", f"--workdir={w}"]) for w in (early, late)]
    refused = start(CLI + [f"--hf_dir={FIXTURE}", f"--workdir={foreign}"])
    gs_input = start(CLI + [f"--hf_dir={BASE}/llada_tiny", f"--workdir={BASE}/nothing"])
    for proc, workdir in zip(reruns, (early, late)):
        assert f"removing the partial upload of an interrupted import at {workdir}" in ok(proc)
        assert files.listdir(workdir) == ["checkpoints", "config.json"]
        assert checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir)) == [0]
        assert len(objects(workdir)) == len(objects(remote))  # no stale array file left
    one_error_line(refused, f"--workdir={foreign!r} already exists and is not empty")
    assert objects(foreign) == ["notes.txt"]
    one_error_line(gs_input, "the HF checkpoint directory must be local")
    assert not files.exists(f"{BASE}/nothing")

"""Prepared data on Google Cloud Storage, against a real GCS server on localhost (the `gcs_dir`
fixture; a test that cannot start it fails): tools/prepare_data.py writes to gs:// the bytes it
writes locally and resumes there after a kill mid-upload; training reads gs:// data (the
ArrayRecord reader opening gs:// itself) to the losses of the local copy; opening a dataset reads
its metadata.json only (record counts and shard sizes), a damaged shard being found when first
read, locally and on gs://, and older metadata falling back to the sidecars' sizes; a gs:// path
without gcsfs is one error line."""

import json
import os
import shutil
import subprocess
import sys

import grain
import pytest

from llada_jax import files
from llada_jax.data import datasets, prepare, shards
from llada_jax.data.corpus import read_default_corpus
from llada_jax.data.tokenizer import default_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 64  # configs/tiny.py's data.seq_len
NO_GCSFS = "import sys; sys.modules['gcsfs'] = None; "  # as if the gcs extra were not installed
RUN_TOOL = "import runpy; runpy.run_path('tools/prepare_data.py', None, '__main__')"
RUN_TRAIN = "import runpy; runpy.run_module('llada_jax.train', None, '__main__')"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, code: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    return out, err


def prepare_cmd(inputs: str, output_dir: str, workers: int = 1, prefix: str = "") -> list[str]:
    """tools/prepare_data.py into 5 shards of 64-token rows; `prefix`: Python run before it."""
    tool = ["tools/prepare_data.py"]
    if prefix:
        tool = ["-c", prefix + RUN_TOOL]
    return [sys.executable, *tool] + [
        f"--input={inputs}",
        f"--output_dir={output_dir}",
        f"--seq_len={SEQ}",
        "--shard_mb=0.04",
        "--doc_separator=\\n",
        f"--workers={workers}",
        "--noprogress",
    ]


def train_cmd(workdir: str, data: str, prefix: str = "") -> list[str]:
    module = ["-m", "llada_jax.train"]
    if prefix:
        module = ["-c", prefix + RUN_TRAIN]
    return [sys.executable, *module] + [
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.datasets=(('{data}', 1.0),)",
        "--config.train.steps=4",
        "--config.sample.num_samples=0",
        "--config.train.final_bound=false",
    ]


def objects(directory: str) -> dict[str, bytes]:
    """Every file of a prepared directory by name: a gs:// one as google-cloud-storage lists
    and downloads it (a client apart from the gcsfs that the code under test uses)."""
    if not files.is_uri(directory):
        return {n: files.read_bytes(os.path.join(directory, n)) for n in os.listdir(directory)}
    from google.cloud import storage

    bucket, prefix = directory.removeprefix("gs://").split("/", 1)
    blobs = storage.Client().list_blobs(bucket, prefix=prefix + "/")
    return {b.name[len(prefix) + 1 :]: b.download_as_bytes() for b in blobs}


def same_output(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Shards and metadata byte for byte; sidecars equal but for the seconds a shard took."""
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".array_record.json"):
            side_a, side_b = json.loads(a[name]), json.loads(b[name])
            del side_a["result"]["seconds"], side_b["result"]["seconds"]
            assert side_a == side_b, name
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The first 200,000 characters of the shipped corpus: 106 chapters, 5 shards."""
    path = tmp_path_factory.mktemp("corpus") / "kjv.txt"
    path.write_text(read_default_corpus()[:200_000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def prepared(gcs_server, corpus, tmp_path_factory) -> tuple[str, str]:
    """The corpus prepared to gs:// (2 worker processes, each uploading its shards) and to a
    local directory (1 worker), at once."""
    remote = "gs://bucket/test_gcs_data/prepared"
    local = str(tmp_path_factory.mktemp("local") / "prepared")
    procs = [start(*prepare_cmd(corpus, remote, workers=2)), start(*prepare_cmd(corpus, local))]
    for proc in procs:
        out, _ = finish(proc)
        assert "782 records" in out and "in 5 shards (5 written, 0 skipped)" in out, out
    return remote, local


def test_prepare_to_gcs_writes_the_shards_and_metadata_a_local_run_writes(prepared):
    remote, local = prepared
    got = objects(remote)
    assert sum(shards.SHARD_RE.match(n) is not None for n in got) == 10  # 5 shards, 5 sidecars
    same_output(got, objects(local))
    meta = json.loads(got[prepare.METADATA_FILE])
    assert [s["shard_bytes"] for s in meta["shards"]] == [
        files.size(files.join(remote, s["path"])) for s in meta["shards"]
    ]
    assert not os.path.exists(os.path.join(ROOT, "gs:")), "written to a local directory 'gs:'"


@pytest.mark.slow
def test_training_on_gcs_data_gives_the_losses_of_the_local_copy(prepared, tmp_path):
    remote, local = prepared
    runs = {}
    for name, data in (("gcs", remote), ("local", local)):
        runs[name] = (str(tmp_path / name), start(*train_cmd(str(tmp_path / name), data)))
    losses = {}
    for name, (workdir, proc) in runs.items():
        out, _ = finish(proc)
        data = remote if name == "gcs" else local
        assert f"data: {data} (782 rows, 100%)" in out, out
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            losses[name] = [(m["step"], m["loss"]) for m in map(json.loads, f)]
    assert [s for s, _ in losses["gcs"]] == [1, 2, 4]
    assert losses["gcs"] == losses["local"]


@pytest.mark.parametrize("where", ["gcs", "local"])
def test_counts_come_from_metadata_and_shards_are_opened_and_checked_when_first_read(
    prepared, where, gcs_dir, tmp_path, monkeypatch
):
    """Opening a dataset reads its metadata.json only: no shard is listed, stat'ed or opened,
    a missing and a truncated one included; a shard is opened when a record of it is first read
    (on gs://, by the ArrayRecord reader itself), and a damaged one is found then, with the line
    a local one gives."""
    local = prepared[1]
    data = gcs_dir if where == "gcs" else str(tmp_path / "data")
    files.makedirs(data)
    copied = objects(local)
    for name, blob in copied.items():
        files.as_epath(files.join(data, name)).write_bytes(blob)
    meta = prepare.load_metadata(data)
    names = [s["path"] for s in meta["shards"]]
    files.remove(files.join(data, names[1]))
    size = len(copied[names[2]])
    files.as_epath(files.join(data, names[2])).write_bytes(copied[names[2]][: size // 2])

    opened, sized, read = [], [], []
    reader, size_of, read_text = grain.sources.ArrayRecordDataSource, files.size, files.read_text
    monkeypatch.setattr(
        grain.sources, "ArrayRecordDataSource", lambda p: opened.append(p[0]) or reader(p)
    )
    monkeypatch.setattr(files, "size", lambda p: sized.append(p) or size_of(p))
    monkeypatch.setattr(files, "read_text", lambda p: read.append(p) or read_text(p))
    (source,) = datasets.open_sources(((data, 1.0),), "pretrain", SEQ, default_tokenizer(), 4096)
    assert len(source.rows) == meta["num_records"] == 782
    assert opened == sized == [] and read == [files.join(data, prepare.METADATA_FILE)]

    counts = [s["num_records"] for s in meta["shards"]]
    first_of = [sum(counts[:i]) for i in range(len(counts))]
    want = shards.read_shard(os.path.join(local, names[0]))
    assert (source.rows[5] == want[5]).all()
    assert opened == sized == [files.join(data, names[0])]  # gs:// to the reader itself
    assert (
        source.rows[first_of[4] + 1] == shards.read_shard(os.path.join(local, names[4]))[1]
    ).all()
    fix = f": the file is truncated or corrupted; delete it and {shards.REPREPARE}"
    with pytest.raises(shards.DataError) as e:
        source.rows[first_of[1]]
    assert str(e.value) == f"data shard {files.join(data, names[1])} is missing: {shards.REPREPARE}"
    with pytest.raises(shards.DataError) as e:
        source.rows[first_of[2] + 3]
    assert str(e.value) == (
        f"data shard {files.join(data, names[2])} has {size // 2} bytes, {size} when written{fix}"
    )
    assert len(opened) == 2  # shards 0 and 4: the damaged ones refused before the reader
    assert len(read) == 1  # no sidecar: metadata.json records the sizes


def test_metadata_without_shard_sizes_checks_them_against_the_sidecars(prepared, tmp_path):
    """A directory prepared before metadata.json recorded shard sizes (e.g. a cached shipped
    corpus): its counts still come from metadata.json, and a shard's size is checked against its
    sidecar when the shard is first read."""
    data = str(tmp_path / "data")
    shutil.copytree(prepared[1], data)
    meta = prepare.load_metadata(data)
    for entry in meta["shards"]:
        del entry["shard_bytes"]
    shards.write_json(os.path.join(data, prepare.METADATA_FILE), meta)
    shard = os.path.join(data, meta["shards"][3]["path"])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    (source,) = datasets.open_sources(((data, 1.0),), "pretrain", SEQ, default_tokenizer(), 4096)
    assert len(source.rows) == 782
    first = sum(s["num_records"] for s in meta["shards"][:3])
    assert source.rows[first - 1].shape == (SEQ,)
    with pytest.raises(shards.DataError, match=f"has {size - 1000} bytes, {size} when written"):
        source.rows[first]


def test_a_gcs_path_without_gcsfs_is_one_error_line(corpus, gcs_dir, tmp_path):
    want = f"error: '{gcs_dir}' is on Google Cloud Storage: pip install -e \".[gcs]\" first"
    procs = [
        start(*prepare_cmd(corpus, gcs_dir, prefix=NO_GCSFS)),
        start(*train_cmd(str(tmp_path / "run"), gcs_dir, prefix=NO_GCSFS)),
    ]
    for proc in procs:
        _, err = finish(proc, 2)
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if line.strip()] == [want], err[-3000:]
    assert not objects(gcs_dir)


# Runs tools/prepare_data.py with files.upload replaced: the upload numbered UPLOAD_KILL sends
# the first half of the shard (or all of it with UPLOAD_KILL_WHOLE) as the object, then the
# process is SIGKILLed, before the shard's sidecar.
KILL_AT_UPLOAD = """
import os, signal, sys
from llada_jax import files
n = [0]
def upload(local, path, real=files.upload):
    n[0] += 1
    if n[0] == int(os.environ['UPLOAD_KILL']):
        data = open(local, 'rb').read()
        keep = len(data) if os.environ.get('UPLOAD_KILL_WHOLE') else len(data) // 2
        files.as_epath(path).write_bytes(data[:keep])
        os.kill(os.getpid(), signal.SIGKILL)
    real(local, path)
files.upload = upload
"""


def test_prepare_killed_mid_upload_resumes_to_identical_bytes(prepared, corpus, gcs_dir, tmp_path):
    """Killed during the second shard's upload (half of it stored, as a failed upload could
    leave), then after the next one's whole upload but before its sidecar: the reruns remake
    exactly those shards and end with the bytes of a local run; no metadata.json before."""
    _, local = prepared
    # PYTHONUNBUFFERED: its output up to the kill; TMPDIR: the staging directories it leaves.
    env = dict(os.environ, UPLOAD_KILL="2", PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))
    cmd = prepare_cmd(corpus, gcs_dir, prefix=KILL_AT_UPLOAD)
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    left = objects(gcs_dir)
    assert sorted(left) == [
        "pretrain-00000-of-00005.array_record",
        "pretrain-00000-of-00005.array_record.json",
        "pretrain-00001-of-00005.array_record",
    ]
    assert len(left["pretrain-00001-of-00005.array_record"]) == 131072 // 2

    env.update(UPLOAD_KILL="1", UPLOAD_KILL_WHOLE="1")  # the rerun's first upload: shard 1
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "skipped 1 complete shards" in killed.stdout
    assert prepare.METADATA_FILE not in objects(gcs_dir)

    assert len(os.listdir(tmp_path)) == 2  # the killed runs' staging directories, and no more
    out, _ = finish(start(*prepare_cmd(corpus, gcs_dir)))
    assert "(4 written, 1 skipped)" in out, out
    same_output(objects(gcs_dir), objects(local))

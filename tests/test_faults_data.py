"""Bad data and run files met by the command-line tools, each run as a real process: one error
line naming the file (and what a valid one is), exit 2, no traceback, nothing saved damaged.

tools/prepare_data.py on inputs that give no record and on one long line, training on a damaged
shard, tools/convert_hf.py on a truncated safetensors file, and metrics.jsonl / config.json
lines that do not read (resuming the trainer, tools/compare_runs.py)."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from llada_jax import metrics
from llada_jax.data import prepare, shards
from llada_jax.data.tokenizer import default_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf_llada_tiny")
SEQ = 64  # configs/tiny.py's data.seq_len
METRICS_VALID = 'valid: one JSON object with a "step" per line; fix or remove that line'


def start(*args: str) -> subprocess.Popen:
    """A command of this repository started from its root, its output captured as text."""
    return subprocess.Popen(
        list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def error_line(proc: subprocess.Popen, code: int = 2) -> str:
    """Waits for `proc`; checks it exited `code` with one line on stderr and no traceback."""
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in err + out, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, err[-3000:])
    assert lines[0].startswith("error: "), lines
    return lines[0]


def prepare_cmd(inputs: str, output_dir: str, *flags: str) -> list[str]:
    tool = [sys.executable, "tools/prepare_data.py", "--workers=1", "--noprogress"]
    return tool + [f"--input={inputs}", f"--output_dir={output_dir}", *flags]


def train_cmd(workdir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llada_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.sample.num_samples=0",
        "--config.train.final_bound=false",
        *overrides,
    ]


# ------------------------------------------------------------------ prepare_data: no records
def test_inputs_without_records_exit_2_and_leave_no_dataset(tmp_path):
    """Empty, whitespace-only and shorter-than-a-row inputs: the counts, what a record needs,
    and no metadata.json, so training refuses the directory."""
    short = "In the beginning God created the heaven and the earth."
    files = {"empty.txt": "", "blank.txt": " \n\t\n", "short.txt": short}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    tokens = len(default_tokenizer().encode(short)) + 1  # the document and its EOS
    need = "a record is --seq_len=2048 tokens (documents with EOS) of one shard"
    fix = "give more text or a smaller --seq_len"
    expected = {
        "empty.txt": f"documents: 0, tokens: 0, bad records: 1, the first {tmp_path}/empty.txt:1:"
        " empty text (no document in file)",
        "blank.txt": f"documents: 0, tokens: 0, bad records: 1, the first {tmp_path}/blank.txt:1:"
        " empty text (no document in file)",
        "short.txt": f"documents: 1, tokens: {tokens}, bad records: 0",
    }
    procs = {
        name: start(*prepare_cmd(str(tmp_path / name), str(tmp_path / f"out_{name}")))
        for name in files
    }
    for name, proc in procs.items():
        assert error_line(proc) == (
            f"error: input {tmp_path / name} gave 0 records ({expected[name]}); {need}: {fix}"
        )
        assert not os.path.exists(tmp_path / f"out_{name}" / prepare.METADATA_FILE)
        with pytest.raises(FileNotFoundError, match="prepare the data"):
            prepare.load_metadata(str(tmp_path / f"out_{name}"))


# ------------------------------------------------------------------ prepare_data: a long line
def test_text_pieces_cut_before_a_space_after_a_word():
    text = "aa  bbb c" + "x" * 12 + " d"
    pieces = list(shards.text_pieces(text, limit=6))
    # "aa" (the run of spaces stays with the next word), "  bbb", " c" + 4 x's, then a stretch
    # without a space cut at the limit, and the rest.
    assert pieces == ["aa", "  bbb", " cxxxx", "xxxxxx", "xx d"]
    assert list(shards.text_pieces("short", limit=6)) == ["short"]


def test_long_line_gives_the_whole_lines_tokens_in_bounded_memory(tmp_path):
    """A 4 MB single line is tokenized in pieces: the rows are those of the line tokenized whole,
    and the tool's peak memory grows by far less than tokenizing it whole took (175 MB)."""
    from llada_jax.data.corpus import read_default_corpus

    words = read_default_corpus().replace("\n", " ")
    line = words[:4_000_000]
    (tmp_path / "line.txt").write_text(line)
    (tmp_path / "tiny.txt").write_text(line[:1000])
    peak = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    )
    procs = {
        name: start(
            sys.executable,
            "-c",
            peak,
            *prepare_cmd(str(tmp_path / f"{name}.txt"), str(tmp_path / name), "--seq_len=8"),
        )
        for name in ("line", "tiny")
    }
    peak_kib = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        peak_kib[name] = int(out.split()[-1])
    growth_mib = (peak_kib["line"] - peak_kib["tiny"]) / 1024
    assert growth_mib < 80, peak_kib  # 175 MB more when the line was tokenized whole

    tok = default_tokenizer()
    stream = np.asarray(tok.encode(line) + [tok.eos_id], np.int32)
    rows = len(stream) // 8
    meta = prepare.load_metadata(str(tmp_path / "line"))
    got = np.concatenate(
        [np.stack(shards.read_shard(str(tmp_path / "line" / s["path"]))) for s in meta["shards"]]
    )
    np.testing.assert_array_equal(got, stream[: rows * 8].reshape(rows, 8))


# ------------------------------------------------------------------ training on a damaged shard
@pytest.fixture(scope="module")
def eight_rows(tmp_path_factory) -> str:
    """A prepared dataset of exactly 8 rows of 64 tokens in one shard: the tiny config's first
    batch (8 rows) reads every one of them."""
    tok = default_tokenizer()
    doc = "And God said, Let there be light: and there was light."
    per_doc = len(tok.encode(doc)) + 1
    root = tmp_path_factory.mktemp("eight_rows")
    copies = -(-8 * SEQ // per_doc)  # the fewest documents that fill 8 rows (< 9 rows)
    (root / "docs.jsonl").write_text((json.dumps({"text": doc}) + "\n") * copies)
    out = str(root / "data")
    meta = prepare.prepare(
        [str(root / "docs.jsonl")], out, seq_len=SEQ, workers=1, progress=False, log=lambda *_: None
    )
    assert meta["num_records"] == 8 and len(meta["shards"]) == 1
    return out


@pytest.mark.slow
def test_damaged_shard_stops_training_with_one_line_naming_it(eight_rows, tmp_path):
    """A truncated shard (found when the run opens it) and one whose records are corrupted
    (found reading them, in a grain thread or a grain worker process): one line naming the
    shard and saying how to make it again; deleting it and preparing again restores it."""
    name = prepare.load_metadata(eight_rows)["shards"][0]["path"]
    size = os.path.getsize(os.path.join(eight_rows, name))
    cases = {}
    for case in ("truncated", "corrupted", "corrupted_workers"):
        data = str(tmp_path / case)
        shutil.copytree(eight_rows, data)
        shard = os.path.join(data, name)
        with open(shard, "r+b") as f:
            if case == "truncated":
                f.truncate(size // 2)
            else:  # the records' chunks, not the file's footer
                f.seek(100)
                f.write(b"\xff" * 900)
        workers = "1" if case == "corrupted_workers" else "0"
        cases[case] = (
            shard,
            start(
                *train_cmd(
                    str(tmp_path / f"run_{case}"),
                    f"--config.data.datasets=(('{data}', 1.0),)",
                    f"--config.data.workers={workers}",
                )
            ),
        )
    fix = (
        ": the file is truncated or corrupted; delete it and re-run tools/prepare_data.py with "
        "the same inputs and options (it rewrites missing shards)"
    )
    shard, proc = cases["truncated"]
    assert error_line(proc) == (
        f"error: data shard {shard} has {size // 2} bytes, {size} when written{fix}"
    )
    for case in ("corrupted", "corrupted_workers"):
        shard, proc = cases[case]
        line = error_line(proc)
        assert re.fullmatch(
            rf"error: data shard {re.escape(shard)} record [0-7] cannot be read "
            rf"\(Corrupted Riegeli/records file: [^()]+\){re.escape(fix)}",
            line,
        ), line

    # The fix the line gives: delete the shard, prepare again with the same inputs and options.
    os.remove(shard)
    prepare.prepare(
        [os.path.join(os.path.dirname(eight_rows), "docs.jsonl")],
        os.path.dirname(shard),
        seq_len=SEQ,
        workers=1,
        progress=False,
        log=lambda *_: None,
    )
    with open(shard, "rb") as a, open(os.path.join(eight_rows, name), "rb") as b:
        assert a.read() == b.read()


# ------------------------------------------------------------------ convert_hf: truncated file
def test_truncated_safetensors_is_named_and_nothing_is_written(tmp_path):
    original = os.path.join(FIXTURE, "model.safetensors")
    with open(original, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    last = max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )
    begin, end = (8 + header_len + o for o in header[last]["data_offsets"])
    keep = {"tensors": len(data) - 1000, "header": 100}
    procs = {}
    for case, size in keep.items():
        hf_dir = tmp_path / f"hf_{case}"
        hf_dir.mkdir()
        shutil.copy(os.path.join(FIXTURE, "config.json"), hf_dir)
        (hf_dir / "model.safetensors").write_bytes(data[:size])
        procs[case] = start(
            sys.executable,
            "tools/convert_hf.py",
            f"--hf_dir={hf_dir}",
            f"--workdir={tmp_path / f'out_{case}'}",
        )
    path = tmp_path / "hf_tensors" / "model.safetensors"
    assert error_line(procs["tensors"]) == (
        f"error: {path} is truncated: its header says tensor {last!r} spans bytes "
        f"{begin}..{end}, but the file has {len(data) - 1000} bytes"
    )
    path = tmp_path / "hf_header" / "model.safetensors"
    assert error_line(procs["header"]) == (
        f"error: {path} is truncated or corrupted: its first 8 bytes announce a "
        f"{header_len}-byte header, but the file has 100 bytes"
    )
    assert sorted(os.listdir(tmp_path)) == ["hf_header", "hf_tensors"]  # no workdir, no temp


# ------------------------------------------------------------------ metrics.jsonl, config.json
def test_metrics_lines_that_do_not_read(tmp_path):
    """A last line cut short by a kill is dropped (as before); any other bad line is one error
    naming the file, the line and what is wrong."""
    path = str(tmp_path / "metrics.jsonl")
    good = b'{"step": 1, "loss": 2.5}\n{"step": 2, "loss": NaN}\n'
    cases = {
        b'{"step": 3, "lo': None,
        b'{"step": 3, "x": "\xc3': None,  # cut inside a UTF-8 character
        b'{"step": 3, "x": "\xff"}\n{"step": 4}\n': "line 3: invalid UTF-8 (byte 18)",
        b'{"loss": 1.0}\n{"step": 4}\n': 'line 3: no "step"',
        b"[3, 1.0]\n": "line 3: not a JSON object but list",
        b'{"step": "3"}\n': "line 3: \"step\" is '3', not an integer",
        b'{"step": 3, "lo\n{"step": 4}\n': "line 3: not JSON (Unterminated string starting at,"
        " column 13)",
    }
    for tail, problem in cases.items():
        with open(path, "wb") as f:
            f.write(good + tail)
        if problem is None:
            assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]
            continue
        with pytest.raises(ValueError) as e:
            metrics.read_jsonl(path)
        assert str(e.value) == f"{path} {problem}; {METRICS_VALID}"


def test_resume_with_a_bad_metrics_line_exits_2_and_changes_nothing(tiny_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run, workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    lines[1] = b'{"loss": 1.0}\n'
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    line = error_line(start(*train_cmd(workdir, "--config.train.steps=8")))
    assert line == f'error: {path} line 2: no "step"; {METRICS_VALID}'
    with open(path, "rb") as f:
        assert f.read() == b"".join(lines)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == steps


def write_run(root, name: str) -> str:
    """A hand-made evaluated workdir, as tools/compare_runs.py reads one."""
    workdir = root / name
    (workdir / "eval").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"data": {"batch_size": 4, "seq_len": 8}}))
    result = {"step": 4, "bits_per_token": 9.0, "bits_stderr": 0.01}
    (workdir / "eval" / "step_4.json").write_text(json.dumps(result))
    (workdir / "metrics.jsonl").write_text('{"step": 2, "loss": 7.0}\n{"step": 4, "loss": 6.0}\n')
    return str(workdir)


def test_compare_runs_names_the_file_that_does_not_read(tmp_path):
    good = write_run(tmp_path, "good-seed0")
    config = write_run(tmp_path, "config-seed0")
    with open(os.path.join(config, "config.json"), "w") as f:
        f.write('{"data": {"batch_size": 4,')  # cut short
    lines = write_run(tmp_path, "lines-seed0")
    with open(os.path.join(lines, "metrics.jsonl"), "w") as f:
        f.write('{"step": 2, "loss": 7.0}\n{"loss": 6.5}\n{"step": 4, "loss": 6.0}\n')
    procs = {
        w: start(sys.executable, "tools/compare_runs.py", good, w, f"--output={tmp_path / 'r'}")
        for w in (config, lines)
    }
    assert error_line(procs[config]) == (
        f"error: {config}/config.json is not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 27 (char 26))"
    )
    metrics_path = os.path.join(lines, "metrics.jsonl")
    assert error_line(procs[lines]) == f'error: {metrics_path} line 2: no "step"; {METRICS_VALID}'
    assert not os.path.exists(tmp_path / "r")

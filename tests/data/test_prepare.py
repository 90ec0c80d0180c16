"""Tests of offline data preparation (llada_jax.data.prepare, tools/prepare_data.py)."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.data import chat, inputs, prepare, sft, shards
from llada_jax.data.tokenizer import Tokenizer, default_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def _write(path, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(data)
    return str(path)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _all_records(out_dir, meta) -> list[np.ndarray]:
    return [r for s in meta["shards"] for r in shards.read_shard(os.path.join(out_dir, s["path"]))]


def _expected_rows(tok, docs, seq_len) -> np.ndarray:
    stream = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id], np.int32) for d in docs])
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len), len(stream) - n * seq_len


def _quiet(**kw):
    return dict(progress=False, log=lambda *a: None, **kw)


def _corpus(tmp_path):
    """A text dir (2 files), a .gz text file and a JSONL file; returns (inputs, docs in order)."""
    a = "def f(x):\n    return x + 1\n\n\n# done\n"
    b = "Chapter 1\nIn the beginning was the word, héllo 日本語.\n"
    c = "A gzipped document\twith tabs.\n" * 3
    j = ["first json doc", "second\njson doc  ", "third: 12345"]
    _write(tmp_path / "in" / "docs" / "a.py", a)
    _write(tmp_path / "in" / "docs" / "sub" / "b.md", b)
    _write(tmp_path / "in" / "docs" / ".hidden", "never read")
    with gzip.open(tmp_path / "in" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write(c)
    _write(tmp_path / "in" / "d.jsonl", _jsonl({"text": t, "id": i} for i, t in enumerate(j)))
    inputs = [
        str(tmp_path / "in" / "docs"),
        str(tmp_path / "in" / "c.txt.gz"),
        str(tmp_path / "in" / "d.jsonl"),
    ]
    return inputs, [a, b, c] + j


def test_pretrain_rows_are_concat_then_split(tmp_path, tok) -> None:
    inputs, docs = _corpus(tmp_path)
    out = str(tmp_path / "out")
    meta = prepare.prepare(inputs, out, "pretrain", seq_len=16, workers=1, **_quiet())
    rows, tail = _expected_rows(tok, docs, 16)
    got = np.stack(_all_records(out, meta))
    assert got.dtype == np.int32 and got.shape == rows.shape
    np.testing.assert_array_equal(got, rows)
    assert meta == prepare.load_metadata(out) | {k: meta[k] for k in meta if k.startswith("_")}
    assert (
        meta["num_documents"],
        meta["num_records"],
        meta["num_tokens"],
        meta["dropped_tail_tokens"],
    ) == (len(docs), len(rows), rows.size, tail)
    assert (
        meta["vocab_size"] == tok.vocab_size and meta["tokenizer"]["fingerprint"] == tok.fingerprint
    )
    assert meta["special_ids"] == {
        "pad": tok.pad_id,
        "eos": tok.eos_id,
        "mask": tok.mask_id,
        "eot": tok.eot_id,
    }
    assert meta["bad_records"] == 0 and meta["format"] == "pretrain" and meta["seq_len"] == 16
    assert meta["num_input_files"] == 4
    assert int(got.max()) < tok.vocab_size
    # Document separator: a.py splits into two documents on "\n\n\n".
    meta2 = prepare.prepare(
        inputs,
        str(tmp_path / "out2"),
        "pretrain",
        seq_len=16,
        doc_separator="\n\n\n",
        workers=1,
        **_quiet(),
    )
    docs2 = docs[0].split("\n\n\n") + docs[1:]
    rows2, _ = _expected_rows(tok, docs2, 16)
    np.testing.assert_array_equal(np.stack(_all_records(str(tmp_path / "out2"), meta2)), rows2)
    assert meta2["num_documents"] == len(docs) + 1


def test_grain_reads_shards(tmp_path, tok) -> None:
    import grain

    inputs, docs = _corpus(tmp_path)
    out = str(tmp_path / "out")
    meta = prepare.prepare(inputs, out, "pretrain", seq_len=8, workers=1, **_quiet())
    src = grain.sources.ArrayRecordDataSource(
        [os.path.join(out, s["path"]) for s in meta["shards"]]
    )
    assert len(src) == meta["num_records"]
    rows, _ = _expected_rows(tok, docs, 8)
    np.testing.assert_array_equal(np.frombuffer(src[3], "<i4"), rows[3])


def _big_jsonl(tmp_path, n=120) -> tuple[str, list[str]]:
    texts = [f"Document number {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(n)]
    return _write(tmp_path / "big" / "big.jsonl", _jsonl({"text": t} for t in texts)), texts


def test_deterministic_across_worker_counts_and_split_files(tmp_path, tok) -> None:
    path, texts = _big_jsonl(tmp_path)
    small = _write(tmp_path / "big" / "small.txt", "a small text file")
    metas = {}
    for w in (1, 2):
        metas[w] = prepare.prepare(
            [path, small],
            str(tmp_path / f"w{w}"),
            "pretrain",
            seq_len=32,
            workers=w,
            shard_bytes=2000,
            **_quiet(),
        )
    assert len(metas[1]["shards"]) >= 3  # the big file is cut into several units
    assert metas[1]["shards"] == metas[2]["shards"]
    for s in metas[1]["shards"]:
        with (
            open(tmp_path / "w1" / s["path"], "rb") as f1,
            open(tmp_path / "w2" / s["path"], "rb") as f2,
        ):
            assert f1.read() == f2.read()
    # Every document is used exactly once; each unit is concat-then-split on its own.
    m = metas[1]
    assert m["num_documents"] == len(texts) + 1
    total = sum(len(tok.encode(t)) + 1 for t in texts + ["a small text file"])
    assert m["num_tokens"] + m["dropped_tail_tokens"] == total
    assert m["num_tokens"] == 32 * m["num_records"]
    stream = np.concatenate(_all_records(str(tmp_path / "w1"), m))
    assert int((stream == tok.eos_id).sum()) <= len(texts) + 1


def test_rerun_skips_complete_shards_and_redoes_changed(tmp_path) -> None:
    inputs, _ = _corpus(tmp_path)
    path, _ = _big_jsonl(tmp_path)
    inputs.append(path)
    out = str(tmp_path / "out")
    kw = dict(seq_len=16, workers=1, shard_bytes=1500, progress=False)
    first = prepare.prepare(inputs, out, "pretrain", log=lambda *a: None, **kw)
    n = len(first["shards"])
    assert n >= 3 and first["_shards_written"] == n
    mtimes = {s["path"]: os.stat(os.path.join(out, s["path"])).st_mtime_ns for s in first["shards"]}
    logs = []
    second = prepare.prepare(inputs, out, "pretrain", log=logs.append, **kw)
    assert second["_shards_written"] == 0 and f"skipped {n} complete shards" in logs
    assert {
        s["path"]: os.stat(os.path.join(out, s["path"])).st_mtime_ns for s in first["shards"]
    } == mtimes
    assert prepare.load_metadata(out)["num_records"] == first["num_records"]
    # A changed input redoes only its shard.
    with open(tmp_path / "in" / "d.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    third = prepare.prepare(inputs, out, "pretrain", log=lambda *a: None, **kw)
    assert third["_shards_written"] == 1 and third["num_documents"] == first["num_documents"] + 1
    # Another seq_len redoes everything (and the metadata follows).
    fourth = prepare.prepare(inputs, out, "pretrain", log=lambda *a: None, **(kw | {"seq_len": 8}))
    assert (
        fourth["_shards_written"] == len(fourth["shards"])
        and prepare.load_metadata(out)["seq_len"] == 8
    )


def test_format_turns(tok) -> None:
    h = {role: tok.encode(text) for role, text in chat.ROLE_HEADERS.items()}
    eot = [tok.eot_id]
    e = tok.encode
    pairs = chat.format_turns(
        tok,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "trailing user turn is ignored"},
        ],
    )
    sys_turn = h["system"] + e("Be brief.") + eot
    turn1 = h["user"] + e("Hi there") + eot
    reply1 = e("Hello!") + eot
    turn2 = h["user"] + e("2+2?") + eot
    assert pairs == [
        (sys_turn + turn1 + h["assistant"], reply1),
        (sys_turn + turn1 + h["assistant"] + reply1 + turn2 + h["assistant"], e("4") + eot),
    ]
    assert (
        tok.decode(pairs[1][0])
        == "System:\nBe brief.<|eot|>User:\nHi there<|eot|>Assistant:\nHello!<|eot|>"
        "User:\n2+2?<|eot|>Assistant:\n"
    )
    for bad in (
        [],
        [{"role": "user", "content": "no reply"}],
        [{"role": "bot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "assistant", "content": "  "}],
        ["not a dict"],
    ):
        with pytest.raises(inputs.BadRecord):
            chat.format_turns(tok, bad)


def test_sft_records(tmp_path, tok) -> None:
    e, eot, h = (
        tok.encode,
        [tok.eot_id],
        {r: tok.encode(t) for r, t in chat.ROLE_HEADERS.items()},
    )
    rows = [
        {"prompt": "What is 1+1?", "response": "2"},
        {"prompt": "Name a color.", "response": "Blue.", "system": "You are terse."},
        {
            "messages": [
                {"role": "system", "content": "Sys"},
                {"role": "user", "content": "A"},
                {"role": "assistant", "content": "B"},
                {"role": "user", "content": "C"},
                {"role": "assistant", "content": "D"},
            ]
        },
        {"text": "not sft"},
    ]
    path = _write(tmp_path / "sft.jsonl", _jsonl(rows))
    out = str(tmp_path / "out")
    meta = prepare.prepare([path], out, "sft", workers=1, **_quiet())
    expected = [
        (h["user"] + e("What is 1+1?") + eot + h["assistant"], e("2") + eot),
        (
            h["system"]
            + e("You are terse.")
            + eot
            + h["user"]
            + e("Name a color.")
            + eot
            + h["assistant"],
            e("Blue.") + eot,
        ),
        (h["system"] + e("Sys") + eot + h["user"] + e("A") + eot + h["assistant"], e("B") + eot),
        (
            h["system"]
            + e("Sys")
            + eot
            + h["user"]
            + e("A")
            + eot
            + h["assistant"]
            + e("B")
            + eot
            + h["user"]
            + e("C")
            + eot
            + h["assistant"],
            e("D") + eot,
        ),
    ]
    records = _all_records(out, meta)
    assert len(records) == 4
    for rec, (p, r) in zip(records, expected):
        assert rec.tolist() == [len(p)] + p + r
        prompt, response = sft.decode_record(rec)
        assert prompt.tolist() == p and response.tolist() == r
    assert (meta["num_documents"], meta["num_records"], meta["bad_records"]) == (3, 4, 1)
    assert meta["num_tokens"] == sum(len(p) + len(r) for p, r in expected)
    assert meta["bad_record_locations"][0]["line"] == 4 and meta["seq_len"] is None
    with pytest.raises(prepare.InputError, match="JSONL"):
        prepare.prepare(
            [_write(tmp_path / "x.txt", "text")], str(tmp_path / "o2"), "sft", **_quiet()
        )


def test_bad_records_reported_with_file_and_line(tmp_path, tok) -> None:
    lines = [
        json.dumps({"text": "good one"}).encode(),  # 1
        b'{"text": "bad \xff\xfe utf8"}',  # 2 invalid UTF-8
        b'{"text": "unterminated',  # 3 invalid JSON
        json.dumps({"body": "no text field"}).encode(),  # 4 missing field
        json.dumps({"text": "   "}).encode(),  # 5 empty text
        b"",  # 6 blank line: skipped silently
        json.dumps({"text": 7}).encode(),  # 7 not a string
        json.dumps({"text": "good two"}).encode(),  # 8
    ]
    jpath = _write(tmp_path / "in" / "mixed.jsonl", b"\n".join(lines) + b"\n")
    tpath = _write(tmp_path / "in" / "t.txt", b"ok line\nok\n\n\n\nbad \xc3( here\n")
    empty = _write(tmp_path / "in" / "z_empty.txt", b" \n")
    logs = []
    meta = prepare.prepare(
        [str(tmp_path / "in")],
        str(tmp_path / "out"),
        "pretrain",
        seq_len=4,
        doc_separator="\n\n\n",
        workers=1,
        progress=False,
        log=logs.append,
    )
    locs = [
        (os.path.basename(b["file"]), b["line"], b["reason"].split(" ")[0])
        for b in meta["bad_record_locations"]
    ]
    assert locs == [
        ("mixed.jsonl", 2, "invalid"),
        ("mixed.jsonl", 3, "invalid"),
        ("mixed.jsonl", 4, "missing"),
        ("mixed.jsonl", 5, "empty"),
        ("mixed.jsonl", 7, "field"),
        ("t.txt", 6, "invalid"),
        ("z_empty.txt", 1, "empty"),
    ]
    assert "UTF-8" in meta["bad_record_locations"][0]["reason"]
    assert "JSON" in meta["bad_record_locations"][1]["reason"]
    assert meta["bad_records"] == 7 and meta["num_documents"] == 3  # 2 JSONL docs + "ok line\nok"
    assert any(f"{jpath}:4: missing field 'text'" in line for line in logs)
    assert any(f"{tpath}:6: invalid UTF-8" in line for line in logs) and empty


def test_bad_record_lines_in_split_file(tmp_path) -> None:
    rows = [json.dumps({"text": f"document {i} " * 5}) for i in range(200)]
    bad_at = [17, 95, 160]  # 1-based lines
    for n in bad_at:
        rows[n - 1] = "{broken"
    path = _write(tmp_path / "s.jsonl", "\n".join(rows) + "\n")
    meta = prepare.prepare(
        [path],
        str(tmp_path / "out"),
        "pretrain",
        seq_len=8,
        shard_bytes=1000,
        workers=1,
        **_quiet(),
    )
    assert len(meta["shards"]) > 5
    assert [b["line"] for b in meta["bad_record_locations"]] == bad_at
    assert meta["num_documents"] == 200 - len(bad_at)


def test_unreadable_inputs_are_fatal(tmp_path) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(prepare.InputError, match="not found"):
        prepare.prepare([str(tmp_path / "missing.txt")], out, **_quiet())
    os.makedirs(tmp_path / "emptydir")
    with pytest.raises(prepare.InputError, match="no files"):
        prepare.prepare([str(tmp_path / "emptydir")], out, **_quiet())
    with pytest.raises(prepare.InputError, match="corrupt.txt.gz"):
        prepare.prepare(
            [_write(tmp_path / "corrupt.txt.gz", b"this is not gzip data at all")], out, **_quiet()
        )
    assert not os.path.exists(out)
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        prepare.load_metadata(str(tmp_path))


def test_cli_missing_input_exits_2_without_damage(tmp_path) -> None:
    out = tmp_path / "out"
    keep = _write(out / "metadata.json", '{"old": true}\n')
    good = _write(tmp_path / "good.txt", "fine")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "prepare_data.py"),
            f"--input={good},{tmp_path / 'nope.txt'}",
            f"--output_dir={out}",
            "--format=pretrain",
            "--seq_len=4",
            "--workers=1",
            "--noprogress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: input not found: {tmp_path / 'nope.txt'}"]
    assert open(keep, encoding="utf-8").read() == '{"old": true}\n' and os.listdir(out) == [
        "metadata.json"
    ]


def test_split_text_file_matches_whole_file_split(tmp_path, tok) -> None:
    docs = [f"doc {i} " + "word " * (i % 9) + "\n" * (i % 4) for i in range(60)]
    text = "\n\n\n".join(docs) + "\n\n\n\n\n"
    path = _write(tmp_path / "t.txt", text)
    meta = prepare.prepare(
        [path],
        str(tmp_path / "out"),
        "pretrain",
        seq_len=4,
        doc_separator="\n\n\n",
        shard_bytes=300,
        workers=1,
        **_quiet(),
    )
    whole = [d for d in text.split("\n\n\n") if d.strip()]
    assert len(meta["shards"]) > 3 and meta["num_documents"] == len(whole)
    assert meta["num_tokens"] + meta["dropped_tail_tokens"] == sum(
        len(tok.encode(d)) + 1 for d in whole
    )


def test_validation_split_holds_out_documents_by_content_hash(tmp_path, tok) -> None:
    docs = [f"Document number {i}: " + "word " * (i % 7 + 1) for i in range(60)]
    docs.append(docs[5])  # a repeat lands on the same side
    path = _write(tmp_path / "in.jsonl", _jsonl({"text": d} for d in docs))
    out = str(tmp_path / "out")
    fraction = 0.3

    def held_out(d):  # the rule, written again: sha256's first 8 bytes, little-endian
        return int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "little") < fraction * 2**64

    kw = _quiet(seq_len=4, workers=1)
    meta = prepare.prepare([path], out, "pretrain", validation_fraction=fraction, **kw)
    val_dir = os.path.join(out, prepare.VALIDATION_DIR)
    val_meta = prepare.load_metadata(val_dir)
    assert meta["split"] == "train" and val_meta["split"] == "validation"
    for split_dir, split_meta, keep in ((out, meta, False), (val_dir, val_meta, True)):
        chosen = [d for d in docs if held_out(d) == keep]
        rows, _ = _expected_rows(tok, chosen, 4)
        np.testing.assert_array_equal(np.stack(_all_records(split_dir, split_meta)), rows)
        assert split_meta["num_documents"] == len(chosen)
    assert 5 < val_meta["num_documents"] < 30
    # Unprepared again without a split: the held-out directory would overlap training; gone.
    prepare.prepare([path], out, "pretrain", **kw)
    assert not os.path.exists(val_dir)
    with pytest.raises(ValueError, match="validation_fraction"):
        prepare.prepare([path], out, "pretrain", validation_fraction=1.0, **kw)

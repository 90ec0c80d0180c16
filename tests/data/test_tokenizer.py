"""Tests of the shipped tokenizer and corpus (llada_jax.data.tokenizer / corpus)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from llada_jax.data.corpus import read_default_corpus
from llada_jax.data.tokenizer import (
    DEFAULT_TOKENIZER_PATH,
    MASK_PIECE,
    SentencePieceTokenizer,
    Tokenizer,
    default_tokenizer,
)
from llada_jax.data.tokenizer_training import SPECIAL_IDS_SUFFIX

TRICKY = (
    "def f(x):\n    return x + 12345  # héllo 日本語 🙂\n\n\tif x:\n\t\tpass  \n"
    "  leading and trailing spaces  \r\nCRLF, ünïcödé, Ελληνικά, emoji 👩‍👩‍👧, NUL\x00 end"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def test_corpus_round_trip(tok: Tokenizer) -> None:
    text = read_default_corpus()
    assert len(text) > 3_000_000
    sample = text[:200_000] + text[len(text) // 2 : len(text) // 2 + 100_000] + text[-100_000:]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert tok.unk_id not in ids
    assert len(ids) < 0.3 * len(sample.encode())  # BPE actually compresses English.


@pytest.mark.parametrize(
    "text", [TRICKY, "", " ", "\n", "\n\n  \n", "0123456789", "Chapter 12\nAnd"]
)
def test_round_trip_exact_without_unk(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids


def test_digits_are_split(tok: Tokenizer) -> None:
    assert len(tok.encode("12345")) == 5


def test_encode_batch_and_numpy_decode(tok: Tokenizer) -> None:
    texts = ["In the beginning", TRICKY, ""]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode(np.asarray(batch[1], dtype=np.int32)) == TRICKY


def test_special_ids(tok: Tokenizer) -> None:
    special = [tok.pad_id, tok.eos_id, tok.mask_id, tok.eot_id, tok.unk_id]
    assert len(set(special)) == len(special)
    assert all(0 <= i < tok.vocab_size for i in special)
    assert (tok.pad_id, tok.unk_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 4096
    with open(DEFAULT_TOKENIZER_PATH[: -len(".model")] + SPECIAL_IDS_SUFFIX, encoding="utf-8") as f:
        assert json.load(f) == {
            "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id,
            "eos_id": tok.eos_id,
            "mask_id": tok.mask_id,
            "eot_id": tok.eot_id,
            "unk_id": tok.unk_id,
        }


def test_mask_and_eot_pieces_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode(MASK_PIECE) == [tok.mask_id]
    assert tok.encode("<|eot|>") == [tok.eot_id]
    ids = tok.encode(f"a{MASK_PIECE}{MASK_PIECE} b")
    assert ids.count(tok.mask_id) == 2
    assert tok.decode([tok.mask_id]) == MASK_PIECE


def test_fingerprint_is_stable(tok: Tokenizer) -> None:
    with open(DEFAULT_TOKENIZER_PATH, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()[:16]
    assert tok.fingerprint == expected
    assert SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH).fingerprint == expected
    assert len(expected) == 16


def test_missing_file_gives_clear_error(tmp_path) -> None:
    path = os.path.join(tmp_path, "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(path)


def test_missing_special_piece_gives_clear_error(tmp_path) -> None:
    prefix = os.path.join(tmp_path, "plain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(read_default_corpus()[:20_000].splitlines()),
        model_prefix=prefix,
        vocab_size=100,
        model_type="bpe",
        minloglevel=2,
        num_threads=1,
    )
    with pytest.raises(ValueError, match=r"plain\.model.*<pad>"):
        SentencePieceTokenizer(prefix + ".model")


def test_training_sentences_from_jsonl_text_and_dirs(tmp_path) -> None:
    from llada_jax.data.tokenizer_training import tokenizer_training_sentences

    os.makedirs(tmp_path / "d" / "sub")
    with open(tmp_path / "d" / "a.txt", "w", encoding="utf-8") as f:
        f.write("line one\n\n  \nline two\n")
    rows = [
        {"text": "doc A\nsecond line"},
        {"prompt": "P?", "response": "R."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"other": 1},
    ]
    with open(tmp_path / "d" / "sub" / "b.jsonl", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + "{bad json\n")
    stats: dict = {}
    got = tokenizer_training_sentences([str(tmp_path / "d")], stats=stats)
    assert got == ["line one", "line two", "doc A", "second line", "P?", "R.", "hi", "yo"]
    assert stats == {"total_sentences": 8, "sampled_sentences": 8, "bad_records": 2}
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"body": "custom field"}) + "\n")
    assert tokenizer_training_sentences([str(tmp_path / "c.jsonl")], text_field="body") == [
        "custom field"
    ]


def test_training_sentence_sampling(tmp_path) -> None:
    from llada_jax.data.tokenizer_training import tokenizer_training_sentences

    path = os.path.join(tmp_path, "many.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"sentence {i}\n" for i in range(1000)))
    stats: dict = {}
    a = tokenizer_training_sentences([path], max_sentences=50, seed=1, stats=stats)
    assert len(a) == 50 and stats["total_sentences"] == 1000 and stats["sampled_sentences"] == 50
    idx = [int(s.split()[1]) for s in a]
    assert idx == sorted(idx) and len(set(idx)) == 50 and idx[-1] > 500  # input order, spread out
    assert tokenizer_training_sentences([path], max_sentences=50, seed=1) == a
    assert tokenizer_training_sentences([path], max_sentences=50, seed=2) != a
    assert len(tokenizer_training_sentences([path], max_sentences=5000)) == 1000


def _train_tokenizer(*args: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run(
        [sys.executable, os.path.join(root, "tools", "train_tokenizer.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )


def test_shipped_tokenizer_is_reproducible(tmp_path) -> None:
    prefix = os.path.join(tmp_path, "tok")
    proc = _train_tokenizer(
        "--input=llada_jax/data/assets/corpus.txt.xz",
        f"--model_prefix={prefix}",
        "--vocab_size=4096",
        "--model_type=bpe",
    )
    assert proc.returncode == 0, proc.stderr
    with open(prefix + ".model", "rb") as f, open(DEFAULT_TOKENIZER_PATH, "rb") as g:
        assert f.read() == g.read()
    with (
        open(prefix + SPECIAL_IDS_SUFFIX, "rb") as f,
        open(DEFAULT_TOKENIZER_PATH[: -len(".model")] + SPECIAL_IDS_SUFFIX, "rb") as g,
    ):
        assert f.read() == g.read()


def test_train_tokenizer_on_sampled_jsonl(tmp_path) -> None:
    text = read_default_corpus()[:300_000]
    path = os.path.join(tmp_path, "docs.jsonl.gz")
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for para in text.split("\n"):
            if para.strip():
                f.write(json.dumps({"content": para}) + "\n")
    prefix = os.path.join(tmp_path, "small")
    proc = _train_tokenizer(
        f"--input={path}",
        f"--model_prefix={prefix}",
        "--vocab_size=600",
        "--text_field=content",
        "--max_sentences=40",
        "--seed=3",
    )
    assert proc.returncode == 0, proc.stderr
    assert "training on 40 of" in proc.stdout
    t = SentencePieceTokenizer(prefix + ".model")
    assert t.vocab_size == 600 and (t.pad_id, t.unk_id, t.eos_id) == (0, 1, 2)
    assert t.decode(t.encode(TRICKY)) == TRICKY
    proc = _train_tokenizer(f"--input={os.path.join(tmp_path, 'nope')}", f"--model_prefix={prefix}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: input not found"
    )

"""Hugging Face tokenizer.json files: loading, special ids, chat template, and their use in
prepare, train, sample and evaluate."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer as RawHF

from llada_jax.data import chat, prepare, shards
from llada_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    default_tokenizer,
    load_tokenizer,
)
from llada_jax.special_ids import SpecialIds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = "And the LORD said unto Moses, Go in unto Pharaoh, and tell him.\nThus saith the LORD"


def test_round_trip_and_special_ids(hf_tokenizer_dir):
    tok = load_tokenizer(os.path.join(hf_tokenizer_dir, "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and isinstance(
        load_tokenizer(hf_tokenizer_dir), HFTokenizer
    )
    raw = RawHF.from_file(os.path.join(hf_tokenizer_dir, "tokenizer.json"))
    ids = tok.encode(TEXT)
    assert ids == raw.encode(TEXT, add_special_tokens=False).ids and len(ids) < len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == 256
    assert tok.eos_id == raw.token_to_id("<|endoftext|>")  # named by tokenizer_config.json
    assert tok.mask_id == raw.token_to_id("<|mdm_mask|>")
    assert tok.eot_id == raw.token_to_id("<|eot_id|>")
    assert tok.pad_id == tok.eos_id  # none named: EOS pads
    assert tok.decode(ids + [tok.eos_id, tok.mask_id]) == TEXT  # special tokens decode to ""
    assert tok.encode_batch([TEXT, "Amen"]) == [ids, tok.encode("Amen")]
    # The model's config overrides the ids; the tokenizer itself is unchanged.
    moved = tok.with_special_ids(SpecialIds(mask_id=255, eos_id=1))
    assert (moved.mask_id, moved.eos_id, moved.eot_id) == (255, 1, tok.eot_id)
    assert tok.mask_id != 255 and moved.fingerprint == tok.fingerprint
    assert isinstance(load_tokenizer(""), SentencePieceTokenizer)


def test_chat_template_renders_as_hugging_face_does(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    want = (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWho begat Enos?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert chat.chat_prompt(tok, "  Who begat Enos? ") == tok.encode(want)
    # Without a template: the SFT format's user turn and assistant header.
    sp = default_tokenizer()
    got = chat.chat_prompt(sp, "Who begat Enos?")
    pair = chat.format_turns(
        sp, [{"role": "user", "content": "Who begat Enos?"}, {"role": "assistant", "content": "S"}]
    )[0]
    assert got == pair[0]


def test_files_that_are_not_tokenizers_give_one_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"vocab_size": 4096, "pad_id": 0}))
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json.*sentencepiece"):
        load_tokenizer(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))


@pytest.mark.slow
def test_prepare_train_sample_and_evaluate_with_a_tokenizer_json(hf_tokenizer_dir, tmp_path):
    """The same commands as with a sentencepiece model, given --tokenizer / data.tokenizer."""
    tok_path = os.path.join(hf_tokenizer_dir, "tokenizer.json")
    tok = load_tokenizer(tok_path)
    corpus = tmp_path / "docs.jsonl"
    docs = [f"Verse {i}: and the LORD spake unto Moses, saying {i}." for i in range(200)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = str(tmp_path / "prepared")

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run(
        sys.executable,
        "tools/prepare_data.py",
        f"--input={corpus}",
        f"--output_dir={data}",
        "--seq_len=32",
        f"--tokenizer={tok_path}",
        "--validation_fraction=0.1",
        "--workers=1",
        "--progress=false",
    )
    meta = prepare.load_metadata(data)
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["vocab_size"] == 256
    stream = np.concatenate(
        [shards.read_shard(os.path.join(data, s["path"]))[0] for s in meta["shards"]]
    )
    train_docs = [d for d in docs if not shards.in_validation(d, 0.1)]
    want = np.concatenate([tok.encode(d) + [tok.eos_id] for d in train_docs])
    np.testing.assert_array_equal(stream[:32], want[:32])

    workdir = str(tmp_path / "run")
    run(
        sys.executable,
        "-m",
        "llada_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.train.steps=4",
        f"--config.data.tokenizer={tok_path}",
        f"--config.data.datasets=(('{data}', 1.0),)",
        "--config.data.seq_len=32",
        "--config.model.vocab_size=256",
        "--config.sample.num_samples=0",
        "--config.eval.generate=false",
    )
    out = run(
        sys.executable,
        "tools/sample.py",
        f"--workdir={workdir}",
        "--prompt=And the LORD",
        "--gen_length=8",
        "--steps=4",
        "--block_length=8",
        "--json",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prompt_ids"] == tok.encode("And the LORD")
    assert result["text"] == tok.decode(result["tokens"]) and len(result["tokens"]) == 8
    out = run(
        sys.executable,
        "tools/evaluate.py",
        f"--workdir={workdir}",
        "--num_tokens=64",
        "--num_samples=2",
        "--progress=false",
    )
    assert "bits/token" in out
    with open(os.path.join(workdir, "eval", "step_4.json")) as f:
        assert json.load(f)["data"] == [os.path.join(data, "validation")]

"""Sentencepiece tokenizers converted into Hugging Face tokenizer files: the same ids as
sentencepiece (the shipped model on the whole shipped corpus, a model trained here), lossless
decoding, the special ids through HFTokenizer and transformers, and the models refused."""

import json
import os
import random

import pytest
import sentencepiece as spm
import transformers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer as RawHF

from llada_jax.convert.hf_tokenizer import tokenizer_json, write_tokenizer_files
from llada_jax.data import tokenizer_training
from llada_jax.data.corpus import DEFAULT_CORPUS_PATH, read_default_corpus
from llada_jax.data.tokenizer import DEFAULT_TOKENIZER_PATH, HFTokenizer, default_tokenizer
from llada_jax.special_ids import SpecialIds

EDGE_CASES = [
    "",
    " ",
    "   several   spaces  between words ",
    " leading and trailing ",
    "\ttabs\tand\t\tmore\t",
    "\n\n",
    "a\n\n b \n",
    "12345",
    "in 1611, verse 3:16 and 007",
    "<|mdm_mask|>",
    "x<|mdm_mask|>y <|eot|>\n<|eot|><|mdm_mask|><|mdm_mask|>",
    "<|eot",
    "<|eos|> and <pad> and <unk> are text",
    "emoji 😀🎉, CJK 中文字, accents éàü, Ω",
    "\r\n",
]


@pytest.fixture(scope="module")
def shipped() -> tuple[spm.SentencePieceProcessor, RawHF]:
    """The shipped sentencepiece model and its conversion."""
    sp = spm.SentencePieceProcessor(model_file=DEFAULT_TOKENIZER_PATH)
    return sp, RawHF.from_str(tokenizer_json(DEFAULT_TOKENIZER_PATH))


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
    """The lines of the shipped corpus (one per chapter, blank lines included)."""
    return read_default_corpus().split("\n")


def _hf_ids(hf: RawHF, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_shipped_tokenizer_gives_sentencepiece_ids_on_the_whole_corpus(shipped, corpus_lines):
    sp, hf = shipped
    ids = _hf_ids(hf, corpus_lines)
    assert len(corpus_lines) > 3000
    assert ids == sp.encode(corpus_lines)
    assert hf.decode_batch(ids, skip_special_tokens=True) == corpus_lines


@pytest.mark.parametrize("text", EDGE_CASES)
def test_shipped_tokenizer_on_edge_cases(shipped, text):
    sp, hf = shipped
    ids = hf.encode(text, add_special_tokens=False).ids
    assert ids == sp.encode(text)
    assert hf.decode(ids, skip_special_tokens=True) == text == sp.decode(ids)


def test_control_pieces_in_text_are_not_special_and_decode_to_nothing(shipped):
    sp, hf = shipped
    tok = default_tokenizer()
    text = "<|eos|><pad>"
    ids = hf.encode(text, add_special_tokens=False).ids
    assert ids == sp.encode(text) and tok.eos_id not in ids and tok.pad_id not in ids
    # "▁" typed in the text is a space to both (so not given back as typed).
    assert hf.encode("a▁b", add_special_tokens=False).ids == sp.encode("a▁b") == sp.encode("a b")
    special = [tok.pad_id, tok.eos_id, tok.mask_id, tok.eot_id, sp.unk_id(), sp.piece_to_id("a")]
    assert hf.decode(special) == sp.decode(special) == "<|mdm_mask|><|eot|> ⁇ a"


def _spaced(line: str, rng: random.Random) -> str:
    """`line` with runs of spaces, an indentation and numbers, so whitespace-only pieces are
    learned."""
    words = [w + " " * rng.choice([1, 1, 2, 3]) for w in line.split(" ")[:80]]
    numbers = [f"{rng.randrange(10_000)} " if rng.random() < 0.1 else "" for _ in words]
    return " " * rng.choice([0, 2, 4, 8]) + "".join(w + n for w, n in zip(words, numbers))


def test_a_model_trained_here_converts_exactly(tmp_path):
    rng = random.Random(0)
    lines = tokenizer_training.tokenizer_training_sentences([DEFAULT_CORPUS_PATH])
    train = lines[:300] + [_spaced(line, rng) for line in lines[300:1300]]
    prefix = str(tmp_path / "small")
    tokenizer_training.train_sentencepiece(train, prefix, vocab_size=400)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert "▁▁" in pieces and "▁▁▁" in pieces  # the whitespace runs are exercised
    hf = RawHF.from_str(tokenizer_json(prefix + ".model"))
    sample = lines[2000:2100] + [_spaced(line, rng) for line in lines[2100:2400]] + EDGE_CASES
    ids = _hf_ids(hf, sample)
    assert ids == sp.encode(sample)
    assert hf.decode_batch(ids) == sp.decode(ids)


def test_written_files_load_with_the_same_ids(tmp_path, corpus_lines):
    tok = default_tokenizer()
    out = str(tmp_path / "hf")
    names = write_tokenizer_files(tok, out, model_max_length=4096)
    assert sorted(names) == sorted(os.listdir(out))
    sample = corpus_lines[:300] + EDGE_CASES
    loaded = HFTokenizer(out)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_ids == tok.special_ids
    assert loaded.encode_batch(sample) == tok.encode_batch(sample)
    assert loaded.decode(tok.encode(EDGE_CASES[10])) == EDGE_CASES[10]

    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto(corpus_lines[:300], add_special_tokens=False)["input_ids"] == tok.encode_batch(
        corpus_lines[:300]
    )
    assert auto(corpus_lines[0])["input_ids"] == tok.encode(corpus_lines[0])  # no BOS or EOS
    assert (auto.mask_token_id, auto.eos_token_id, auto.pad_token_id) == (
        tok.mask_id,
        tok.eos_id,
        tok.pad_id,
    )
    assert auto.convert_tokens_to_ids(auto.eot_token) == tok.eot_id
    assert auto.model_max_length == 4096


def test_overridden_special_ids_are_written_and_hf_files_copied(tmp_path):
    tok = default_tokenizer().with_special_ids(SpecialIds(mask_id=4, eot_id=5, pad_id=2))
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    write_tokenizer_files(tok, first, model_max_length=128)
    loaded = HFTokenizer(first)
    assert loaded.special_ids == tok.special_ids == SpecialIds(4, 2, 5, 2)

    write_tokenizer_files(loaded, second, model_max_length=64)
    with open(os.path.join(first, "tokenizer.json"), "rb") as a:
        with open(os.path.join(second, "tokenizer.json"), "rb") as b:
            assert a.read() == b.read()
    assert HFTokenizer(second).special_ids == tok.special_ids
    with open(os.path.join(second, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_max_length"] == 128  # kept, as all it had
    assert config["additional_special_tokens"] == ["\n"]


def test_hf_tokenizer_files_keep_their_config(hf_tokenizer_dir, tmp_path):
    source = HFTokenizer(hf_tokenizer_dir)
    out = str(tmp_path / "hf")
    write_tokenizer_files(source, out, model_max_length=512)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["eos_token"] == {"content": "<|endoftext|>", "special": True}  # as it was
    assert config["bos_token"] == "<|startoftext|>"
    assert config["chat_template"] == source.chat_template
    assert config["model_max_length"] == 512
    loaded = HFTokenizer(out)
    assert loaded.special_ids == source.special_ids
    assert loaded.encode(EDGE_CASES[2]) == source.encode(EDGE_CASES[2])


def _edited(tmp_path, edit) -> str:
    """The shipped model with `edit` applied to its proto, written to a file."""
    proto = sp_pb2.ModelProto()
    with open(DEFAULT_TOKENIZER_PATH, "rb") as f:
        proto.ParseFromString(f.read())
    edit(proto)
    path = str(tmp_path / "edited.model")
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def _span_words(proto: sp_pb2.ModelProto) -> None:
    proto.pieces.add(piece="d▁a", score=-1e6, type=sp_pb2.ModelProto.SentencePiece.NORMAL)


@pytest.mark.parametrize(
    "edit, unsupported",
    [
        (lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", True), "add_dummy_prefix"),
        (lambda p: setattr(p.normalizer_spec, "name", "nmt_nfkc"), "normalization rule"),
        (lambda p: setattr(p.trainer_spec, "byte_fallback", False), "byte_fallback off"),
        (_span_words, "'d▁a' spans words"),
    ],
)
def test_models_it_cannot_convert_exactly_are_refused(tmp_path, edit, unsupported):
    with pytest.raises(ValueError, match=unsupported) as e:
        tokenizer_json(_edited(tmp_path, edit))
    assert "\n" not in str(e.value)


def test_a_unigram_model_is_refused(tmp_path):
    lines = tokenizer_training.tokenizer_training_sentences([DEFAULT_CORPUS_PATH])[:200]
    prefix = str(tmp_path / "unigram")
    tokenizer_training.train_sentencepiece(lines, prefix, vocab_size=400, model_type="unigram")
    with pytest.raises(ValueError, match="model type UNIGRAM") as e:
        tokenizer_json(prefix + ".model")
    assert "\n" not in str(e.value)

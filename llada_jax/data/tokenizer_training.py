"""Training a sentencepiece tokenizer: its input sentences, read from the corpus, and the training.

The sentences are the non-empty lines of every document (text files: their lines; JSONL: the
lines of each record's text field, or of its messages / prompt and response). The settings make
the tokenizer lossless: identity normalization, whitespace kept as is, no dummy prefix, "\\n" as
its own piece and byte fallback (no unk ids), so `decode(encode(text)) == text` for any text.
Ids: 0 "<pad>", 1 "<unk>", 2 "<|eos|>", then the user-defined "<|mdm_mask|>", "<|eot|>" and
"\\n"; no BOS. `tools/train_tokenizer.py` is the command line.
"""

from __future__ import annotations

import gzip
import json
import lzma
import random
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import sentencepiece as spm

from llada_jax.data import chat
from llada_jax.data.inputs import (
    BadRecord,
    InputError,
    Piece,
    expand_inputs,
    is_jsonl,
    jsonl_records,
    string_field,
)

PAD_PIECE = "<pad>"
EOS_PIECE = "<|eos|>"
MASK_PIECE = "<|mdm_mask|>"
EOT_PIECE = "<|eot|>"


# Written beside `<prefix>.model`: its special ids, for people and other tools (the library reads
# them from the model itself). Not `.json`: a `tokenizer.json` is a Hugging Face tokenizer.
SPECIAL_IDS_SUFFIX = ".special_ids.json"


def tokenizer_training_sentences(
    inputs: Sequence[str],
    text_field: str = "text",
    max_sentences: int = 0,
    seed: int = 0,
    stats: dict[str, int] | None = None,
) -> list[str]:
    """The non-empty lines of all documents of `inputs`, in input order.

    With `max_sentences` > 0, a uniform sample of at most that many lines is drawn with a
    seeded reservoir (algorithm R, `random.Random(seed)`) in one pass, and returned in input
    order, so memory stays bounded by `max_sentences` for any corpus size. Text files are read
    with universal newlines ("\\r\\n" -> "\\n"). `stats`, if given, receives "total_sentences",
    "sampled_sentences" and "bad_records".
    """
    rng = random.Random(seed)
    sample: list[tuple[int, str]] = []
    count = 0
    bad = [0]
    for line in _corpus_lines(inputs, text_field, bad):
        if max_sentences <= 0 or count < max_sentences:
            sample.append((count, line))
        else:
            j = rng.randrange(count + 1)
            if j < max_sentences:
                sample[j] = (count, line)
        count += 1
    sample.sort(key=lambda t: t[0])
    if stats is not None:
        stats.update(total_sentences=count, sampled_sentences=len(sample), bad_records=bad[0])
    return [s for _, s in sample]


def _corpus_lines(inputs: Sequence[str], field: str, bad: list[int]) -> Iterator[str]:
    """The non-empty lines of every document; bad JSONL records are counted in bad[0]."""
    for path in expand_inputs(inputs):
        if not is_jsonl(path):
            yield from _text_file_lines(path)
            continue
        for _, texts in jsonl_records(Piece(path), lambda obj: _record_texts(obj, field)):
            if isinstance(texts, BadRecord):
                bad[0] += 1
                continue
            for text in texts:
                yield from (s for s in text.splitlines() if s.strip())


def _text_file_lines(path: str) -> Iterator[str]:
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise InputError(f"cannot read input {path}: {e}") from e


def _record_texts(obj: Any, field: str) -> list[str]:
    """The strings of a pretraining or SFT JSONL object."""
    if isinstance(obj, dict) and field in obj:
        return [string_field(obj, field)]
    messages = chat.dialogue_messages(obj)
    if not isinstance(messages, list):
        raise BadRecord("'messages' is not a list")
    texts = [
        m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)
    ]
    if not texts:
        raise BadRecord("empty text")
    return texts


def train_sentencepiece(
    sentences: Sequence[str], model_prefix: str, vocab_size: int, model_type: str = "bpe"
) -> dict[str, int]:
    """Trains on `sentences`, writes `<model_prefix>.model` and `<model_prefix>.json` (the
    special ids, which `Tokenizer` reads); returns those ids."""
    with open(model_prefix + ".model", "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_file,
            model_type=model_type,
            vocab_size=vocab_size,
            input_sentence_size=0,  # sampling is done by the caller, reproducibly
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,  # lines can be whole chapters: the default drops them
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=[MASK_PIECE, EOT_PIECE, "\n"],
            pad_id=0,
            pad_piece=PAD_PIECE,
            unk_id=1,
            bos_id=-1,
            eos_id=2,
            eos_piece=EOS_PIECE,
            num_threads=2,
            minloglevel=2,
        )
    sp = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    ids = {
        "vocab_size": sp.vocab_size(),
        "pad_id": sp.piece_to_id(PAD_PIECE),
        "eos_id": sp.piece_to_id(EOS_PIECE),
        "mask_id": sp.piece_to_id(MASK_PIECE),
        "eot_id": sp.piece_to_id(EOT_PIECE),
        "unk_id": sp.unk_id(),
    }
    with open(model_prefix + SPECIAL_IDS_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=2)
        f.write("\n")
    return ids

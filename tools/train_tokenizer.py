"""Train the sentencepiece tokenizer shipped in `llada_jax/data/assets/`.

The shipped tokenizer was made with (run from the repository root):

    python tools/train_tokenizer.py \
        --input=llada_jax/data/assets/corpus.txt.xz \
        --model_prefix=llada_jax/data/assets/tokenizer \
        --vocab_size=4096 --model_type=bpe

It writes `<model_prefix>.model` and `<model_prefix>.json` (the special ids). The
settings make the tokenizer lossless: identity normalization, whitespace kept as
is, no dummy prefix, "\\n" as its own piece and byte fallback (no unk ids), so
`decode(encode(text)) == text` for any text. Ids: 0 "<pad>", 1 "<unk>",
2 "<|eos|>", then the user-defined "<|mdm_mask|>", "<|eot|>" and "\\n"; no BOS.
"""
import gzip
import json
import lzma
from typing import IO, Iterator

from absl import app, flags
import sentencepiece as spm

PAD_PIECE = "<pad>"
EOS_PIECE = "<|eos|>"
MASK_PIECE = "<|mdm_mask|>"
EOT_PIECE = "<|eot|>"

_INPUT = flags.DEFINE_string("input", None, "Comma-separated text files (.xz / .gz allowed).", required=True)
_MODEL_PREFIX = flags.DEFINE_string("model_prefix", None, "Output path without extension.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size, special and byte pieces included.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "Sentencepiece model type.")
_INPUT_SENTENCE_SIZE = flags.DEFINE_integer(
    "input_sentence_size", 0, "Train on a random sample of this many lines (0: all lines).")


def _open_text(path: str) -> IO[str]:
    """Opens a plain, .xz or .gz text file for reading as UTF-8."""
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _lines(paths: list[str]) -> Iterator[str]:
    """Yields the non-empty lines of all files, without their newlines."""
    for path in paths:
        with _open_text(path) as f:
            yield from (line.rstrip("\n") for line in f if line.strip())


def main(argv: list[str]) -> None:
    del argv
    with open(_MODEL_PREFIX.value + ".model", "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(_INPUT.value.split(",")),
            model_writer=model_file,
            model_type=_MODEL_TYPE.value,
            vocab_size=_VOCAB_SIZE.value,
            input_sentence_size=_INPUT_SENTENCE_SIZE.value,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,  # Lines are whole chapters; the default 4192 drops long ones.
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=[MASK_PIECE, EOT_PIECE, "\n"],
            pad_id=0, pad_piece=PAD_PIECE,
            unk_id=1,
            bos_id=-1,
            eos_id=2, eos_piece=EOS_PIECE,
            num_threads=2,
            minloglevel=2,
        )
    sp = spm.SentencePieceProcessor(model_file=_MODEL_PREFIX.value + ".model")
    ids = {
        "vocab_size": sp.vocab_size(),
        "pad_id": sp.piece_to_id(PAD_PIECE),
        "eos_id": sp.piece_to_id(EOS_PIECE),
        "mask_id": sp.piece_to_id(MASK_PIECE),
        "eot_id": sp.piece_to_id(EOT_PIECE),
        "unk_id": sp.unk_id(),
    }
    with open(_MODEL_PREFIX.value + ".json", "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=2)
        f.write("\n")
    print(ids)


if __name__ == "__main__":
    app.run(main)

"""Train the sentencepiece tokenizer shipped in `llada_jax/data/assets/`.

The shipped tokenizer was made with (run from the repository root):

    python tools/train_tokenizer.py \
        --input=llada_jax/data/assets/corpus.txt.xz \
        --model_prefix=llada_jax/data/assets/tokenizer \
        --vocab_size=4096 --model_type=bpe

Inputs (`--input`, comma-separated) are files or directories (walked recursively in sorted
order): plain text (.xz / .gz allowed), whose non-empty lines are the training sentences, and
JSON lines (*.jsonl / *.json, optionally .gz / .xz), whose sentences are the non-empty lines of
each record's `--text_field`, or for SFT records of all message contents / prompt and response.
For very large corpora, `--max_sentences=N` trains on a uniform random sample of at most N
sentences, drawn with a seeded reservoir in one streaming pass (`--seed`), so memory stays
bounded; the shipped tokenizer used all sentences.

It writes `<model_prefix>.model` and `<model_prefix>.json` (the special ids). The
settings make the tokenizer lossless: identity normalization, whitespace kept as
is, no dummy prefix, "\\n" as its own piece and byte fallback (no unk ids), so
`decode(encode(text)) == text` for any text. Ids: 0 "<pad>", 1 "<unk>",
2 "<|eos|>", then the user-defined "<|mdm_mask|>", "<|eot|>" and "\\n"; no BOS.
"""

import json
import os
import sys

import sentencepiece as spm
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax.data import prepare  # noqa: E402

PAD_PIECE = "<pad>"
EOS_PIECE = "<|eos|>"
MASK_PIECE = "<|mdm_mask|>"
EOT_PIECE = "<|eot|>"

_INPUT = flags.DEFINE_list(
    "input",
    None,
    "Comma-separated text / JSONL files or directories (.xz / .gz allowed).",
    required=True,
)
_MODEL_PREFIX = flags.DEFINE_string(
    "model_prefix", None, "Output path without extension.", required=True
)
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", 4096, "Vocabulary size, special and byte pieces included."
)
_MODEL_TYPE = flags.DEFINE_enum(
    "model_type", "bpe", ["bpe", "unigram"], "Sentencepiece model type."
)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL inputs: the field holding the text.")
_MAX_SENTENCES = flags.DEFINE_integer(
    "max_sentences", 0, "Train on a uniform random sample of at most this many sentences (0: all)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the --max_sentences sample.")


def main(argv: list[str]) -> None:
    del argv
    stats: dict[str, int] = {}
    try:
        sentences = prepare.tokenizer_training_sentences(
            _INPUT.value, _TEXT_FIELD.value, _MAX_SENTENCES.value, _SEED.value, stats
        )
    except prepare.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"training on {stats['sampled_sentences']} of {stats['total_sentences']} sentences"
        + (f" ({stats['bad_records']} bad JSONL records skipped)" if stats["bad_records"] else "")
    )
    with open(_MODEL_PREFIX.value + ".model", "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_file,
            model_type=_MODEL_TYPE.value,
            vocab_size=_VOCAB_SIZE.value,
            input_sentence_size=0,  # Sampling is done above (--max_sentences), reproducibly.
            shuffle_input_sentence=True,
            max_sentence_length=1
            << 16,  # Lines are whole chapters; the default 4192 drops long ones.
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

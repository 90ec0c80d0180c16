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

It writes `<model_prefix>.model` and `<model_prefix>.special_ids.json` (the special ids); the
settings (a lossless tokenizer) are described in `llada_jax/data/tokenizer_training.py`.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import cli  # noqa: E402
from llada_jax.data import tokenizer_training  # noqa: E402
from llada_jax.data.inputs import InputError  # noqa: E402

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
        sentences = tokenizer_training.tokenizer_training_sentences(
            _INPUT.value, _TEXT_FIELD.value, _MAX_SENTENCES.value, _SEED.value, stats
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"training on {stats['sampled_sentences']} of {stats['total_sentences']} sentences"
        + (f" ({stats['bad_records']} bad JSONL records skipped)" if stats["bad_records"] else "")
    )
    ids = tokenizer_training.train_sentencepiece(
        sentences, _MODEL_PREFIX.value, _VOCAB_SIZE.value, _MODEL_TYPE.value
    )
    print(ids)


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__)
    app.run(main)

"""Tokenize text / JSONL inputs into ArrayRecord shards plus metadata.json.

    python tools/prepare_data.py --input=PATH[,PATH...] --output_dir=DIR --format=pretrain|sft \
        [--seq_len=2048] [--tokenizer=path.model] [--text_field=text] [--doc_separator=""] \
        [--workers=N] [--shard_mb=16] [--validation_fraction=0.01]

Inputs are files or directories (recursive, sorted; hidden entries skipped). *.jsonl / *.json
(optionally .gz / .xz) are JSON lines; anything else is UTF-8 text (.gz / .xz decompressed).
pretrain: documents (a text file, or its pieces between --doc_separator; a JSONL line's
--text_field) are tokenized, each followed by EOS, and cut into rows of exactly --seq_len int32
tokens. sft: JSONL lines {"prompt", "response"[, "system"]} or {"messages": [{"role",
"content"}, ...]} become one record [prompt_len, *prompt_ids, *response_ids] per assistant reply
(chat format: `llada_jax.data.chat.format_turns`). See `llada_jax/data/prepare.py` for the
details. Deterministic for any --workers; a rerun skips shards already complete. Bad records are
reported with file:line and skipped; an unreadable input, or inputs that give no record (empty,
or fewer tokens than --seq_len), print "error: ..." and exit 2, writing no metadata.json.
A pretraining document (a JSONL line's text, a text file's document) is tokenized in pieces of
at most 262,144 characters, each cut just before a space that follows a non-space (at the limit
where a piece has none): the tokens are those of the whole text for the shipped tokenizer and
byte-level BPE ones, and peak memory stays about 4x the longest line or document (0.2 GB for a
50 MB line). SFT messages are tokenized whole.
--validation_fraction holds that share of the documents (chosen by a hash of their content) out
of OUTPUT_DIR, in OUTPUT_DIR/validation/, where tools/evaluate.py finds it.
OUTPUT_DIR may be on Google Cloud Storage (gs://bucket/dir, with `pip install -e ".[gcs]"`): each
shard is written to a local temporary directory and uploaded before its sidecar, metadata.json
last; a rerun resumes there as it does locally, and training reads the shards from there.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import cli  # noqa: E402
from llada_jax.data import prepare  # noqa: E402

_INPUT = flags.DEFINE_list(
    "input", None, "Comma-separated input files / directories.", required=True
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Output directory (local, or gs://bucket/dir).", required=True
)
_FORMAT = flags.DEFINE_enum("format", "pretrain", list(prepare.FORMATS), "Record format.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", prepare.DEFAULT_SEQ_LEN, "pretrain: tokens per record.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Sentencepiece model (default: the shipped one)."
)
_TEXT_FIELD = flags.DEFINE_string(
    "text_field", "text", "pretrain JSONL: the field holding the text."
)
_DOC_SEPARATOR = flags.DEFINE_string(
    "doc_separator",
    "",
    "pretrain text files: split documents on this string, with Python "
    "escapes (e.g. '\\n\\n\\n'); empty: one document per file.",
)
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes (default: os.cpu_count()).")
_SHARD_MB = flags.DEFINE_float(
    "shard_mb", prepare.DEFAULT_SHARD_BYTES / (1 << 20), "Input MiB per work unit / output shard."
)
_VALIDATION = flags.DEFINE_float(
    "validation_fraction",
    0.0,
    "Share of documents held out (by a hash of their content) into OUTPUT_DIR/validation/ for "
    "the evaluation job.",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (tokens/s).")


def main(argv: list[str]) -> int:
    del argv
    separator = _DOC_SEPARATOR.value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    try:
        prepare.prepare(
            _INPUT.value,
            _OUTPUT_DIR.value,
            _FORMAT.value,
            seq_len=_SEQ_LEN.value,
            tokenizer_path=_TOKENIZER.value,
            text_field=_TEXT_FIELD.value,
            doc_separator=separator,
            workers=_WORKERS.value,
            shard_bytes=max(1, int(_SHARD_MB.value * (1 << 20))),
            validation_fraction=_VALIDATION.value,
            progress=_PROGRESS.value,
        )
    except (prepare.InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__)
    app.run(lambda argv: sys.exit(main(argv)))

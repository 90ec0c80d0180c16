"""Shards of prepared data: the plan of work units, and the worker that writes one shard.

Work units: consecutive files are grouped until about `shard_bytes` input bytes, and large
uncompressed files are cut into pieces of about `shard_bytes` at document boundaries. Each unit
becomes one shard `{format}-{index:05d}-of-{count:05d}.array_record` (plus a `.json` sidecar with
its spec and counts), written by a worker process to a temporary name and renamed when complete;
into a `gs://` directory (ArrayRecord cannot write to one) it is written to a local temporary
directory, then uploaded in one piece. Either way the shard is complete in place before its
sidecar is written, so a kill at any moment leaves shards a rerun skips or remakes.
The plan depends only on the inputs and options, and each unit is processed on its own, so the
output is byte-identical for any number of workers. A shard whose sidecar records the same unit
(input paths, sizes, mtimes, byte ranges), tokenizer fingerprint and options is complete.

Records (all little-endian int32, group_size:1 so reads are random access):
  * pretrain: exactly `seq_len` tokens. Inside a unit the documents are tokenized, each is
    followed by EOS, and the stream is cut into rows (concat-then-split); the ragged tail of
    each unit is dropped (counted in `dropped_tail_tokens`). Document boundaries are the EOS
    positions. A document longer than `TOKENIZE_CHARS` characters is tokenized in pieces of at
    most that many, each cut just before a space that follows a non-space (`text_pieces`), so
    the tokenizer's memory stays bounded whatever the length of a line.
  * sft: `[prompt_len, *prompt_ids, *response_ids]`, one record per assistant reply, built by
    `chat.format_turns`; the response ends with the end-of-turn id; no padding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from llada_jax import files
from llada_jax.data import chat
from llada_jax.data.inputs import (
    COMPRESSED_SUFFIXES,
    BadRecord,
    Piece,
    count_newlines,
    is_jsonl,
    jsonl_records,
    split_points,
    string_field,
    text_documents,
)
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer

PREPARE_VERSION = 1  # in every unit's spec: a new version remakes every shard
MAX_BAD_RECORDS_LISTED = 100
# Longest text handed to the tokenizer at once: tokenizing 50 MB in one call took 2.2 GB.
TOKENIZE_CHARS = 1 << 18
# The last space that follows a non-space, searched in a reversed window: a word boundary for
# sentencepiece (a word starts at its space) and for byte-level BPE pre-tokenizers alike.
_CUT_REVERSED = re.compile(r" \S")


class DataError(ValueError):
    """A prepared shard that no longer reads as prepare wrote it (missing, truncated, corrupted)."""


REPREPARE = (
    "re-run tools/prepare_data.py with the same inputs and options (it rewrites missing shards)"
)


def damaged(path: str, what: str) -> DataError:
    """The one-line error for shard `path` that is there but unreadable: what is wrong, the fix."""
    return DataError(
        f"data shard {path} {what}: the file is truncated or corrupted; delete it and {REPREPARE}"
    )


@dataclasses.dataclass(frozen=True)
class Options:
    """What, besides the inputs, decides the shards' content."""

    format: str
    tokenizer_path: str
    tokenizer_fingerprint: str
    seq_len: int
    text_field: str
    doc_separator: str
    split: str = "all"  # all | train | validation: the documents kept (`in_validation`)
    validation_fraction: float = 0.0  # share of documents held out for validation


def in_validation(document: Any, fraction: float) -> bool:
    """Whether a document (a text, or a dialogue's messages) belongs to the validation split.

    Decided by a hash of its content alone, so the split is the same for any sharding, worker
    count or input order, and a document repeated in the inputs is never on both sides.
    """
    content = document if isinstance(document, str) else json.dumps(document, sort_keys=True)
    digest = hashlib.sha256(content.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def keeps(document: Any, options: Options) -> bool:
    """Whether the split `options` writes holds `document`."""
    if options.split == "all":
        return True
    return in_validation(document, options.validation_fraction) == (options.split == "validation")


def unit_spec(pieces: Sequence[Piece], options: Options) -> dict[str, Any]:
    """The JSON identity of a unit: a shard with the same spec in its sidecar is up to date."""
    files = []
    for p in pieces:
        st = os.stat(p.path)
        files.append(
            {
                "path": os.path.abspath(p.path),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "start": p.start,
                "end": p.end,
            }
        )
    spec = {
        "version": PREPARE_VERSION,
        "pieces": files,
        "format": options.format,
        "tokenizer_fingerprint": options.tokenizer_fingerprint,
    }
    if options.format == "pretrain":
        spec["seq_len"] = options.seq_len
    if any(is_jsonl(p.path) for p in pieces):
        spec["text_field"] = options.text_field
    if not all(is_jsonl(p.path) for p in pieces):
        spec["doc_separator"] = options.doc_separator
    if options.split != "all":
        spec["split"] = options.split
        spec["validation_fraction"] = options.validation_fraction
    return spec


def plan_units(files: Sequence[str], options: Options, shard_bytes: int) -> list[list[Piece]]:
    """Groups consecutive files into units of about `shard_bytes`; splits big uncompressed
    files (JSONL, or text with a document separator) at document boundaries."""
    units: list[list[Piece]] = []
    current: list[Piece] = []
    current_bytes = 0
    for path in files:
        size = os.path.getsize(path)
        sep = b"\n" if is_jsonl(path) else options.doc_separator.encode("utf-8")
        splittable = sep and not path.endswith(COMPRESSED_SUFFIXES) and size > shard_bytes
        if splittable:
            bounds = [0] + split_points(path, sep, shard_bytes) + [size]
            pieces = [Piece(path, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            if len(pieces) == 1:
                pieces = [Piece(path)]
        else:
            pieces = [Piece(path)]
        for piece in pieces:
            piece_bytes = size if piece.end is None else piece.end - piece.start
            if current and current_bytes + piece_bytes > shard_bytes:
                units.append(current)
                current, current_bytes = [], 0
            current.append(piece)
            current_bytes += piece_bytes
    if current:
        units.append(current)
    return units


def shard_name(fmt: str, index: int, count: int) -> str:
    """File name of shard `index` of `count`."""
    return f"{fmt}-{index:05d}-of-{count:05d}.array_record"


SHARD_RE = re.compile(r"^(pretrain|sft)-\d{5}-of-\d{5}\.array_record(\.json)?(\.tmp-\d+)?$")


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: shard `index`, written to `out_path` from `pieces`."""

    index: int
    out_path: str
    pieces: list[Piece]
    options: Options
    spec: dict[str, Any]


_WORKER_TOKENIZER: Tokenizer | None = None


def init_worker(tokenizer_path: str) -> None:
    """Loads the tokenizer once per worker process (the pool's initializer)."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def write_shard(job: Job) -> dict[str, Any]:
    """Tokenizes one unit and writes its shard, then its sidecar; returns the sidecar's result.
    A shard for an object store is written to a local temporary directory, then uploaded."""
    if _WORKER_TOKENIZER is None:
        init_worker(job.options.tokenizer_path)
    t0 = time.perf_counter()
    if files.is_uri(job.out_path):
        staging = tempfile.mkdtemp(prefix="llada_prepare-")
        try:
            tmp = os.path.join(staging, "shard.array_record")
            shard, dropped, piece_newlines = _write_unit(job, tmp)
            shard_bytes = os.path.getsize(tmp)
            files.upload(tmp, job.out_path)  # the whole shard, before its sidecar
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        tmp = f"{job.out_path}.tmp-{os.getpid()}"
        shard, dropped, piece_newlines = _write_unit(job, tmp)
        os.replace(tmp, job.out_path)
        shard_bytes = os.path.getsize(job.out_path)
    result = {
        "num_documents": shard.num_documents,
        "num_records": shard.num_records,
        "num_tokens": shard.num_tokens,
        "dropped_tail_tokens": dropped,
        "bad_record_count": shard.bad_count,
        "bad_records": shard.bad,
        "piece_newlines": piece_newlines,
        "input_bytes": sum(
            (os.path.getsize(p.path) if p.end is None else p.end - p.start) for p in job.pieces
        ),
        "shard_bytes": shard_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
        "tokenized_tokens": shard.num_tokens + dropped,
    }
    write_json(job.out_path + ".json", {"spec": job.spec, "result": result})
    return result


def _write_unit(job: Job, tmp: str) -> tuple[_ShardWriter, int, list[int]]:
    """Writes the unit's records to the local file `tmp` (removed on failure); returns the
    closed writer, the tail tokens dropped and the lines of each byte-range piece."""
    shard = _ShardWriter(tmp, job.options.seq_len)
    piece_newlines: list[int] = []  # for byte-range pieces: the lines they hold
    try:
        for pi, piece in enumerate(job.pieces):
            _write_piece(shard, pi, piece, job.options, _WORKER_TOKENIZER)
            piece_newlines.append(count_newlines(piece) if piece.end is not None else 0)
        dropped = shard.flush(final=True) if job.options.format == "pretrain" else 0
        shard.close()
    except BaseException:
        shard.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return shard, dropped, piece_newlines


def _records(piece: Piece, options: Options) -> Iterator[tuple[int, Any]]:
    """(line, value or BadRecord) for the documents of a piece, as its format reads them."""
    if options.format == "sft":
        return jsonl_records(piece, chat.dialogue_messages)
    if is_jsonl(piece.path):
        return jsonl_records(piece, lambda obj: string_field(obj, options.text_field))
    return text_documents(piece, options.doc_separator)


def text_pieces(text: str, limit: int = TOKENIZE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` characters, each but the last cut just
    before a space that follows a non-space (at `limit` if its window has none)."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        # Reversed window text[start + 1 : end + 1]: a match at j is a space at end - j.
        found = _CUT_REVERSED.search(text[end:start:-1])
        cut = end - found.start() if found else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def document_tokens(tok: Tokenizer, text: str) -> Iterator[np.ndarray]:
    """The int32 tokens of a pretraining document, piece by piece (`text_pieces`), then EOS."""
    for piece in text_pieces(text):
        yield np.asarray(tok.encode(piece), "<i4")
    yield np.asarray([tok.eos_id], "<i4")


def _write_piece(
    shard: _ShardWriter, pi: int, piece: Piece, options: Options, tok: Tokenizer
) -> None:
    """Tokenizes the documents of piece `pi` of a unit into `shard`."""
    seen = 0
    for line, value in _records(piece, options):
        seen += 1
        if isinstance(value, BadRecord):
            if options.split != "validation":  # reported once, by the training split
                shard.bad_record(pi, line, str(value.args[0]))
            continue
        if not keeps(value, options):
            continue  # the other split's document
        if options.format == "sft":
            try:
                shard.add_pairs(chat.format_turns(tok, value))
            except BadRecord as e:
                shard.bad_record(pi, line, str(e.args[0]))
        else:
            shard.add_document(document_tokens(tok, value))
    if not seen and not is_jsonl(piece.path) and piece.start == 0 and piece.end is None:
        shard.bad_record(pi, 1, "empty text (no document in file)")


class _ShardWriter:
    """The records of one shard, and their counts. Pretraining documents are joined into one
    token stream and cut into rows of `seq_len`; SFT pairs are one record each."""

    def __init__(self, path: str, seq_len: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.writer = ArrayRecordWriter(path, "group_size:1")
        self.seq_len = seq_len
        self.num_documents = self.num_records = self.num_tokens = self.bad_count = 0
        self.bad: list[list[Any]] = []  # [piece index, line within piece, reason]
        self.pending: list[np.ndarray] = []  # the stream not yet cut into rows
        self.pending_len = 0

    def bad_record(self, pi: int, line: int, reason: str) -> None:
        """Counts a bad record (line `line` of piece `pi`, for `reason`); the first
        MAX_BAD_RECORDS_LISTED are listed."""
        self.bad_count += 1
        if len(self.bad) < MAX_BAD_RECORDS_LISTED:
            self.bad.append([pi, line, reason])

    def add_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> None:
        """Writes a conversation's (prompt, response) pairs, one record each: int32 [len(prompt),
        *prompt, *response]; the conversation counts as one document."""
        self.num_documents += 1
        for prompt, response in pairs:
            self.writer.write(np.asarray([len(prompt)] + prompt + response, "<i4").tobytes())
            self.num_records += 1
            self.num_tokens += len(prompt) + len(response)

    def add_document(self, pieces: Iterable[np.ndarray]) -> None:
        """Appends a document's tokens, given in pieces, writing whole rows as they fill up."""
        self.num_documents += 1
        for ids in pieces:
            self.pending.append(ids)
            self.pending_len += len(ids)
            if self.pending_len >= 8 * self.seq_len:
                self.flush(final=False)

    def flush(self, final: bool) -> int:
        """Writes the whole rows of the stream; returns the tokens left over."""
        if self.pending_len < self.seq_len and not final:
            return 0
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        rows = len(stream) // self.seq_len
        for r in range(rows):
            self.writer.write(stream[r * self.seq_len : (r + 1) * self.seq_len].tobytes())
        self.num_records += rows
        self.num_tokens += rows * self.seq_len
        rest = stream[rows * self.seq_len :]
        self.pending, self.pending_len = ([rest] if len(rest) else []), len(rest)
        return len(rest)

    def close(self) -> None:
        """Closes the shard's ArrayRecord file (a pretraining shard's stream flushed first)."""
        self.writer.close()


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON, replacing `path` in one step."""
    files.write_atomically(path, json.dumps(obj, indent=1) + "\n")


def recorded(out_path: str) -> dict[str, Any] | None:
    """The sidecar of the shard at `out_path` ({"spec", "result"}), or None if unreadable."""
    try:
        side = json.loads(files.read_text(out_path + ".json"))
        return side if isinstance(side, dict) and isinstance(side.get("result"), dict) else None
    except (OSError, ValueError):
        return None


def complete_result(out_path: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded result if the shard at `out_path` is complete and made from `spec`."""
    side = recorded(out_path)
    try:
        if side["spec"] == spec and files.size(out_path) == side["result"]["shard_bytes"]:
            return side["result"]
    except (OSError, KeyError, TypeError):
        pass
    return None


def read_shard(path: str) -> list[np.ndarray]:
    """All records of one shard as int32 arrays."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return [np.frombuffer(b, "<i4") for b in reader.read_all()]
    finally:
        reader.close()

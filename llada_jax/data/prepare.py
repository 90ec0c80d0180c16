"""Offline data preparation: text / JSONL inputs -> tokenized ArrayRecord shards + metadata.json.

Used by `tools/prepare_data.py` (the CLI) and `tools/train_tokenizer.py` (input reading).

Inputs (`expand_inputs`): files and directories (walked recursively in sorted order; hidden
files and directories are skipped). A name ending in `.jsonl` or `.json` (optionally followed
by `.gz` / `.xz`) is JSON lines, anything else is plain UTF-8 text (`.gz` / `.xz` decompressed).

Documents:
  * plain text: split on `doc_separator` (bytes-level `str.split` semantics; "" = one document
    per file, the default); whitespace-only pieces are skipped.
  * JSONL, format "pretrain": one document per line, the string field `text_field`.
  * JSONL, format "sft": one dialogue per line, either {"prompt": ..., "response": ...
    [, "system": ...]} or {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}.

Work units: consecutive files are grouped until about `shard_bytes` input bytes, and large
uncompressed files are cut into pieces of about `shard_bytes` at document boundaries. Each unit
becomes one shard `{format}-{index:05d}-of-{count:05d}.array_record` (plus a `.json` sidecar with
its counts), written by a worker process to a temporary name and renamed when complete. The
plan depends only on the inputs and options, and each unit is processed on its own, so the
output is byte-identical for any number of workers. On a rerun, a shard whose sidecar records
the same unit (input paths, sizes, mtimes, byte ranges), tokenizer fingerprint and options is
skipped.

Records (all little-endian int32, group_size:1 so reads are random access):
  * pretrain: exactly `seq_len` tokens. Inside a unit the documents are tokenized, each is
    followed by EOS, and the stream is cut into rows (concat-then-split); the ragged tail of
    each unit is dropped (counted in `dropped_tail_tokens`). Document boundaries are the EOS
    positions.
  * sft: `[prompt_len, *prompt_ids, *response_ids]`, one record per assistant reply, built by
    `format_turns`; the response ends with the end-of-turn id; no padding.

Bad records (invalid UTF-8, invalid JSON, a missing or non-string field, empty text, a
malformed dialogue) are counted and reported with file and line; they are not fatal. An input
that cannot be read at all raises `InputError` (the CLI prints "error: ..." and exits 2).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import lzma
import multiprocessing
import os
import random
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from llada_jax.data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer

PREPARE_VERSION = 1
CREATED_BY = f"llada_jax.data.prepare/{PREPARE_VERSION}"
METADATA_FILE = "metadata.json"
FORMATS = ("pretrain", "sft")
DEFAULT_SEQ_LEN = 2048
DEFAULT_SHARD_BYTES = 16 << 20
MAX_BAD_RECORDS_LISTED = 100
ROLE_HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}

_BLOCK = 1 << 20
_JSON_SUFFIXES = (".jsonl", ".json")
_COMPRESSED_SUFFIXES = (".gz", ".xz")


class InputError(Exception):
    """An input that cannot be read at all (fatal)."""


class BadRecord(ValueError):
    """A record that is skipped and reported (not fatal)."""


# --------------------------------------------------------------------------------------------
# Inputs.


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Paths -> the files to read: directories are walked recursively in sorted order.

    Raises:
      InputError: a path does not exist or is unreadable, or a directory holds no files.
    """
    files: list[str] = []
    for path in inputs:
        if not path:
            continue
        if not os.path.exists(path):
            raise InputError(f"input not found: {path}")
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
            found = [f for f in found if os.path.isfile(f)]
            if not found:
                raise InputError(f"input directory has no files: {path}")
            files += found
        else:
            files.append(path)
    if not files:
        raise InputError("no input files given")
    for f in files:
        if not os.access(f, os.R_OK):
            raise InputError(f"input not readable (permission denied): {f}")
    return files


def is_jsonl(path: str) -> bool:
    """True for *.jsonl / *.json, optionally compressed (.gz / .xz)."""
    name = path
    for suffix in _COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.endswith(_JSON_SUFFIXES)


def _open_binary(path: str) -> IO[bytes]:
    """Opens `path` for reading bytes, decompressing .gz / .xz."""
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.endswith(".xz"):
            return lzma.open(path, "rb")
        return open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot open input {path}: {e}") from e


def check_readable(path: str) -> None:
    """Opens `path` and reads its first block (catches corrupt .gz / .xz early)."""
    try:
        with _open_binary(path) as f:
            f.read(_BLOCK)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise InputError(f"cannot read input {path}: {e}") from e


def _split_stream(f: IO[bytes], sep: bytes, path: str) -> Iterator[tuple[bytes, int]]:
    """Yields (piece, newlines before it) of the stream split on `sep` (b"": the whole stream).

    Same result as `f.read().split(sep)`, without holding the whole stream in memory.
    """
    newlines = 0
    buf = b""
    try:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            buf += block
            if not sep:
                continue
            parts = buf.split(sep)
            buf = parts.pop()
            for part in parts:
                yield part, newlines
                newlines += part.count(b"\n") + sep.count(b"\n")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise InputError(f"cannot read input {path}: {e}") from e
    yield buf, newlines


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one input file (end None: to the end)."""

    path: str
    start: int = 0
    end: int | None = None


def _read_piece(piece: Piece) -> IO[bytes]:
    """A binary stream over the bytes of `piece`."""
    f = _open_binary(piece.path)
    if piece.start == 0 and piece.end is None:
        return f
    f.seek(piece.start)
    data = f.read(piece.end - piece.start)
    f.close()
    return io.BytesIO(data)


def _has_border(sep: bytes) -> bool:
    """True if a proper prefix of `sep` equals a suffix (occurrences can overlap)."""
    return any(sep[:k] == sep[-k:] for k in range(1, len(sep)))


def _split_points(path: str, sep: bytes, shard_bytes: int) -> list[int]:
    """Byte offsets (after a separator, as a left-to-right split finds them) cutting `path`
    into pieces of about `shard_bytes`."""
    size = os.path.getsize(path)
    points: list[int] = []
    with open(path, "rb") as f:
        if not _has_border(sep):
            target = shard_bytes
            while target < size:
                f.seek(target)
                data = b""
                pos = -1
                while pos < 0:
                    block = f.read(_BLOCK)
                    if not block:
                        break
                    data += block
                    pos = data.find(sep)
                if pos < 0:
                    break
                point = target + pos + len(sep)
                if point < size:
                    points.append(point)
                target = point + shard_bytes
        else:
            import mmap

            if size == 0:
                return points
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                pos, target = 0, shard_bytes
                while target < size:
                    p = mm.find(sep, pos)
                    if p < 0:
                        break
                    pos = p + len(sep)
                    if pos >= target and pos < size:
                        points.append(pos)
                        target = pos + shard_bytes
    return points


# --------------------------------------------------------------------------------------------
# Documents and chat formatting.


def format_turns(
    tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]
) -> list[tuple[list[int], list[int]]]:
    """A dialogue -> one (prompt_ids, response_ids) pair per assistant reply.

    Each message is {"role": "system" | "user" | "assistant", "content": str}. A turn is the
    role header (plain text, `ROLE_HEADERS`: "System:\\n", "User:\\n", "Assistant:\\n") encoded,
    then the content encoded, then the end-of-turn id. The prompt of the k-th assistant reply is
    every turn before it (a leading system message thus starts every prompt) followed by the
    "Assistant:\\n" header; its response is the reply's content ids followed by the eot id. No
    EOS or padding is added. Messages after the last assistant reply are ignored.

    Raises:
      BadRecord: a message is not an object, lacks role/content, has an unknown role or
        non-string / empty content, or there is no assistant reply.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRecord("'messages' is not a non-empty list")
    header_ids = {role: tokenizer.encode(h) for role, h in ROLE_HEADERS.items()}
    history: list[int] = []
    pairs: list[tuple[list[int], list[int]]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} is not an object")
        if "role" not in m or "content" not in m:
            raise BadRecord(f"message {i}: missing field 'role' or 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLE_HEADERS:
            raise BadRecord(f"message {i}: unknown role {role!r}")
        if not isinstance(content, str):
            raise BadRecord(f"message {i}: 'content' is not a string")
        if not content.strip():
            raise BadRecord(f"message {i}: empty text")
        content_ids = tokenizer.encode(content) + [tokenizer.eot_id]
        if role == "assistant":
            pairs.append((history + header_ids["assistant"], content_ids))
        history = history + header_ids[role] + content_ids
    if not pairs:
        raise BadRecord("dialogue has no assistant reply")
    return pairs


def dialogue_messages(obj: Any) -> list[dict[str, Any]]:
    """An SFT JSONL object -> its messages ({"messages": [...]} or {"prompt", "response"})."""
    if not isinstance(obj, dict):
        raise BadRecord("line is not a JSON object")
    if "messages" in obj:
        return obj["messages"]
    if "prompt" in obj and "response" in obj:
        messages = [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["response"]},
        ]
        if obj.get("system") is not None:
            messages.insert(0, {"role": "system", "content": obj["system"]})
        return messages
    raise BadRecord("missing field 'messages' or 'prompt'/'response'")


def _text_field(obj: Any, field: str) -> str:
    """obj[field], a non-empty string, or BadRecord."""
    if not isinstance(obj, dict):
        raise BadRecord("line is not a JSON object")
    if field not in obj:
        raise BadRecord(f"missing field {field!r}")
    text = obj[field]
    if not isinstance(text, str):
        raise BadRecord(f"field {field!r} is not a string")
    if not text.strip():
        raise BadRecord("empty text")
    return text


def _decode(raw: bytes) -> str:
    """Strict UTF-8 decode, or BadRecord giving the error's line offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"invalid UTF-8 (byte {e.start})", raw[: e.start].count(b"\n")) from None


def iter_records(
    piece: Piece, kind: str, doc_separator: str, text_field: str
) -> Iterator[tuple[int, Any]]:
    """Yields (line, value) for the records of `piece`; `line` is 1-based within the piece.

    kind "text": value is a document str (text files, split on `doc_separator`; whitespace-only
    pieces skipped). kind "json": value is the text field of a JSONL line. kind "sft": value is
    the message list of a JSONL line. kind "any_json" (tokenizer training): a list of the line's
    strings (the text field, else all message contents / prompt + response). A bad record
    yields (line, BadRecord) instead; blank JSONL lines are skipped.
    """
    jsonl = kind != "text"
    sep = b"\n" if jsonl else doc_separator.encode("utf-8")
    with _read_piece(piece) as f:
        for raw, newlines in _split_stream(f, sep, piece.path):
            line = newlines + 1
            if not jsonl:
                try:
                    text = _decode(raw)
                except BadRecord as e:
                    yield line + (e.args[1] if len(e.args) > 1 else 0), BadRecord(e.args[0])
                    continue
                if text.strip():
                    yield line, text
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(_decode(raw))
            except BadRecord as e:
                yield line, BadRecord(e.args[0])
                continue
            except json.JSONDecodeError as e:
                yield line, BadRecord(f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            try:
                if kind == "json":
                    yield line, _text_field(obj, text_field)
                elif kind == "sft":
                    yield line, dialogue_messages(obj)
                else:
                    yield line, _any_json_texts(obj, text_field)
            except BadRecord as e:
                yield line, e


def _any_json_texts(obj: Any, text_field: str) -> list[str]:
    """The strings of a pretraining or SFT JSONL object, for tokenizer training."""
    if isinstance(obj, dict) and text_field in obj:
        return [_text_field(obj, text_field)]
    messages = dialogue_messages(obj)
    if not isinstance(messages, list):
        raise BadRecord("'messages' is not a list")
    texts = [
        m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)
    ]
    if not texts:
        raise BadRecord("empty text")
    return texts


# --------------------------------------------------------------------------------------------
# Tokenizer training input.


def tokenizer_training_sentences(
    inputs: Sequence[str],
    text_field: str = "text",
    max_sentences: int = 0,
    seed: int = 0,
    stats: dict[str, int] | None = None,
) -> list[str]:
    """The non-empty lines of all documents of `inputs` (text files: their lines; JSONL: the
    lines of each line's text field, or of its messages / prompt and response), in input order.

    With `max_sentences` > 0, a uniform sample of at most that many lines is drawn with a
    seeded reservoir (algorithm R, `random.Random(seed)`) in one pass, and returned in input
    order, so memory stays bounded by `max_sentences` for any corpus size. Text files are read
    with universal newlines ("\\r\\n" -> "\\n"). `stats`, if given, receives "total_sentences",
    "sampled_sentences" and "bad_records".
    """
    rng = random.Random(seed)
    sample: list[tuple[int, str]] = []
    count = bad = 0

    def lines() -> Iterator[str]:
        nonlocal bad
        for path in expand_inputs(inputs):
            if is_jsonl(path):
                for _, value in iter_records(Piece(path), "any_json", "", text_field):
                    if isinstance(value, BadRecord):
                        bad += 1
                        continue
                    for text in value:
                        yield from (s for s in text.splitlines() if s.strip())
            else:
                opener = (
                    lzma.open
                    if path.endswith(".xz")
                    else gzip.open
                    if path.endswith(".gz")
                    else open
                )
                try:
                    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                        yield from (line.rstrip("\n") for line in f if line.strip())
                except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
                    raise InputError(f"cannot read input {path}: {e}") from e

    for line in lines():
        if max_sentences <= 0:
            sample.append((count, line))
        elif count < max_sentences:
            sample.append((count, line))
        else:
            j = rng.randrange(count + 1)
            if j < max_sentences:
                sample[j] = (count, line)
        count += 1
    sample.sort(key=lambda t: t[0])
    if stats is not None:
        stats.update(total_sentences=count, sampled_sentences=len(sample), bad_records=bad)
    return [s for _, s in sample]


# --------------------------------------------------------------------------------------------
# Planning.


@dataclasses.dataclass(frozen=True)
class Options:
    """What, besides the inputs, decides the shards' content."""

    format: str
    tokenizer_path: str
    tokenizer_fingerprint: str
    seq_len: int
    text_field: str
    doc_separator: str


def _unit_spec(pieces: Sequence[Piece], options: Options) -> dict[str, Any]:
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
        splittable = sep and not path.endswith(_COMPRESSED_SUFFIXES) and size > shard_bytes
        if splittable:
            bounds = [0] + _split_points(path, sep, shard_bytes) + [size]
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


_SHARD_RE = re.compile(r"^(pretrain|sft)-\d{5}-of-\d{5}\.array_record(\.json)?(\.tmp-\d+)?$")


# --------------------------------------------------------------------------------------------
# Workers.

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(tokenizer_path)


def _get_tokenizer(path: str) -> Tokenizer:
    if _WORKER_TOKENIZER is None:
        _init_worker(path)
    return _WORKER_TOKENIZER


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _process_unit(job: tuple[int, str, list[Piece], Options, dict[str, Any]]) -> dict[str, Any]:
    """Tokenizes one unit and writes its shard and sidecar; returns the sidecar's result."""
    from array_record.python.array_record_module import ArrayRecordWriter

    index, out_path, pieces, options, spec = job
    tok = _get_tokenizer(options.tokenizer_path)
    t0 = time.perf_counter()
    tmp = f"{out_path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    num_docs = num_records = num_tokens = bad_count = 0
    bad: list[list[Any]] = []  # [piece index, line within piece, reason]
    piece_newlines: list[int] = []  # for byte-range pieces: the lines they hold
    seq_len = options.seq_len
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush(final: bool) -> int:
        nonlocal pending, pending_len, num_records, num_tokens
        if pending_len < seq_len and not final:
            return 0
        stream = np.concatenate(pending) if pending else np.zeros(0, np.int32)
        rows = len(stream) // seq_len
        for r in range(rows):
            writer.write(stream[r * seq_len : (r + 1) * seq_len].tobytes())
        num_records += rows
        num_tokens += rows * seq_len
        rest = stream[rows * seq_len :]
        pending, pending_len = ([rest] if len(rest) else []), len(rest)
        return len(rest)

    try:
        for pi, piece in enumerate(pieces):
            kind = (
                "sft" if options.format == "sft" else ("json" if is_jsonl(piece.path) else "text")
            )
            seen = 0
            for line, value in iter_records(piece, kind, options.doc_separator, options.text_field):
                seen += 1
                if kind == "sft" and not isinstance(value, BadRecord):
                    try:
                        pairs = format_turns(tok, value)
                    except BadRecord as e:
                        value = e
                if isinstance(value, BadRecord):
                    bad_count += 1
                    if len(bad) < MAX_BAD_RECORDS_LISTED:
                        bad.append([pi, line, str(value.args[0])])
                    continue
                num_docs += 1
                if kind == "sft":
                    for prompt, response in pairs:
                        writer.write(np.asarray([len(prompt)] + prompt + response, "<i4").tobytes())
                        num_records += 1
                        num_tokens += len(prompt) + len(response)
                else:
                    ids = np.asarray(tok.encode(value) + [tok.eos_id], "<i4")
                    pending.append(ids)
                    pending_len += len(ids)
                    if pending_len >= 8 * seq_len:
                        flush(False)
            if not seen and kind == "text" and piece.start == 0 and piece.end is None:
                bad_count += 1
                if len(bad) < MAX_BAD_RECORDS_LISTED:
                    bad.append([pi, 1, "empty text (no document in file)"])
            piece_newlines.append(_count_newlines(piece) if piece.end is not None else 0)
        dropped = flush(True) if options.format == "pretrain" else 0
        writer.close()
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, out_path)
    result = {
        "num_documents": num_docs,
        "num_records": num_records,
        "num_tokens": num_tokens,
        "dropped_tail_tokens": dropped,
        "bad_record_count": bad_count,
        "bad_records": bad,
        "piece_newlines": piece_newlines,
        "input_bytes": sum(
            (os.path.getsize(p.path) if p.end is None else p.end - p.start) for p in pieces
        ),
        "shard_bytes": os.path.getsize(out_path),
        "seconds": round(time.perf_counter() - t0, 3),
        "tokenized_tokens": num_tokens + dropped,
    }
    _write_json_atomic(out_path + ".json", {"spec": spec, "result": result})
    return result


def _complete_result(out_path: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded result if the shard at `out_path` is complete and made from `spec`."""
    try:
        with open(out_path + ".json", encoding="utf-8") as f:
            side = json.load(f)
        if side.get("spec") == spec and os.path.getsize(out_path) == side["result"]["shard_bytes"]:
            return side["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# --------------------------------------------------------------------------------------------
# Driver.


def prepare(
    inputs: Sequence[str],
    output_dir: str,
    format: str = "pretrain",
    *,  # noqa: A002
    seq_len: int = DEFAULT_SEQ_LEN,
    tokenizer_path: str | None = None,
    text_field: str = "text",
    doc_separator: str = "",
    workers: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Prepares `inputs` into `output_dir` (see the module docstring); returns the metadata.

    The returned dict is what `metadata.json` holds plus two run statistics not written there:
    "_tokens_per_second" (tokens tokenized / wall time of this run's work) and "_shards_written"
    (shards made by this run; the others were complete and skipped). Progress goes to a tqdm
    bar (tokens/s) when `progress`; summary lines (and bad-record locations) go to `log`.

    Raises:
      InputError: an input cannot be read at all (nothing in `output_dir` is changed when this
        is found while planning, before any work).
      ValueError: bad options.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "pretrain" and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    tokenizer_path = os.path.abspath(tokenizer_path or DEFAULT_TOKENIZER_PATH)
    try:
        tok = Tokenizer(tokenizer_path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load tokenizer: {e}") from e
    workers = max(1, workers or os.cpu_count() or 1)

    files = expand_inputs(inputs)
    for path in files:
        if format == "sft" and not is_jsonl(path):
            raise InputError(f"format 'sft' needs JSONL inputs (*.jsonl / *.json), got {path}")
        check_readable(path)
    options = Options(
        format,
        tokenizer_path,
        tok.fingerprint,
        seq_len if format == "pretrain" else 0,
        text_field,
        doc_separator,
    )
    units = plan_units(files, options, shard_bytes)
    count = len(units)
    names = [shard_name(format, i, count) for i in range(count)]
    specs = [_unit_spec(u, options) for u in units]

    os.makedirs(output_dir, exist_ok=True)
    results: list[dict[str, Any] | None] = [
        _complete_result(os.path.join(output_dir, n), s) for n, s in zip(names, specs)
    ]
    todo = [i for i, r in enumerate(results) if r is None]
    skipped = count - len(todo)
    if skipped:
        log(f"skipped {skipped} complete shards")
    meta_path = os.path.join(output_dir, METADATA_FILE)
    if todo and os.path.exists(meta_path):
        os.remove(meta_path)  # it would describe shards about to change

    jobs = [(i, os.path.join(output_dir, names[i]), units[i], options, specs[i]) for i in todo]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=None, unit="tok", unit_scale=True, desc=f"{format} shards", dynamic_ncols=True
        )
        bar.set_postfix_str(f"{skipped}/{count} shards")
    t0 = time.perf_counter()
    done = skipped
    tokenized = 0
    if jobs:
        if workers == 1 or len(jobs) == 1:
            _init_worker(tokenizer_path)
            it = map(_process_unit, jobs)
            pool = None
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(
                min(workers, len(jobs)), initializer=_init_worker, initargs=(tokenizer_path,)
            )
            it = pool.imap(_process_unit, jobs, chunksize=1)
        try:
            for (i, *_), result in zip(jobs, it):
                results[i] = result
                done += 1
                tokenized += result["tokenized_tokens"]
                if bar is not None:
                    bar.update(result["tokenized_tokens"])
                    bar.set_postfix_str(f"{done}/{count} shards")
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    # Stale shards of an earlier plan (and leftover temporaries) go.
    keep = set(names) | {n + ".json" for n in names}
    for name in sorted(os.listdir(output_dir)):
        if _SHARD_RE.match(name) and name.startswith(format + "-") and name not in keep:
            os.remove(os.path.join(output_dir, name))

    # Bad-record locations with absolute line numbers.
    bad_list: list[dict[str, Any]] = []
    bad_total = 0
    lines_before: dict[str, int] = {}
    for unit, result in zip(units, results):
        offsets = []
        for piece, n in zip(unit, result["piece_newlines"]):
            offsets.append(lines_before.get(piece.path, 0))
            lines_before[piece.path] = offsets[-1] + n
        bad_total += result["bad_record_count"]
        for pi, line, reason in result["bad_records"]:
            if len(bad_list) < MAX_BAD_RECORDS_LISTED:
                bad_list.append(
                    {"file": unit[pi].path, "line": offsets[pi] + line, "reason": reason}
                )

    meta = {
        "format": format,
        "seq_len": seq_len if format == "pretrain" else None,
        "record_dtype": "<i4",
        "record_layout": (
            "seq_len tokens, documents joined with eos"
            if format == "pretrain"
            else "[prompt_len, *prompt_ids, *response_ids]"
        ),
        "tokenizer": {"path": tokenizer_path, "fingerprint": tok.fingerprint},
        "vocab_size": tok.vocab_size,
        "special_ids": {
            "pad": tok.pad_id,
            "eos": tok.eos_id,
            "mask": tok.mask_id,
            "eot": tok.eot_id,
        },
        "chat_format": {"role_headers": ROLE_HEADERS, "turn_end": "eot"}
        if format == "sft"
        else None,
        "text_field": text_field,
        "doc_separator": doc_separator,
        "num_documents": sum(r["num_documents"] for r in results),
        "num_tokens": sum(r["num_tokens"] for r in results),
        "num_records": sum(r["num_records"] for r in results),
        "dropped_tail_tokens": sum(r["dropped_tail_tokens"] for r in results),
        "bad_records": bad_total,
        "bad_record_locations": bad_list,
        "shards": [{"path": n, "num_records": r["num_records"]} for n, r in zip(names, results)],
        "inputs": [os.path.abspath(p) for p in inputs if p],
        "num_input_files": len(files),
        "created_by": CREATED_BY,
    }
    _write_json_atomic(meta_path, meta)
    rate = tokenized / seconds if seconds > 0 and tokenized else 0.0
    log(
        f"{format}: {meta['num_records']} records, {meta['num_tokens']} tokens, "
        f"{meta['num_documents']} documents in {count} shards ({len(jobs)} written, "
        f"{skipped} skipped); "
        f"{meta['dropped_tail_tokens']} tail tokens dropped; {rate:,.0f} tokens/s"
    )
    if bad_total:
        log(f"{bad_total} bad records (skipped):")
        for b in bad_list[:20]:
            log(f"  {b['file']}:{b['line']}: {b['reason']}")
        if bad_total > 20:
            log(
                f"  ... ({bad_total - 20} more; up to {MAX_BAD_RECORDS_LISTED} listed in "
                f"{meta_path})"
            )
    meta["_tokens_per_second"] = rate
    meta["_shards_written"] = len(jobs)
    return meta


def _count_newlines(piece: Piece) -> int:
    """Number of b"\\n" in the bytes of `piece` (only for byte-range pieces of plain files)."""
    n = 0
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        left = piece.end - piece.start
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def load_metadata(output_dir: str) -> dict[str, Any]:
    """Reads `output_dir/metadata.json`.

    Raises:
      FileNotFoundError: with a message saying how to make it.
    """
    path = os.path.join(output_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {METADATA_FILE} in {output_dir}: prepare the data with "
            "tools/prepare_data.py (an interrupted run leaves none; rerun it)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_shard(path: str) -> list[np.ndarray]:
    """All records of one shard as int32 arrays."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return [np.frombuffer(b, "<i4") for b in reader.read_all()]
    finally:
        reader.close()

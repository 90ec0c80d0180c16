"""Reading inputs: files and directories -> documents, each with its line number.

Inputs (`expand_inputs`): files and directories (walked recursively in sorted order; hidden
files and directories are skipped). A name ending in `.jsonl` or `.json` (optionally followed
by `.gz` / `.xz`) is JSON lines, anything else is plain UTF-8 text (`.gz` / `.xz` decompressed).
A `Piece` is a byte range of one file, so that a large file can be read in parts.

Documents: `text_documents` splits plain text on a separator; `jsonl_records` parses each JSON
line with a function that picks what the caller needs (a text field, a dialogue). A record that
cannot be used (invalid UTF-8 or JSON, a missing field) comes back as a `BadRecord` at its line,
to be counted and reported; an input that cannot be read at all raises `InputError`.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import lzma
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

T = TypeVar("T")

_BLOCK = 1 << 20
_JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".xz")


class InputError(Exception):
    """An input that cannot be read at all (fatal)."""


class BadRecord(ValueError):
    """A record that is skipped and reported (not fatal)."""


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Paths -> the files to read: directories are walked recursively in sorted order.

    Raises InputError when a path does not exist or is unreadable, or a directory holds no files.
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
    for suffix in COMPRESSED_SUFFIXES:
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

    Same result as `f.read().split(sep)`, holding about one piece (and a block) in memory, in
    time linear in the stream's length however long its pieces.
    """
    newlines = 0
    buf = bytearray()
    try:
        while block := f.read(_BLOCK):
            # `buf` holds no whole separator: one not found yet ends in the new block.
            search_from = max(0, len(buf) - len(sep) + 1)
            buf += block
            if not sep or buf.find(sep, search_from) < 0:
                continue  # the piece goes on: nothing to split (a long one is split once)
            parts = bytes(buf).split(sep)
            buf = bytearray(parts.pop())
            for part in parts:
                yield part, newlines
                newlines += part.count(b"\n") + sep.count(b"\n")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise InputError(f"cannot read input {path}: {e}") from e
    rest = bytes(buf)
    del buf  # the last piece is held once while it is used
    yield rest, newlines


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one input file (end None: to the end)."""

    path: str
    start: int = 0
    end: int | None = None


def read_piece(piece: Piece) -> IO[bytes]:
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


def split_points(path: str, sep: bytes, shard_bytes: int) -> list[int]:
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


def text_documents(piece: Piece, separator: str) -> Iterator[tuple[int, str | BadRecord]]:
    """(line, document) for the documents of a plain-text piece split on `separator` (bytes-level
    `str.split` semantics; "" = the whole piece is one document); whitespace-only ones are
    skipped. `line` is 1-based within the piece."""
    with read_piece(piece) as f:
        for raw, newlines in _split_stream(f, separator.encode("utf-8"), piece.path):
            try:
                text = _decode(raw)
            except BadRecord as e:
                yield newlines + 1 + e.args[1], BadRecord(e.args[0])
                continue
            if text.strip():
                yield newlines + 1, text


def jsonl_records(piece: Piece, parse: Callable[[Any], T]) -> Iterator[tuple[int, T | BadRecord]]:
    """(line, parse(object)) for the lines of a JSONL piece (blank lines skipped); a line that is
    not valid JSON, or that `parse` rejects with BadRecord, gives that BadRecord instead."""
    with read_piece(piece) as f:
        for raw, newlines in _split_stream(f, b"\n", piece.path):
            if not raw.strip():
                continue
            try:
                yield newlines + 1, parse(json.loads(_decode(raw)))
            except BadRecord as e:
                yield newlines + 1, BadRecord(e.args[0])
            except json.JSONDecodeError as e:
                yield newlines + 1, BadRecord(f"invalid JSON: {e.msg} (column {e.colno})")


def string_field(obj: Any, field: str) -> str:
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


def count_newlines(piece: Piece) -> int:
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

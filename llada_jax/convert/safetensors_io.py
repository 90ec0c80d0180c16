"""Reading and writing safetensors checkpoints one tensor at a time (no torch).

`TensorReader` opens a single `model.safetensors`, or a sharded checkpoint through its
`model.safetensors.index.json` weight map, and returns one numpy array per `get` (bfloat16 as
`ml_dtypes.bfloat16`, which safetensors' numpy API reads and writes natively). Shapes and dtypes
come from the headers without reading any data; each file is checked first (`check_file`), so a
truncated or corrupted one is a `ConvertError` naming it and what is wrong.

`write_sharded` writes tensors in the same layout Hugging Face's `save_pretrained` does (shards of
at most `max_shard_size` bytes plus an index file when there is more than one). Every header is
computed up front, so each tensor is produced by a callback and written at its offset on its own:
the memory held is one tensor, whatever the order the callbacks are called in.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_ST_NAMES = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
}
_ST_DTYPES = {v: k for k, v in _ST_NAMES.items()}


class ConvertError(ValueError):
    """A conversion input or option a user got wrong (reported as one `error:` line)."""


class TensorReader:
    """Tensor names, shapes and dtypes of an HF safetensors checkpoint; data one tensor at a
    time."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, "rb") as f:
                    contents = json.load(f)
            except ValueError as e:  # invalid UTF-8 or JSON
                raise ConvertError(f"{index} is not valid JSON ({e})") from None
            weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index} holds no weight_map")
            self.files = dict(weight_map)
        else:
            single = os.path.join(directory, SINGLE)
            if not os.path.isfile(single):
                raise ConvertError(f"{directory!r} holds neither {SINGLE} nor {INDEX}")
            self.files = None
        self._handles: dict[str, object] = {}
        self._info: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name in sorted(set(self.files.values())) if self.files else [SINGLE]:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConvertError(f"shard {path!r} named by {INDEX} does not exist")
            check_file(path)
            handle = self._open(name)
            for key in handle.keys():
                if self.files is not None and self.files.get(key) != name:
                    continue
                sl = handle.get_slice(key)
                dtype = sl.get_dtype()
                if dtype not in _ST_DTYPES:
                    raise ConvertError(
                        f"tensor {key!r} has dtype {dtype}; only F32, BF16 and F16 are supported"
                    )
                self._info[key] = (tuple(sl.get_shape()), _ST_DTYPES[dtype])
        if self.files is not None:
            missing = [k for k in self.files if k not in self._info]
            if missing:
                raise ConvertError(f"{INDEX} lists tensors its shards do not hold: {missing[:5]}")
        else:
            self.files = {k: SINGLE for k in self._info}

    def _open(self, name: str):
        if name not in self._handles:
            path = os.path.join(self.directory, name)
            try:
                self._handles[name] = safe_open(path, framework="numpy")
            except SafetensorError as e:
                raise ConvertError(f"{path} is not a valid safetensors file: {e}") from None
        return self._handles[name]

    def keys(self) -> list[str]:
        """The tensor names, file by file (files in sorted order)."""
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the header (no data read)."""
        return self._info[key][0]

    def dtype(self, key: str) -> np.dtype:
        """The tensor's numpy dtype (float32, bfloat16 or float16), from the header."""
        return self._info[key][1]

    def get(self, key: str) -> np.ndarray:
        """The tensor's data, read from its file (opened on first use)."""
        return self._open(self.files[key]).get_tensor(key)

    def close(self) -> None:
        """Drops the open file handles."""
        self._handles.clear()


def check_file(path: str) -> None:
    """Raises ConvertError, naming `path`, unless its header parses and every tensor's bytes lie
    within the file (safetensors' own errors name neither the file nor the tensor)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path} is truncated: it has {size} bytes, too few for a header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ConvertError(
                f"{path} is truncated or corrupted: its first 8 bytes announce a {length}-byte "
                f"header, but the file has {size} bytes"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise ConvertError(f"{path} is corrupted: its header is not JSON ({e})") from None
    offsets = _data_offsets(header)
    if not offsets:
        return  # no tensor to check: check_tensors says which are missing
    key = max(offsets, key=lambda k: offsets[k][1])
    start, end = (8 + length + o for o in offsets[key])
    if end > size:
        raise ConvertError(
            f"{path} is truncated: its header says tensor {key!r} spans bytes {start}..{end}, "
            f"but the file has {size} bytes"
        )


def _data_offsets(header: object) -> dict[str, tuple[int, int]]:
    """Tensor name -> (start, end) of its data, for the well-formed entries of a header."""
    out = {}
    for key, entry in header.items() if isinstance(header, dict) else ():
        span = entry.get("data_offsets") if isinstance(entry, dict) else None
        if isinstance(span, list) and len(span) == 2 and all(isinstance(o, int) for o in span):
            out[key] = (span[0], span[1])
    return out


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units, as Hugging Face's save_pretrained
    reads them)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ConvertError(f"--max_shard_size={text!r} is not a size such as 5GB or 500MB")
    unit = m.group(2).rstrip("B") or ""
    scale = {
        "": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ConvertError(f"--max_shard_size={text!r} must be positive")
    return size


def plan_shards(
    tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_size: int
) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Greedy, in order: a shard closes when the next tensor would take it over the limit."""
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_sharded(
    directory: str,
    tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    produce: Iterable[str],
    get: Callable[[str], Iterable[tuple[str, np.ndarray]]],
    max_shard_size: int,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes `tensors` (name, shape, dtype; in file order) into `directory`.

    `produce` lists the groups to ask `get` for; `get(group)` yields (name, array) pairs in any
    order (e.g. every layer of one stacked parameter). Returns the written file names.
    """
    shards = plan_shards(tensors, max_shard_size)
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    where: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}  # name -> file, offset
    files = []
    total = 0
    for i, (fname, shard) in enumerate(zip(names, shards)):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for key, shape, dtype in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[key] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        start = 8 + len(text)
        for key, shape, dtype in shard:
            where[key] = (i, start + header[key]["data_offsets"][0], shape, dtype)
        f = open(os.path.join(directory, fname), "wb")
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(start + offset)
        files.append(f)
        total += offset
    written = set()
    try:
        for group in produce:
            for key, array in get(group):
                i, pos, shape, dtype = where[key]
                if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                    raise AssertionError(
                        f"{key}: produced {array.shape} {array.dtype}, planned {shape} {dtype}"
                    )
                files[i].seek(pos)
                files[i].write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                written.add(key)
    finally:
        for f in files:
            f.close()
    if written != set(where):
        raise AssertionError(f"tensors never produced: {sorted(set(where) - written)[:5]}")
    if n > 1:
        weight_map = {key: names[where[key][0]] for key, _, _ in tensors}
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
    return names

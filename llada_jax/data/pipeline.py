"""Token batches through grain: random access by step, independent of topology.

Prepared data (tools/prepare_data.py) is already cut into fixed-length rows (concat-then-split,
documents joined with EOS, the LLaDA way). Each dataset is shuffled with a new permutation every
epoch and the datasets are interleaved by weight; that infinite stream of rows, cut into global
batches, makes the global batch at step s a pure function of (seed, s, data config). Each process
reads only the rows of every global batch that its devices hold (from the batch sharding: two
processes that differ only along the `tensor` axis read the same ones), so a run resumes exactly
at any step, on any number of processes or grain workers.

SFT batches are built the same way from prepared single-turn pairs: global step s takes the
pairs [s * W, (s + 1) * W) of the mixed stream (W = batch * pairs_per_row), pads them with EOS
one per row, or packs them (pairs_per_row > 1), to exactly `batch` rows.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import os
import re
import threading
from typing import Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from llada_jax import files, sharding
from llada_jax.data import sft, shards

ENDLESS = 2**62  # length of the row index space of an infinite stream


@dataclasses.dataclass(frozen=True)
class RowSource:
    """One dataset: a random-access MapDataset of int32 records, and its mixture weight.

    Pretraining records are (seq_len,) rows; SFT records are [prompt_len, *prompt, *response].
    """

    name: str
    rows: grain.MapDataset
    weight: float


def decode_record(record: bytes) -> np.ndarray:
    """An ArrayRecord record (little-endian int32 bytes) -> int32 array."""
    return np.frombuffer(record, "<i4").astype(np.int32)


def array_records(
    paths: Sequence[str],
    counts: Sequence[int] | None = None,
    sizes: Sequence[int | None] | None = None,
) -> grain.MapDataset:
    """The int32 records of ArrayRecord shards, in shard order. With their record `counts` (and
    sizes in bytes) from metadata.json, no shard is opened before one of its records is read."""
    return grain.MapDataset.source(ShardRecords(paths, counts, sizes)).map(decode_record)


class ShardRecords:
    """The records of prepared ArrayRecord shards in shard order (a grain data source), local or
    on an object store (the ArrayRecord reader opens `gs://` itself).

    Given each shard's record count (metadata.json's), the length needs no shard: a shard is
    opened when one of its records is first read (in each process), and its size and record
    count are checked then against those recorded when it was written (`sizes`, else its
    sidecar's). Without `counts` every shard is opened now, to count its records. A shard that is
    missing, truncated or corrupted raises `shards.DataError` naming it (and the record), when
    opened or when read, instead of Riegeli's RuntimeError."""

    def __init__(
        self,
        paths: Sequence[str],
        counts: Sequence[int] | None = None,
        sizes: Sequence[int | None] | None = None,
    ):
        self.paths = list(paths)
        self._sizes = list(sizes) if sizes is not None else [None] * len(self.paths)
        self._sources: list[grain.sources.ArrayRecordDataSource | None] = [None] * len(self.paths)
        if counts is None:
            self._sources = [_open_shard(p, None, b) for p, b in zip(self.paths, self._sizes)]
            counts = [len(s) for s in self._sources]
        self._counts = list(counts)
        self._ends = list(itertools.accumulate(self._counts))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> bytes:
        i = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[i - 1] if i else 0)
        source = self._source(i)
        try:
            return source[position]
        except RuntimeError as e:
            raise shards.damaged(
                self.paths[i], f"record {position} cannot be read ({_reason(e)})"
            ) from None

    def _source(self, i: int) -> grain.sources.ArrayRecordDataSource:
        """Shard i's reader, opened and checked on first use (once, whatever the threads)."""
        source = self._sources[i]
        if source is None:
            with self._lock:
                source = self._sources[i]
                if source is None:
                    source = _open_shard(self.paths[i], self._counts[i], self._sizes[i])
                    self._sources[i] = source
        return source

    def __getstate__(self) -> dict:
        """Pickled for grain's worker processes without open readers (each opens its own)."""
        state = dict(self.__dict__)
        state["_sources"] = [None] * len(self.paths)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _open_shard(
    path: str, num_records: int | None = None, shard_bytes: int | None = None
) -> grain.sources.ArrayRecordDataSource:
    """One shard's records, its size and count checked against those recorded when it was
    written: `num_records` and `shard_bytes` (metadata.json's) where given, else its sidecar's."""
    missing = shards.DataError(f"data shard {path} is missing: {shards.REPREPARE}")
    if not files.is_uri(path) and not os.path.isfile(path):
        raise missing
    try:
        size = files.size(path)
    except FileNotFoundError:
        raise missing from None
    if shard_bytes is None or num_records is None:
        side = shards.recorded(path)
        written = side["result"] if side else {}
        shard_bytes = written.get("shard_bytes") if shard_bytes is None else shard_bytes
        num_records = written.get("num_records") if num_records is None else num_records
    if shard_bytes is not None and shard_bytes != size:
        raise shards.damaged(path, f"has {size} bytes, {shard_bytes} when written")
    try:
        source = grain.sources.ArrayRecordDataSource([path])
    except RuntimeError as e:
        raise shards.damaged(path, f"cannot be opened ({_reason(e)})") from None
    if num_records is not None and num_records != len(source):
        raise shards.damaged(path, f"holds {len(source)} records, {num_records} when written")
    return source


def _reason(e: Exception) -> str:
    """A reader's error message up to its details (Riegeli's run to hashes and offsets)."""
    return re.split(r" \(|; |\n", str(e).strip())[0] or type(e).__name__


def mixed_rows(sources: Sequence[RowSource], seed: int) -> grain.MapDataset:
    """Infinite stream of rows: each source reshuffled every epoch, interleaved by weight."""
    # shuffle before repeat: grain then draws a new permutation for every epoch.
    streams = [s.rows.shuffle(seed=seed + i).repeat(None) for i, s in enumerate(sources)]
    if len(streams) == 1:
        return streams[0]
    return grain.MapDataset.mix(streams, [s.weight for s in sources])


class _GlobalRow:
    """Local row k of one process -> the matching row of the global stream (picklable)."""

    def __init__(self, stream: grain.MapDataset, global_batch: int, rows: np.ndarray):
        self.stream, self.global_batch, self.rows = stream, global_batch, rows

    def __call__(self, k: int) -> np.ndarray:
        step, j = divmod(k, len(self.rows))
        return self.stream[step * self.global_batch + int(self.rows[j])]


def check_vocab(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Returns tokens; raises if an id is outside [0, vocab_size)."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        raise ValueError(
            f"token id {int(tokens[bad][0])} is outside the model's vocabulary "
            f"[0, {vocab_size}): the data was prepared with another tokenizer"
        )
    return tokens


class _ToBatch:
    """Stacked rows -> the batch dict; checks token ids against the vocabulary."""

    def __init__(self, vocab_size: int, eos_id: int, segment_ids: bool):
        self.vocab_size, self.eos_id, self.segment_ids = vocab_size, eos_id, segment_ids

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        tokens = check_vocab(np.asarray(rows, np.int32), self.vocab_size)
        batch = {"tokens": tokens}
        if self.segment_ids:
            batch["segment_ids"] = document_ids(tokens, self.eos_id)
        return batch


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """(B, L) segment ids from EOS positions: 1 + number of EOS strictly before each position."""
    is_eos = (tokens == eos_id).astype(np.int32)
    return (1 + np.cumsum(is_eos, axis=1) - is_eos).astype(np.int32)


def process_rows(mesh: Mesh, global_batch: int, process_index: int | None = None) -> np.ndarray:
    """The global rows (sorted indices) that a process's devices hold under the batch sharding
    (default: this process). Processes whose devices differ only along a mesh axis that does
    not split the batch (e.g. `tensor` across hosts) hold, and so read, the same rows."""
    index = jax.process_index() if process_index is None else process_index
    held = sharding.batch_sharding(mesh).devices_indices_map((global_batch,))
    rows = {
        r
        for device, (span, *_) in held.items()
        if device.process_index == index
        for r in range(*span.indices(global_batch))
    }
    return np.array(sorted(rows), np.int64)


def local_batches(
    stream: grain.MapDataset,
    global_batch: int,
    vocab_size: int,
    eos_id: int,
    segment_ids: bool = False,
    rows: np.ndarray | None = None,
) -> grain.MapDataset:
    """Element s: the given rows (sorted global indices, default all: `process_rows` gives a
    process's) of the global batch of step s, as a batch dict."""
    rows = np.arange(global_batch) if rows is None else np.asarray(rows)
    return (
        grain.MapDataset.range(0, ENDLESS)
        .map(_GlobalRow(stream, global_batch, rows))
        .batch(len(rows))
        .map(_ToBatch(vocab_size, eos_id, segment_ids))
    )


class _SFTStep:
    """Global step s -> this process's rows of the SFT batch of that step (picklable)."""

    def __init__(
        self,
        stream: grain.MapDataset,
        global_batch: int,
        pairs_per_row: int,
        seq_len: int,
        eos_id: int,
        overflow: str,
        vocab_size: int,
        rows: np.ndarray,
    ):
        self.stream, self.global_batch, self.pairs_per_row = stream, global_batch, pairs_per_row
        self.seq_len, self.eos_id, self.overflow = seq_len, eos_id, overflow
        self.vocab_size, self.rows = vocab_size, rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        window = self.global_batch * self.pairs_per_row
        records = [self.stream[step * window + i] for i in range(window)]
        batch, stats = sft.fixed_batch(
            records,
            self.global_batch,
            self.seq_len,
            self.eos_id,
            self.overflow,
            pack=self.pairs_per_row > 1,
        )
        check_vocab(batch["tokens"], self.vocab_size)
        # The step's counts ride in row 0 of (B,) arrays, so they survive the per-process split
        # and the train step's sum over the global batch recovers them.
        for key, count in (
            ("sft_dropped", stats["dropped"] + stats["unplaced"]),
            ("sft_truncated", stats["truncated"]),
        ):
            batch[key] = np.zeros(self.global_batch, np.int32)
            batch[key][0] = count
        return {k: v[self.rows] for k, v in batch.items()}


def sft_local_batches(
    stream: grain.MapDataset,
    global_batch: int,
    seq_len: int,
    eos_id: int,
    vocab_size: int,
    overflow: str = "truncate",
    pairs_per_row: int = 1,
    rows: np.ndarray | None = None,
) -> grain.MapDataset:
    """Element s: the given rows (sorted global indices, default all) of the SFT batch of step
    s: tokens, prompt_mask,
    segment_ids, valid, each (local_batch, seq_len), and sft_dropped / sft_truncated (local_batch,)
    whose global sums count the step's pairs dropped (too long, or not placed when packing) and
    truncated."""
    if pairs_per_row < 1:
        raise ValueError(f"pairs_per_row={pairs_per_row} must be >= 1")
    rows = np.arange(global_batch) if rows is None else np.asarray(rows)
    return grain.MapDataset.range(0, ENDLESS).map(
        _SFTStep(stream, global_batch, pairs_per_row, seq_len, eos_id, overflow, vocab_size, rows)
    )


def iterate(
    batches: grain.MapDataset, start_step: int, workers: int = 0, prefetch: int = 4
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of steps start_step, start_step + 1, ...: threads, or worker processes."""
    ds = batches[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, min(prefetch, 8)), prefetch_buffer_size=prefetch)
    )
    if workers > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        )
    return iter(ds)


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict[str, jax.Array]:
    """This process's rows (`process_rows`, in order) -> global jax arrays sharded over the
    data-parallel axes: each of its devices gets its span of them."""
    spec = sharding.batch_sharding(mesh)
    rows = _process_rows(mesh, global_batch)

    def global_array(local: np.ndarray) -> jax.Array:
        """This process's rows (n, ...) of one batch array -> the global (global_batch, ...)
        jax.Array, sharded as `spec`."""

        def span(index: tuple[slice, ...]) -> np.ndarray:
            """The rows of `local` that a device's shard (global rows `index[0]`) holds."""
            start, stop, _ = index[0].indices(global_batch)
            at = int(np.searchsorted(rows, start))  # a device's span is contiguous in `rows`
            return local[at : at + stop - start]

        return jax.make_array_from_callback((global_batch,) + local.shape[1:], spec, span)

    return {k: global_array(v) for k, v in batch.items()}


@functools.lru_cache(maxsize=8)
def _process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    return process_rows(mesh, global_batch)


def describe(sources: Sequence[RowSource]) -> str:
    """One line: dataset names, weights and sizes."""
    total = sum(s.weight for s in sources)
    return ", ".join(f"{s.name} ({len(s.rows)} rows, {s.weight / total:.0%})" for s in sources)

"""Token batches for pretraining, through grain, random access by step.

The token stream is cut into fixed-length rows once (concat-then-split, documents joined with
EOS, the LLaDA way). The global batch at step s is a pure function of (seed, s): rows are
shuffled with a new order every epoch by grain's index shuffle, and each process reads only its
slice of the global batch. Resuming at step s is just indexing from s.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from llada_jax import sharding
from llada_jax.data.corpus import DEFAULT_CORPUS_PATH, read_default_corpus
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.metrics import CACHE_DIR

BOOK_SEPARATOR = "\n\n\n"


def default_corpus_tokens(tokenizer: Tokenizer) -> np.ndarray:
    """The shipped corpus as one int32 stream, each book followed by EOS; cached on disk."""
    with open(DEFAULT_CORPUS_PATH, "rb") as f:
        corpus_hash = hashlib.sha256(f.read()).hexdigest()[:16]
    path = os.path.join(CACHE_DIR, f"tokens-{corpus_hash}-{tokenizer.fingerprint}.npy")
    if os.path.exists(path):
        return np.load(path)
    docs = [d for d in read_default_corpus().split(BOOK_SEPARATOR) if d.strip()]
    tokens = np.concatenate([np.asarray(ids + [tokenizer.eos_id], np.int32)
                             for ids in tokenizer.encode_batch(docs)])
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, tokens)
    os.replace(tmp, path)
    return tokens


def pack_rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """(N,) stream -> (N // seq_len, seq_len) rows; the ragged tail is dropped."""
    rows = len(tokens) // seq_len
    if rows == 0:
        raise ValueError(f"data.seq_len={seq_len} is longer than the whole corpus ({len(tokens)} tokens)")
    return tokens[: rows * seq_len].reshape(rows, seq_len)


def pretrain_batches(rows: np.ndarray, global_batch: int, seed: int) -> grain.MapDataset:
    """Infinite MapDataset: element s is the global batch of step s, {"tokens": (B, L) int32}."""
    # shuffle before repeat: grain then draws a new permutation for every epoch.
    return (grain.MapDataset.source(rows)
            .shuffle(seed=seed)
            .repeat(None)
            .batch(global_batch, drop_remainder=True)
            .map(lambda b: {"tokens": np.asarray(b, np.int32)}))


def process_slice(global_batch: int, index: int | None = None, count: int | None = None) -> slice:
    """Rows of the global batch that this process reads."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


def local_iterator(ds: grain.MapDataset, start_step: int, global_batch: int,
                   prefetch: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the batches of steps start_step, start_step + 1, ..."""
    rows = process_slice(global_batch)
    local = ds[start_step:].map(lambda b: {k: v[rows] for k, v in b.items()})
    options = grain.ReadOptions(num_threads=max(1, min(prefetch, 4)), prefetch_buffer_size=prefetch)
    return iter(local.to_iter_dataset(options))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict[str, jax.Array]:
    """Per-process numpy rows -> global jax arrays sharded over the data-parallel axes."""
    spec = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(spec, v, (global_batch,) + v.shape[1:])
            for k, v in batch.items()}

"""The datasets a run reads: prepared directories from the config, or the shipped corpus.

`data.datasets` is a tuple of (prepared_dir, weight) pairs; empty means the shipped KJV corpus,
prepared once into the cache with the run's tokenizer and sequence length, a few books held out.
The held-out split of a prepared directory is its `validation/` subdirectory. Every dataset is
checked against the run before training starts: format, sequence length, tokenizer fingerprint
and vocabulary size.

A prepared directory may be a `gs://` URI (the `gcs` extra). Opening a dataset reads its
metadata.json only: the shards' record counts and sizes come from there, and each shard is opened
(and checked against them) when a record of it is first read, so a host of a pod run lists and
opens nothing but the metadata at start.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils

from llada_jax import files
from llada_jax.data import pipeline, prepare
from llada_jax.data.corpus import DEFAULT_CORPUS_PATH
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.host.cache import cache_dir

SHIPPED_CORPUS_SEPARATOR = "\n\n\n"  # between books: one document per book
# Held out from training for evaluation: the books whose content hash falls below it (Habakkuk,
# Romans and 1 John: about 2% of the text).
SHIPPED_VALIDATION_FRACTION = 0.08


def shipped_corpus_dir(tokenizer: Tokenizer, seq_len: int) -> str:
    """The shipped corpus prepared for this tokenizer and length (made on first use, cached)."""
    with open(DEFAULT_CORPUS_PATH, "rb") as f:
        corpus = hashlib.sha256(f.read()).hexdigest()[:12]
    name = f"kjv-{corpus}-{tokenizer.fingerprint}-L{seq_len}-v{SHIPPED_VALIDATION_FRACTION}"
    out = os.path.join(cache_dir(), "prepared", name)
    # One process prepares; the others wait (they may share the cache directory).
    if jax.process_index() == 0 and not os.path.isfile(os.path.join(out, prepare.METADATA_FILE)):
        prepare.prepare(
            [DEFAULT_CORPUS_PATH],
            out,
            "pretrain",
            seq_len=seq_len,
            tokenizer_path=tokenizer.path,
            doc_separator=SHIPPED_CORPUS_SEPARATOR,
            validation_fraction=SHIPPED_VALIDATION_FRACTION,
            workers=1,
            progress=False,
            log=lambda *_: None,
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("shipped corpus prepared")
    return out


def check_metadata(
    name: str,
    meta: dict[str, Any],
    fmt: str,
    seq_len: int | None,
    tokenizer: Tokenizer,
    vocab_size: int,
) -> None:
    """Refuses a dataset that does not fit the run, with one line naming both values."""
    if meta["format"] != fmt:
        raise ValueError(f"dataset {name!r} has format {meta['format']!r}; this run needs {fmt!r}")
    if seq_len is not None and meta["seq_len"] != seq_len:
        raise ValueError(
            f"dataset {name!r} was prepared with seq_len={meta['seq_len']}, but "
            f"data.seq_len={seq_len}: prepare it again with --seq_len={seq_len}"
        )
    fingerprint = meta["tokenizer"]["fingerprint"]
    if fingerprint != tokenizer.fingerprint:
        raise ValueError(
            f"dataset {name!r} was tokenized with tokenizer {fingerprint} "
            f"({meta['tokenizer']['path']}), but this run uses {tokenizer.fingerprint} "
            f"({tokenizer.path})"
        )
    if meta["vocab_size"] > vocab_size:
        raise ValueError(
            f"dataset {name!r} has vocabulary size {meta['vocab_size']} > "
            f"model.vocab_size={vocab_size}"
        )
    if meta["num_records"] == 0:
        raise ValueError(f"dataset {name!r} holds no records")


def open_sources(
    datasets: Sequence[tuple[str, float]],
    fmt: str,
    seq_len: int | None,
    tokenizer: Tokenizer,
    vocab_size: int,
) -> list[pipeline.RowSource]:
    """Checked row sources for the configured (dir, weight) pairs."""
    sources = []
    for entry in datasets:
        if len(entry) != 2 or float(entry[1]) <= 0:
            raise ValueError(
                f"data.datasets entry {entry!r} must be a (prepared_dir, weight > 0) pair"
            )
        path, weight = entry
        meta = prepare.load_metadata(path)  # first, a gs:// path without the gcs extra: one line
        check_metadata(path, meta, fmt, seq_len, tokenizer, vocab_size)
        listed = meta["shards"]
        rows = pipeline.array_records(
            [files.join(path, s["path"]) for s in listed],
            counts=[s["num_records"] for s in listed],
            sizes=[s.get("shard_bytes") for s in listed],  # absent in older metadata
        )
        sources.append(pipeline.RowSource(path, rows, float(weight)))
    return sources


def pretrain_sources(data: Any, tokenizer: Tokenizer, vocab_size: int) -> list[pipeline.RowSource]:
    """The `data` config section's pretraining datasets (the shipped corpus when none)."""
    datasets = tuple(data.datasets) or ((shipped_corpus_dir(tokenizer, data.seq_len), 1.0),)
    return open_sources(datasets, "pretrain", data.seq_len, tokenizer, vocab_size)


def validation_sources(
    data: Any, tokenizer: Tokenizer, vocab_size: int
) -> list[pipeline.RowSource]:
    """The held-out splits of the `data` section's pretraining datasets, as rows of its
    seq_len. A dataset prepared without one is one error line saying how to make it."""
    datasets = tuple(data.datasets) or ((shipped_corpus_dir(tokenizer, data.seq_len), 1.0),)
    held_out = []
    for path, weight in datasets:
        files.check_uri(str(path))
        split = files.join(path, prepare.VALIDATION_DIR)
        if not files.isfile(files.join(split, prepare.METADATA_FILE)):
            raise ValueError(
                f"dataset {path!r} has no held-out split: prepare it with "
                "tools/prepare_data.py --validation_fraction=0.01 (or pass the data to evaluate)"
            )
        held_out.append((split, weight))
    return open_sources(held_out, "pretrain", data.seq_len, tokenizer, vocab_size)

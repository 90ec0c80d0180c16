"""Batches from prepared shards: determinism, exact resume, per-process slices, mixtures, SFT."""

import json
import os

import grain
import numpy as np
import pytest
from absl import flags

from llada_jax.data import datasets, pipeline, prepare, shards
from llada_jax.data.tokenizer import default_tokenizer

SEQ = 16


def write_docs(path, n_docs, seed):
    rng = np.random.default_rng(seed)
    words = ["light", "day", "earth", "water", "said", "God", "and", "the", "of", "made"]
    os.makedirs(path, exist_ok=True)
    for i in range(n_docs):
        with open(os.path.join(path, f"doc{i:03d}.txt"), "w") as f:
            f.write(" ".join(rng.choice(words, size=int(rng.integers(10, 60)))))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two pretraining datasets and one SFT dataset, prepared with the shipped tokenizer."""
    root = tmp_path_factory.mktemp("data")
    dirs = {}
    for name, n_docs, seed in (("a", 40, 0), ("b", 15, 1)):
        write_docs(root / f"{name}_txt", n_docs, seed)
        dirs[name] = str(root / name)
        prepare.prepare(
            [str(root / f"{name}_txt")],
            dirs[name],
            "pretrain",
            seq_len=SEQ,
            workers=1,
            progress=False,
            log=lambda *_: None,
        )
    with open(root / "chat.jsonl", "w") as f:
        for i in range(30):
            f.write(
                json.dumps(
                    {"prompt": f"Question {i}?" * (1 + i % 3), "response": "Answer " * (1 + i % 5)}
                )
                + "\n"
            )
    dirs["sft"] = str(root / "sft")
    prepare.prepare(
        [str(root / "chat.jsonl")],
        dirs["sft"],
        "sft",
        workers=1,
        progress=False,
        log=lambda *_: None,
    )
    return dirs


def sources(prepared, names_weights, seq_len=SEQ):
    pairs = tuple((prepared[n], w) for n, w in names_weights)
    return datasets.open_sources(pairs, "pretrain", seq_len, default_tokenizer(), 4096)


def contiguous(global_batch, index, count):
    """Process `index` of `count`'s rows on a data-parallel mesh: its contiguous share."""
    per = global_batch // count
    return np.arange(index * per, (index + 1) * per)


def global_batches(prepared, names_weights, steps, batch=8, seed=0, processes=1, start=0):
    """Global batches of `steps`, assembled from every process's local rows."""
    stream = pipeline.mixed_rows(sources(prepared, names_weights), seed)
    per_process = [
        pipeline.local_batches(
            stream,
            batch,
            4096,
            default_tokenizer().eos_id,
            rows=contiguous(batch, p, processes),
        )
        for p in range(processes)
    ]
    return [np.concatenate([ds[s]["tokens"] for ds in per_process]) for s in range(start, steps)]


def test_rows_are_the_prepared_rows_and_epochs_reshuffle(prepared):
    meta = prepare.load_metadata(prepared["a"])
    rows = np.stack(
        [
            r
            for s in meta["shards"]
            for r in shards.read_shard(os.path.join(prepared["a"], s["path"]))
        ]
    )
    n = len(rows)
    stream = pipeline.mixed_rows(sources(prepared, [("a", 1.0)]), seed=3)
    epoch1 = np.stack([stream[i] for i in range(n)])
    epoch2 = np.stack([stream[i] for i in range(n, 2 * n)])
    key = lambda a: sorted(map(tuple, a.tolist()))
    assert key(epoch1) == key(rows) == key(epoch2)  # each epoch is a permutation of all rows
    assert not np.array_equal(epoch1, epoch2)


def test_batch_is_a_function_of_seed_and_step(prepared):
    one = global_batches(prepared, [("a", 1.0)], 6)
    again = global_batches(prepared, [("a", 1.0)], 6)
    other_seed = global_batches(prepared, [("a", 1.0)], 6, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(one, again))
    assert not all(np.array_equal(x, y) for x, y in zip(one, other_seed))


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_process_slices_cover_the_same_global_batch(prepared, processes):
    """Any process count reads disjoint rows that assemble into the 1-process global batch."""
    single = global_batches(prepared, [("a", 1.0), ("b", 1.0)], 4)
    multi = global_batches(prepared, [("a", 1.0), ("b", 1.0)], 4, processes=processes)
    assert all(np.array_equal(x, y) for x, y in zip(single, multi))


def test_rows_in_any_order_and_shared():
    """Rows given in any subset are those rows of the global batch: two processes holding the
    same rows (a tensor axis across hosts) read identical data."""
    stream = grain.MapDataset.range(0, 10**6).map(lambda i: np.full(4, i, np.int32))
    full = pipeline.local_batches(stream, 8, 10**7, 0)
    for rows in ([1, 3, 6], [0, 1, 2, 3], [0, 1, 2, 3]):
        part = pipeline.local_batches(stream, 8, 10**7, 0, rows=np.array(rows))
        for step in (0, 5):
            np.testing.assert_array_equal(part[step]["tokens"], full[step]["tokens"][rows])


def test_resume_from_any_step_with_and_without_workers(prepared):
    flags.FLAGS(["test"])  # grain's worker processes read absl flags
    stream = pipeline.mixed_rows(sources(prepared, [("a", 1.0)]), 0)
    batches = pipeline.local_batches(stream, 8, 4096, default_tokenizer().eos_id)
    want = [batches[s]["tokens"] for s in range(5, 9)]
    threads = pipeline.iterate(batches, 5, workers=0, prefetch=2)
    assert all(np.array_equal(next(threads)["tokens"], w) for w in want)
    procs = pipeline.iterate(batches, 5, workers=2, prefetch=1)
    assert all(np.array_equal(next(procs)["tokens"], w) for w in want)


def test_mixture_proportions(prepared):
    """Rows of a 3:1 mixture come from each dataset in that proportion (binomial tolerance)."""
    a_rows = {
        tuple(r)
        for s in prepare.load_metadata(prepared["a"])["shards"]
        for r in shards.read_shard(os.path.join(prepared["a"], s["path"]))
    }
    rows = np.concatenate(global_batches(prepared, [("a", 3.0), ("b", 1.0)], 50))
    frac = np.mean([tuple(r) in a_rows for r in rows])
    assert abs(frac - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(rows)), frac


def test_segment_ids_follow_eos():
    tokens = np.array([[5, 2, 7, 8, 2, 9]])
    np.testing.assert_array_equal(pipeline.document_ids(tokens, eos_id=2), [[1, 1, 2, 2, 2, 3]])


def test_datasets_are_checked_against_the_run(prepared, tmp_path):
    tok = default_tokenizer()
    with pytest.raises(ValueError, match="prepared with seq_len=16, but data.seq_len=32"):
        datasets.open_sources(((prepared["a"], 1.0),), "pretrain", 32, tok, 4096)
    with pytest.raises(ValueError, match="has vocabulary size 4096 > model.vocab_size=1000"):
        datasets.open_sources(((prepared["a"], 1.0),), "pretrain", SEQ, tok, 1000)
    with pytest.raises(ValueError, match="has format 'sft'; this run needs 'pretrain'"):
        datasets.open_sources(((prepared["sft"], 1.0),), "pretrain", SEQ, tok, 4096)
    meta = prepare.load_metadata(prepared["a"])
    meta["tokenizer"]["fingerprint"] = "0123456789abcdef"
    other = tmp_path / "other"
    other.mkdir()
    (other / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenized with tokenizer 0123456789abcdef"):
        datasets.open_sources(((str(other), 1.0),), "pretrain", SEQ, tok, 4096)
    with pytest.raises(FileNotFoundError, match="prepare the data with tools/prepare_data.py"):
        datasets.open_sources(((str(tmp_path), 1.0),), "pretrain", SEQ, tok, 4096)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        pipeline.check_vocab(np.array([[1, 4096]]), 4096)


@pytest.mark.parametrize("pairs_per_row", [1, 3])
def test_sft_batches(prepared, pairs_per_row):
    tok = default_tokenizer()
    srcs = datasets.open_sources(((prepared["sft"], 1.0),), "sft", None, tok, 4096)
    stream = pipeline.mixed_rows(srcs, 0)
    full = pipeline.sft_local_batches(stream, 4, 96, tok.eos_id, 4096, pairs_per_row=pairs_per_row)
    halves = [
        pipeline.sft_local_batches(
            stream,
            4,
            96,
            tok.eos_id,
            4096,
            pairs_per_row=pairs_per_row,
            rows=contiguous(4, p, 2),
        )
        for p in range(2)
    ]
    for step in range(3):
        b = full[step]
        assert set(b) == {
            "tokens",
            "prompt_mask",
            "segment_ids",
            "valid",
            "sft_dropped",
            "sft_truncated",
        }
        assert all(b[k].shape == (4, 96) for k in ("tokens", "prompt_mask", "segment_ids", "valid"))
        for k in b:
            np.testing.assert_array_equal(np.concatenate([h[step][k] for h in halves]), b[k])
        # each valid row starts with a prompt and ends in response (EOS padding, or truncated)
        for row in range(4):
            if b["valid"][row].all():
                assert b["prompt_mask"][row, 0] and not b["prompt_mask"][row, -1]
        assert (b["tokens"][:, -1] == tok.eos_id).any()
        if pairs_per_row == 3:
            assert b["segment_ids"].max() > 1  # several pairs share a row


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_sft_overflow_is_counted(prepared, overflow):
    """Pairs longer than seq_len in a step's window are counted, summed over all processes."""
    tok = default_tokenizer()
    stream = pipeline.mixed_rows(
        datasets.open_sources(((prepared["sft"], 1.0),), "sft", None, tok, 4096), 0
    )
    seq_len = 16
    halves = [
        pipeline.sft_local_batches(
            stream, 4, seq_len, tok.eos_id, 4096, overflow, rows=contiguous(4, p, 2)
        )
        for p in range(2)
    ]
    for step in range(3):
        too_long = sum(len(stream[step * 4 + i]) - 1 > seq_len for i in range(4))
        assert too_long > 0
        key = "sft_truncated" if overflow == "truncate" else "sft_dropped"
        other = "sft_dropped" if overflow == "truncate" else "sft_truncated"
        assert sum(int(h[step][key].sum()) for h in halves) == too_long
        assert sum(int(h[step][other].sum()) for h in halves) == 0

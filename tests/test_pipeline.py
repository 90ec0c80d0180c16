"""The pretraining batches: fixed-length rows of the shipped corpus, random access by step."""
import numpy as np
import pytest

from llada_jax.data import pipeline
from llada_jax.data.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tokens():
    return pipeline.default_corpus_tokens(default_tokenizer())


def test_corpus_stream_is_books_joined_with_eos(tokens):
    tok = default_tokenizer()
    assert tokens.dtype == np.int32 and tokens.max() < tok.vocab_size and tokens.min() >= 0
    assert np.sum(tokens == tok.eos_id) == 66  # one EOS after each book of the KJV
    assert tokens[-1] == tok.eos_id
    assert tok.decode(tokens[:20]).startswith("Genesis")


def test_pack_rows_is_concat_then_split():
    rows = pipeline.pack_rows(np.arange(10, dtype=np.int32), 4)
    np.testing.assert_array_equal(rows, [[0, 1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(ValueError, match="data.seq_len=11 is longer than the whole corpus"):
        pipeline.pack_rows(np.arange(10, dtype=np.int32), 11)


def test_batches_are_a_function_of_seed_and_step():
    rows = np.arange(40, dtype=np.int32).reshape(20, 2)
    ds = pipeline.pretrain_batches(rows, 4, seed=1)
    epoch = np.concatenate([ds[s]["tokens"][:, 0] // 2 for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(20))  # one epoch sees every row once
    second = np.concatenate([ds[s]["tokens"][:, 0] // 2 for s in range(5, 10)])
    assert sorted(second.tolist()) == list(range(20)) and not np.array_equal(epoch, second)
    again = pipeline.pretrain_batches(rows, 4, seed=1)
    np.testing.assert_array_equal(again[7]["tokens"], ds[7]["tokens"])
    other = pipeline.pretrain_batches(rows, 4, seed=2)
    assert not all(np.array_equal(other[s]["tokens"], ds[s]["tokens"]) for s in range(5))


def test_local_iterator_resumes_and_slices_per_process():
    rows = np.arange(64, dtype=np.int32).reshape(32, 2)
    ds = pipeline.pretrain_batches(rows, 8, seed=0)
    it = pipeline.local_iterator(ds, 3, 8, prefetch=2)
    for step in range(3, 6):
        np.testing.assert_array_equal(next(it)["tokens"], ds[step]["tokens"])
    halves = [ds[4]["tokens"][pipeline.process_slice(8, i, 2)] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), ds[4]["tokens"])

"""llada_jax/sample_stats.py on hand-made strings with answers counted by hand."""

import pytest

from llada_jax.sample_stats import CorpusVocabulary, sample_stats, words

CORPUS = CorpusVocabulary.of(
    ["In the beginning God created the heaven and the earth.", "And the LORD said unto Moses,"]
)


def test_figures_counted_by_hand():
    stats = sample_stats(["the the LORD said, unto Pharaoh", ",, the."], CORPUS)
    # Words: the the lord said unto pharaoh | the -> 7, all but "pharaoh" in the corpus.
    # Pairs (within a sample): the-the no, the-lord yes, lord-said yes, said-unto yes,
    # unto-pharaoh no -> 3 of 5. Repeats: the-the -> 1 of 7 words.
    # Non-space characters: 26 in the first (one comma), 6 in the second (three marks): 4 of 32.
    assert stats.num_words == 7
    assert stats.corpus_words == pytest.approx(6 / 7)
    assert stats.corpus_bigrams == pytest.approx(3 / 5)
    assert stats.repeats == pytest.approx(1 / 7)
    assert stats.punctuation == pytest.approx(4 / 32)
    # Triples: 4 in the first sample, all different; none in the second (one word).
    assert stats.loops == 0.0
    assert stats.line() == (
        "7 words: 86% corpus words, 60% corpus word pairs, 14% repeats, 0% loops, 12% punctuation"
    )


def test_loops_count_triples_seen_earlier_in_the_same_sample():
    # "of the children of the children of Israel": triples of-the-children, the-children-of,
    # children-of-the, of-the-children (seen), the-children-of (seen), children-of-israel:
    # 2 of 6. The second sample repeats the first's triples, which is no loop: 0 of 1.
    text = "of the children of the children of Israel"
    stats = sample_stats([text, "of the children"], CORPUS)
    assert stats.loops == pytest.approx(2 / 7)


def test_special_tokens_are_neither_words_nor_punctuation():
    stats = sample_stats(["the LORD<|mdm_mask|><|mdm_mask|> said<|endoftext|>"], CORPUS)
    assert words("a<|mdm_mask|>b") == ["a", "b"]
    assert stats.num_words == 3 and stats.corpus_bigrams == 1.0
    assert stats.punctuation == 0.0


def test_corpus_text_scores_fully_and_pairs_stay_within_documents():
    own = sample_stats(["And the LORD said unto Moses,"], CORPUS)
    assert (own.corpus_words, own.corpus_bigrams, own.repeats) == (1.0, 1.0, 0.0)
    # "earth and" spans the two corpus documents: not a pair of the corpus.
    assert sample_stats(["earth and"], CORPUS).corpus_bigrams == 0.0
    assert words("the LORD's house, O'er") == ["the", "lord's", "house", "o'er"]


def test_no_words_gives_zero_shares():
    stats = sample_stats(["", ",,,"], CORPUS)
    assert (stats.num_words, stats.corpus_words, stats.corpus_bigrams, stats.loops) == (
        0,
        0.0,
        0.0,
        0.0,
    )
    assert stats.punctuation == 1.0

"""How much generated text reads like the training corpus: word-level figures for samples.

A word is a run of letters (with inner apostrophes: "LORD's"), compared in lower case; special
tokens a sample decodes to (`<|mdm_mask|>`, `<|endoftext|>`) are dropped first. For a set of
samples, against a corpus:

    corpus_words    share of the samples' words that occur in the corpus
    corpus_bigrams  share of adjacent word pairs (within one sample) that occur in the corpus
    repeats         share of words equal to the word before them ("the the")
    loops           share of word triples (within one sample) that repeat an earlier triple of
                    the same sample ("the children of the children of")
    punctuation     share of the non-space characters that are neither letters nor digits

Real corpus text scores 1, 1, ~0 and its own punctuation share; word salad built from the corpus
vocabulary keeps corpus_words high but loses corpus_bigrams, and a young model's runs of commas
show in punctuation and repeats, a greedy one's circling phrases in loops.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
SPECIAL = re.compile(r"<\|[^|<>]*\|>")  # a special token's piece, as decoding prints it


def words(text: str) -> list[str]:
    """The words of `text` (special tokens dropped), lower-cased, in order."""
    return [w.lower() for w in WORD.findall(SPECIAL.sub(" ", text))]


@dataclasses.dataclass(frozen=True)
class CorpusVocabulary:
    """The words and adjacent word pairs of a corpus."""

    words: frozenset[str]
    bigrams: frozenset[tuple[str, str]]

    @classmethod
    def of(cls, texts: Iterable[str]) -> "CorpusVocabulary":
        """From the corpus's documents (pairs are not formed across documents)."""
        vocab: set[str] = set()
        pairs: set[tuple[str, str]] = set()
        for text in texts:
            ws = words(text)
            vocab.update(ws)
            pairs.update(zip(ws, ws[1:]))
        return cls(frozenset(vocab), frozenset(pairs))


@dataclasses.dataclass(frozen=True)
class SampleStats:
    """The figures of the module docstring for a set of samples (shares in [0, 1])."""

    num_words: int
    corpus_words: float
    corpus_bigrams: float
    repeats: float
    loops: float
    punctuation: float

    def line(self) -> str:
        """One line for a log: percentages."""
        return (
            f"{self.num_words} words: {100 * self.corpus_words:.0f}% corpus words, "
            f"{100 * self.corpus_bigrams:.0f}% corpus word pairs, "
            f"{100 * self.repeats:.0f}% repeats, {100 * self.loops:.0f}% loops, "
            f"{100 * self.punctuation:.0f}% punctuation"
        )


def sample_stats(samples: Sequence[str], corpus: CorpusVocabulary) -> SampleStats:
    """The figures of `samples` against `corpus`; shares of nothing are 0."""
    n_words = n_known = n_pairs = n_known_pairs = n_repeats = n_triples = n_looped = 0
    n_chars = n_punct = 0
    for text in samples:
        ws = words(text)
        n_words += len(ws)
        n_known += sum(w in corpus.words for w in ws)
        pairs = list(zip(ws, ws[1:]))
        n_pairs += len(pairs)
        n_known_pairs += sum(p in corpus.bigrams for p in pairs)
        n_repeats += sum(a == b for a, b in pairs)
        triples = list(zip(ws, ws[1:], ws[2:]))
        n_triples += len(triples)
        n_looped += len(triples) - len(set(triples))
        chars = [c for c in SPECIAL.sub("", text) if not c.isspace()]
        n_chars += len(chars)
        n_punct += sum(not c.isalnum() for c in chars)

    def share(part: int, whole: int) -> float:
        """part / whole, or 0.0 when whole is 0."""
        return part / whole if whole else 0.0

    return SampleStats(
        num_words=n_words,
        corpus_words=share(n_known, n_words),
        corpus_bigrams=share(n_known_pairs, n_pairs),
        repeats=share(n_repeats, n_words),
        loops=share(n_looped, n_triples),
        punctuation=share(n_punct, n_chars),
    )

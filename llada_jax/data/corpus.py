"""The small public-domain English corpus shipped with the package.

`assets/corpus.txt.xz` is the King James Bible as plain prose (one paragraph per
chapter, about 4.2 MB of UTF-8); see `assets/CORPUS_LICENSE.md` for its source and
cleaning. The shipped tokenizer was trained on it.
"""

import lzma
import os

DEFAULT_CORPUS_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "corpus.txt.xz"
)


def read_default_corpus() -> str:
    """Returns the decompressed text of the shipped corpus."""
    with lzma.open(DEFAULT_CORPUS_PATH, "rt", encoding="utf-8") as f:
        return f.read()

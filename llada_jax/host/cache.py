"""Where llada_jax keeps what it computes once per machine: the measured CPU matmul peak, the
MKL kernels built for this CPU, the tokenized default corpus."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """$XDG_CACHE_HOME/llada_jax, else ~/.cache/llada_jax (read at each call, so that tests and
    shared home directories can move it)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "llada_jax")

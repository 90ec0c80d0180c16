"""Where llada_jax keeps what it computes once per machine: the measured CPU matmul peak, the
kernels chosen by timing, the MKL kernels built for this CPU, the tokenized default corpus; and
the CPU's name, which keys the measurements."""

from __future__ import annotations

import os
import platform


def cache_dir() -> str:
    """$XDG_CACHE_HOME/llada_jax, else ~/.cache/llada_jax (read at each call, so that tests and
    shared home directories can move it)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "llada_jax")


def cpu_name() -> str:
    """The CPU's model name (what a cached measurement holds for)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

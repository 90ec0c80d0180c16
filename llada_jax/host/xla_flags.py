"""XLA flags this project sets by default, each with the reason (the measurements behind them:
docs/performance.md).

`apply_defaults()` must run before JAX starts a backend (the entry points call it first thing);
a flag already present in XLA_FLAGS is left as the user set it. Flags of other backends are
accepted and ignored by every backend, so the defaults do not depend on the platform.
"""

from __future__ import annotations

import os
from typing import MutableMapping

DEFAULTS: dict[str, str] = {
    # cuBLAS rather than Triton for XLA:GPU's GEMM fusions (the dots with the float32 -> bfloat16
    # parameter casts fused in): Triton's kernels for them are slower than cuBLAS's on Hopper.
    "xla_gpu_enable_triton_gemm": "false",
}


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
    """Appends each default flag not already in environ["XLA_FLAGS"]; returns the new value."""
    current = environ.get("XLA_FLAGS", "")
    present = {f[2:].split("=", 1)[0] for f in current.split() if f.startswith("--")}
    added = [f"--{name}={value}" for name, value in DEFAULTS.items() if name not in present]
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return environ["XLA_FLAGS"]

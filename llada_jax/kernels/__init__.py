"""Platform kernels: how a model's matmuls and attention are computed on each platform.

- choice.py: `KernelConfig` (what the config asks for), `Kernels` and `select`, the one
  place where the platform, the mesh and the config decide which implementation runs;
  called once when a model is built.
- matmul.py: the projections' 2-D matmuls (XLA or oneMKL).
- attention.py: every attention implementation behind one function, and the masks they take.
- mkl.py, mkl.cc: oneMKL matmul and attention kernels for XLA:CPU through the XLA FFI.
- splash.py: the Pallas splash-attention kernel for TPU.
- autotune.py: `Fastest`, the version of a jitted function (one per candidate kernels) that ran
  fastest on the call's shapes, timed once and remembered.
- argmax.py: the sampler's argmax over the vocabulary as max reductions, the same on every
  platform (XLA:CPU runs `jnp.argmax` one element at a time).
"""

from llada_jax.kernels.choice import (
    ATTENTION_SETTINGS,
    MATMUL_SETTINGS,
    KernelConfig,
    Kernels,
    candidates,
    select,
)

__all__ = [
    "ATTENTION_SETTINGS",
    "MATMUL_SETTINGS",
    "KernelConfig",
    "Kernels",
    "candidates",
    "select",
]

"""2-D matmuls of a model's projections: XLA's dot, or oneMKL's through the XLA FFI.

Letters in names: M rows (batch x length), K contracted, N output columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.kernels import mkl


def matmuls(x_MxK: jax.Array, w_KxN: list[jax.Array], impl: str) -> list[jax.Array]:
    """x @ w for each w (same K), by `impl` ("xla" or "mkl", from `Kernels.matmul`).

    On MKL several projections of one input are one matmul against their kernels concatenated
    along N: wider products run faster, and the backward's input gradient becomes one matmul
    instead of a sum of several. XLA keeps them apart: concatenating kernels sharded over
    `tensor` would move them between devices.
    """
    if impl == "xla":
        return [x_MxK @ w for w in w_KxN]
    if len(w_KxN) == 1:
        return [mkl.matmul(x_MxK, w_KxN[0])]
    y_MxN = mkl.matmul(x_MxK, jnp.concatenate(w_KxN, axis=1))
    splits = np.cumsum([w.shape[1] for w in w_KxN])[:-1]
    return jnp.split(y_MxN, splits, axis=1)

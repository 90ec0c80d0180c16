"""Which implementation computes a model's matmuls and attention, chosen once per model.

The config names what the user wants (`model.matmul`: auto, xla, mkl; `model.attention`: xla,
cudnn, splash); `select` turns it into what runs on this platform and mesh, when the model is
built. Traced code only reads the choice: it never inspects the backend or builds a kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada_jax.kernels import mkl

MATMUL_SETTINGS = ("auto", "xla", "mkl")
ATTENTION_SETTINGS = ("xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """What computes one model's products.

    matmul: "xla" (XLA's dot) or "mkl" (oneMKL through the XLA FFI).
    attention: "xla" (the einsum attention), "mkl", "cudnn" (jax.nn.dot_product_attention) or
      "splash" (the Pallas TPU kernel).
    platform: "cpu", "gpu" or "tpu", the platform the model is compiled for.
    """

    matmul: str = "xla"
    attention: str = "xla"
    platform: str = "cpu"


def select(
    matmul: str,
    attention: str,
    dtype: jnp.dtype,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> Kernels:
    """The kernels for a model whose config says `matmul` and `attention`, computing in `dtype`
    on `mesh` (default: the mesh in context, else this process's default backend, one device).

    MKL computes float32 matmuls, and the "xla" attention, on a CPU mesh of one device ("auto"
    where its kernels can be built here, "mkl" asks for them): they have no partitioning rule.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if isinstance(mesh, jax.sharding.Mesh):
        platform, size = mesh.devices.flat[0].platform, mesh.size
    elif mesh.empty:
        platform, size = jax.default_backend(), 1
    else:
        device = mesh.abstract_device
        platform, size = device.platform if device else jax.default_backend(), mesh.size
    use_mkl = (
        matmul != "xla"
        and jnp.dtype(dtype) == jnp.float32
        and platform == "cpu"
        and size == 1
        and mkl.available(matmul)
    )
    if use_mkl and attention == "xla":
        attention = "mkl"
    return Kernels("mkl" if use_mkl else "xla", attention, platform)

"""Which implementation computes a model's matmuls and attention, chosen once per model.

The config's `kernels` section names what the user wants (`KernelConfig`: matmul auto, xla, mkl;
attention xla, cudnn, splash); `select` turns it into what runs on this platform and mesh, when
the model is built. Traced code only reads the choice: it never inspects the backend or
builds a kernel.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from llada_jax.kernels import mkl
from llada_jax.sections import check_choices, setting

MATMUL_SETTINGS = ("auto", "xla", "mkl")
ATTENTION_SETTINGS = ("xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Which kernels the user asks for (the `kernels` config section); `select` decides what
    runs."""

    SECTION: ClassVar[str] = "kernels"

    # "cudnn": jax.nn.dot_product_attention's fused (flash) kernel on NVIDIA GPUs, which never
    # materializes the L x L map (elsewhere jax's XLA implementation of the same call runs);
    # "splash": JAX's Pallas splash-attention kernel on TPU, likewise fused; at a length it cannot
    # tile (not a multiple of 128, e.g. a sampling canvas) the einsum one runs.
    attention: str = setting(
        "xla", "attention: einsums (any backend), NVIDIA GPUs' or TPUs' fused", ATTENTION_SETTINGS
    )
    # MKL: Intel oneMKL kernels (mkl.py, the `mkl` extra); "auto": MKL where it is installed.
    # Elsewhere (accelerators, several devices, bfloat16) XLA always does.
    matmul: str = setting("auto", "who computes float32 matmuls on one CPU device", MATMUL_SETTINGS)

    def __post_init__(self) -> None:
        check_choices(self)


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
    config: KernelConfig,
    dtype: jnp.dtype,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> Kernels:
    """The kernels for a model whose config asks for `config`, computing in `dtype` on `mesh`
    (default: the mesh in context, else this process's default backend, one device).

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
    matmul, attention = config.matmul, config.attention
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


def candidates(
    config: KernelConfig,
    dtype: jnp.dtype,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> tuple[Kernels, ...]:
    """The kernels worth timing against each other for a model computing in `dtype` on `mesh`:
    with matmul "auto" where MKL can run, `select`'s MKL choice and XLA (autotune.py picks per
    function and shape); else `select`'s choice alone."""
    chosen = select(config, dtype, mesh)
    if config.matmul != "auto" or chosen.matmul != "mkl":
        return (chosen,)
    return chosen, select(dataclasses.replace(config, matmul="xla"), dtype, mesh)

"""glibc malloc settings for XLA:CPU runs: freed memory stays in the process for the next step.

XLA:CPU mallocs each run of an executable's temporary buffer (more than a GiB for the demo train
step) and frees it when the run ends. glibc serves a block that large with a fresh mmap (from a
worker thread's arena it always does) and returns it with munmap, so every step page-faults and
zeroes the whole buffer again, in kernel time the step waits for. With one arena, no mmap and no
trimming, the freed buffer stays in the heap and the next step reuses it; the process's resident
memory then stays at its peak, which a training step reaches every step anyway.

The same holds for every call of a jitted function: a sampler's generate call, a scorer call of
the evaluation job or of lm-eval. So the trainer, tools/evaluate.py, tools/sample.py,
tools/lm_eval_harness.py and tools/benchmark.py all call `keep_freed_memory()`, before JAX starts
its backend (a thread keeps the arena it first allocated from). Accelerator runs are left
alone: their large buffers live on the device, not in host malloc.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


# Where the kernel lists PCI devices, and the vendor ids of accelerators an installed JAX plugin
# would drive: Google (TPU), NVIDIA, AMD.
PCI_DEVICES = "/sys/bus/pci/devices"
ACCELERATOR_VENDORS = {"0x1ae0", "0x10de", "0x1002"}


def accelerator_present() -> bool:
    """Whether this host has a TPU or GPU on its PCI bus (an accelerator plugin installed on a
    host without one leaves JAX on the CPU: libtpu from the `tpu` extra for AOT checks)."""
    try:
        devices = os.listdir(PCI_DEVICES)
    except OSError:
        return True  # cannot tell: assume the plugin has a device
    for device in devices:
        try:
            with open(os.path.join(PCI_DEVICES, device, "vendor")) as f:
                if f.read().strip().lower() in ACCELERATOR_VENDORS:
                    return True
        except OSError:
            continue
    return False


def cpu_only() -> bool:
    """Whether JAX will run on the CPU, decided without starting a backend: JAX_PLATFORMS when
    set, else whether no accelerator plugin (libtpu, a jax_plugins package) is installed or no
    accelerator is on the PCI bus."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    return not (_plugin_installed() and accelerator_present())


def _plugin_installed() -> bool:
    """Whether an accelerator plugin for JAX (libtpu, CUDA or ROCm) is installed."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins  # namespace package of the CUDA / ROCm plugins
    except ImportError:
        return False
    return bool(list(getattr(jax_plugins, "__path__", [])))


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory for reuse (see the module docstring); returns
    whether it did (only on glibc, and only for a CPU-only run)."""
    if not sys.platform.startswith("linux") or not cpu_only():
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no mallopt parameters
        return False
    return all(
        libc.mallopt(param, value) == 1
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    )

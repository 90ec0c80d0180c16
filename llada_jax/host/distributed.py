"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or environment.

Explicit: --coordinator=HOST:PORT --num_processes=N --process_id=I (any cluster, or several
processes on one machine). SLURM jobs of more than one task and GKE TPU pods are detected from
their environment; Cloud TPU VMs (one slice or several) announce themselves only through their
metadata server, so launch/tpu_pod.py passes --distributed and JAX reads it. A single process
needs nothing. The flags are defined by `define_flags()`, which the trainer's command line
calls: importing this module defines none.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import flags

FLAGS = flags.FLAGS


# (define, name, default, help) of each flag `define_flags` defines.
_FLAG_DEFINITIONS = (
    (flags.DEFINE_string, "coordinator", None, "Coordinator HOST:PORT for multi-process runs."),
    (flags.DEFINE_integer, "num_processes", None, "Number of processes (with --coordinator)."),
    (flags.DEFINE_integer, "process_id", None, "This process's index (with --coordinator)."),
    (
        flags.DEFINE_bool,
        "distributed",
        False,
        "Start JAX's distributed runtime from what JAX reads of the cluster (a Cloud TPU VM's "
        "metadata server, which the environment alone does not show); launch/tpu_pod.py passes "
        "it.",
    ),
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines --coordinator, --num_processes, --process_id and --distributed in `flag_values`,
    each once (a second call does nothing). For command-line entry points (the trainer's main):
    the library itself defines no flag."""
    for define, name, default, help_text in _FLAG_DEFINITIONS:
        if name not in flag_values:
            define(name, default, help_text, flag_values=flag_values)


def _flag(name: str, default: Any) -> Any:
    """The parsed value of flag `name`, or `default` where no entry point defined it."""
    return FLAGS[name].value if name in FLAGS else default


def detected_cluster() -> str | None:
    """'slurm' or 'tpu' when the environment is a multi-process job JAX can read, else None."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def initialize() -> str:
    """Starts the JAX distributed runtime if this is a multi-process run; returns how. Reads the
    flags of `define_flags` where the entry point defined them (else: the environment only)."""
    coordinator, num_processes = _flag("coordinator", None), _flag("num_processes", None)
    process_id = _flag("process_id", None)
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError(f"--coordinator={coordinator} needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
            )
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return f"explicit ({process_id} of {num_processes})"
    cluster = "cloud tpu" if _flag("distributed", False) else detected_cluster()
    if cluster:
        jax.distributed.initialize()
        return f"{cluster} ({jax.process_index()} of {jax.process_count()})"
    return "single process"

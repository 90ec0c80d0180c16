"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or environment.

Explicit: --coordinator=HOST:PORT --num_processes=N --process_id=I (any cluster, or several
processes on one machine). SLURM jobs of more than one task and GKE TPU pods are detected from
their environment; Cloud TPU VMs (one slice or several) announce themselves only through their
metadata server, so launch/tpu_pod.py passes --distributed and JAX reads it. A single process
needs nothing.
"""

from __future__ import annotations

import os

import jax
from absl import flags

flags.DEFINE_string("coordinator", None, "Coordinator HOST:PORT for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
flags.DEFINE_bool(
    "distributed",
    False,
    "Start JAX's distributed runtime from what JAX reads of the cluster (a Cloud TPU VM's "
    "metadata server, which the environment alone does not show); launch/tpu_pod.py passes it.",
)
FLAGS = flags.FLAGS


def detected_cluster() -> str | None:
    """'slurm' or 'tpu' when the environment is a multi-process job JAX can read, else None."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def initialize() -> str:
    """Starts the JAX distributed runtime if this is a multi-process run; returns how."""
    if FLAGS.coordinator:
        if FLAGS.num_processes is None or FLAGS.process_id is None:
            raise ValueError(
                f"--coordinator={FLAGS.coordinator} needs --num_processes and --process_id"
            )
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise ValueError(
                f"--process_id={FLAGS.process_id} must be in "
                f"[0, --num_processes={FLAGS.num_processes})"
            )
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        return f"explicit ({FLAGS.process_id} of {FLAGS.num_processes})"
    cluster = "cloud tpu" if FLAGS.distributed else detected_cluster()
    if cluster:
        jax.distributed.initialize()
        return f"{cluster} ({jax.process_index()} of {jax.process_count()})"
    return "single process"

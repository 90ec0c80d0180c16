"""Process and host set-up, done once by the entry points before JAX starts a backend.

- xla_flags.py: the XLA flags set by default.
- memory.py: glibc malloc settings for CPU runs (freed memory kept for the next step).
- cache.py: the per-machine cache directory (measured peak, built kernels, prepared corpus).
- distributed.py: multi-process start-up (jax.distributed).
"""

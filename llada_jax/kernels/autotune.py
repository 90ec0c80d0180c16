"""Kernels chosen by measurement: of several jitted versions of one function (the same math,
other kernels), run the one that was fastest on the shapes of the call.

  fn = Fastest("sampler", {"mkl": sampler_on_mkl, "xla": sampler_on_xla})
  fn(params, ids, valid, key)      # the first call of these shapes times both, then runs one

Each version is compiled for the call's arguments, run once to warm up, then timed in turns
(`ROUNDS` each, the median kept). The choice is remembered per shape in this process and in
the cache directory, per CPU model, core count and jax version, so a later process compiles only
the chosen version. Timing runs the function on the caller's arguments, so it must not donate
or change them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from llada_jax.host.cache import cache_dir, cpu_name

ROUNDS = 3
CACHE_FILE = "kernel_choices.json"


class Fastest:
    """A jitted function (`sharding.OnMesh`-like: call, `lower`, `mesh`) that runs whichever of
    `versions` was fastest on the shapes of its arguments. `name` keys the remembered choices."""

    def __init__(self, name: str, versions: dict[str, Any]):
        self.name, self.versions = name, versions
        self.mesh = next(iter(versions.values())).mesh
        self.choices: dict[str, str] = {}

    def __call__(self, *args: Any) -> Any:
        return self.versions[self.choice(args)](*args)

    def lower(self, *args: Any) -> Any:
        """The chosen version lowered for `args` (timing the versions first if these shapes are
        new)."""
        return self.versions[self.choice(args)].lower(*args)

    def choice(self, args: tuple[Any, ...]) -> str:
        """The name of the fastest version on `args`' shapes: remembered, else measured."""
        key = f"{self.name}|{signature(args)}|{machine()}"
        if key not in self.choices:
            remembered = _read_cache().get(key)
            if remembered not in self.versions:
                seconds = timings(self.versions, args)
                remembered = min(seconds, key=seconds.get)
                _write_cache(key, remembered)
            self.choices[key] = remembered
        return self.choices[key]


def timings(versions: dict[str, Any], args: tuple[Any, ...]) -> dict[str, float]:
    """Median seconds of each version on `args`: each compiled and run once, then `ROUNDS` runs
    each in turns (so that a change in the machine's speed reaches every version alike)."""
    compiled = {name: fn.lower(*args).compile() for name, fn in versions.items()}
    for fn in compiled.values():
        jax.block_until_ready(fn(*args))
    seconds: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(ROUNDS):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            seconds[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in seconds.items()}


def signature(args: tuple[Any, ...]) -> str:
    """The shapes and dtypes of `args`' array leaves (Python scalars by type)."""
    leaves = jax.tree.leaves(args)
    return ",".join(
        f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") else type(x).__name__ for x in leaves
    )


def machine() -> str:
    """What a timing holds for: the CPU model, core count and jax version."""
    return f"{cpu_name()}|{os.cpu_count()}|jax{jax.__version__}"


def _read_cache() -> dict[str, str]:
    path = os.path.join(cache_dir(), CACHE_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # another process mid-write, or damaged: measure again
        return {}


def _write_cache(key: str, choice: str) -> None:
    path = os.path.join(cache_dir(), CACHE_FILE)
    os.makedirs(cache_dir(), exist_ok=True)
    cache = {**_read_cache(), key: choice}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1)
    os.replace(tmp, path)

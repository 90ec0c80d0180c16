"""An ablation grid: a base config and axes of named settings, expanded into named runs.

An ablation config file (configs/ablations/) defines `SWEEP = Sweep(...)` and

  def get_config(variant: str = "") -> ConfigDict:
      return SWEEP.run_config(variant)

so that each run of the grid is also an ordinary training config:
`python -m llada_jax.train --config=configs/ablations/noise_schedule.py:linear-iid-seed0`.
Run names join each axis's label and the seed with `-`. Runs differ only in what their labels
set and in `seed` (initialization, data order, masks); `eval.seed` stays the base's, so every run
is scored on the same held-out masks. A grid whose runs would differ in model shapes or token
budgets is refused unless it says so (`vary_shapes=True`): its comparison would not be fair.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any

from llada_jax import config as config_lib

LABEL = re.compile(r"[A-Za-z0-9_.]+")

# What a fair comparison holds fixed: the model's shapes, the tokens each run trains on, the
# training tokens at which it is evaluated, and the evaluation's tokens and Monte-Carlo masks.
FIXED_KEYS = (
    "model.vocab_size",
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.mlp_hidden",
    "model.head_dim",
    "model.tie_embeddings",
    "data.seq_len",
    "data.batch_size",
    "train.steps",
    "checkpoint.save_every",
    "eval.num_tokens",
    "eval.num_samples",
    "eval.seed",
)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """base: builds the base config; axes: axis name -> {label: {dotted key: value}}, in the
    order the labels appear in run names; seeds: one run per cell and seed."""

    base: Callable[[], config_lib.ConfigDict]
    axes: Mapping[str, Mapping[str, Mapping[str, Any]]]
    seeds: tuple[int, ...] = (0,)
    vary_shapes: bool = False

    def cells(self) -> list[tuple[str, ...]]:
        """Every combination of labels, one per axis."""
        return list(itertools.product(*(list(labels) for labels in self.axes.values())))

    def run_names(self) -> list[str]:
        """Every run's name (`run_name`), cell by cell in `cells()` order, each cell's seeds in
        the order of `seeds`."""
        return [run_name(cell, seed) for cell in self.cells() for seed in self.seeds]

    def run_config(self, name: str) -> config_lib.ConfigDict:
        """The config of run `name` (one of run_names()), checked and locked."""
        for cell in self.cells():
            for seed in self.seeds:
                if run_name(cell, seed) == name:
                    return self._config(cell, seed)
        raise config_lib.ConfigError(
            f"unknown run {name!r} of this sweep; valid runs: {', '.join(self.run_names())}"
        )

    def _config(self, cell: tuple[str, ...], seed: int) -> config_lib.ConfigDict:
        c = self.base()
        for axis, label in zip(self.axes, cell):
            for key, value in self.axes[axis][label].items():
                config_lib.set_key(c, key, value)
        c.seed = seed
        c.lock()
        return c

    def check(self) -> None:
        """Raises ConfigError unless every run's config loads, its sections' values are valid
        and, without `vary_shapes`, all of them share FIXED_KEYS."""
        for axis, labels in self.axes.items():
            for label in labels:
                if not LABEL.fullmatch(label):
                    raise config_lib.ConfigError(
                        f"axis {axis!r}: label {label!r} is invalid; valid: letters, digits, "
                        "'_' and '.' (run names join labels with '-')"
                    )
        names = self.run_names()
        if len(set(names)) != len(names):
            raise config_lib.ConfigError("two runs of the sweep have the same name")
        first = None
        for name in names:
            c = self.run_config(name)
            try:
                config_lib.check(c)  # every section's values, as the trainer will check them
            except ValueError as e:
                raise config_lib.ConfigError(f"run {name!r}: {e}") from None
            fixed = {key: lookup(c, key) for key in FIXED_KEYS}
            if first is None:
                first = (name, fixed)
            elif not self.vary_shapes and fixed != first[1]:
                key = next(k for k in FIXED_KEYS if fixed[k] != first[1][k])
                raise config_lib.ConfigError(
                    f"runs {first[0]!r} and {name!r} differ in {key} ({first[1][key]!r} vs "
                    f"{fixed[key]!r}): their comparison would not be fair; set "
                    "Sweep(vary_shapes=True) if that is the point"
                )


def run_name(cell: tuple[str, ...], seed: int) -> str:
    """The name of a run: the cell's labels (one per axis) and `seed<N>` joined with `-`, e.g.
    "linear-iid-seed0"."""
    return "-".join([*cell, f"seed{seed}"])


def lookup(c: config_lib.ConfigDict, dotted: str) -> Any:
    """The value of the dotted key `dotted` (e.g. "model.d_model") in config `c`."""
    for part in dotted.split("."):
        c = c[part]
    return c

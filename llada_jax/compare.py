"""Runs compared: each workdir's evaluations and training metrics read, runs that differ only in
their seed grouped into cells, and each cell's final bound set against a baseline cell.

A run's name is its workdir's base name; a trailing `-seed<N>` is its seed, the rest its cell
(launch/sweep.py names runs so). A cell's final bound is the mean over its seeds of each run's
bits per token at its last evaluated step, with standard error s / sqrt(n) from the spread over
the seeds (which holds both the seeds' and the Monte-Carlo variance); a cell of one run falls
back on that run's Monte-Carlo standard error. A difference between two cells has standard error
sqrt(se_a^2 + se_b^2), and is called significant when it exceeds twice that (about 95% under a
normal approximation; with two or three seeds a cell's standard error is itself rough).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence

import numpy as np

from llada_jax import diffusion, files, metrics, sections

SEED = re.compile(r"^(?P<cell>.+)-seed(?P<seed>\d+)$")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What one workdir holds: its eval curve (by training tokens) and its training metrics."""

    name: str
    cell: str
    seed: int | None
    tokens_per_step: int
    eval_steps: list[int]
    bits: list[float]  # bits per token at each eval step
    bits_stderr: list[float]
    train_steps: list[int]
    train_loss: list[float]
    tokens_per_sec: float | None  # median over the logged intervals
    train_seconds: float | None = None  # wall time of the logged steps (compiles excluded)
    objective: dict | None = None  # the last evaluation's loss / gradient-norm spread, if any
    bound_note: str | None = None  # why the training loss is not a bound (None: it is)

    @property
    def final_bits(self) -> float:
        """Bits per token at the last evaluated step."""
        return self.bits[-1]

    @property
    def final_stderr(self) -> float:
        """Monte-Carlo standard error of `final_bits`, in bits per token."""
        return self.bits_stderr[-1]


def read_run(workdir: str) -> RunRecord:
    """Raises ValueError (one line) for a workdir with no config or no evaluation, or one whose
    config, evaluations or metrics do not read as JSON."""
    name = files.basename(workdir)
    path = files.join(workdir, "config.json")
    if not files.isfile(path):
        raise ValueError(f"{workdir!r} is not a workdir (no config.json)")
    cfg = read_json_object(path)
    evals = []
    eval_dir = files.join(workdir, "eval")
    for n in files.listdir(eval_dir):
        if n.startswith("step_") and n.endswith(".json"):
            evals.append(read_json_object(files.join(eval_dir, n)))
    if not evals:
        raise ValueError(f"{workdir!r} has no evaluation: python tools/evaluate.py --workdir=...")
    evals.sort(key=lambda r: r["step"])
    logged = [r for r in metrics.read_jsonl(files.join(workdir, "metrics.jsonl")) if "loss" in r]
    speeds = [r["tokens_per_sec"] for r in logged if r.get("tokens_per_sec")]
    match = SEED.match(name)
    diffusion_cfg = sections.from_section(
        diffusion.DiffusionConfig, cfg.get("diffusion", {}), mask_id=0
    )
    return RunRecord(
        name=name,
        cell=match["cell"] if match else name,
        seed=int(match["seed"]) if match else None,
        tokens_per_step=cfg["data"]["batch_size"] * cfg["data"]["seq_len"],
        eval_steps=[r["step"] for r in evals],
        bits=[r["bits_per_token"] for r in evals],
        bits_stderr=[r["bits_stderr"] for r in evals],
        train_steps=[r["step"] for r in logged],
        train_loss=[r["loss"] for r in logged],
        tokens_per_sec=float(np.median(speeds)) if speeds else None,
        train_seconds=train_seconds(logged),
        objective=evals[-1].get("objective"),
        bound_note=diffusion.bound_note(diffusion_cfg),
    )


def read_json_object(path: str) -> dict:
    """A JSON file holding an object; ValueError (one line naming the file) if it does not."""
    try:
        value = json.loads(files.read_bytes(path).decode("utf-8"))
    except ValueError as e:  # invalid UTF-8 or JSON
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def train_seconds(logged: list[dict]) -> float | None:
    """Sum over the logged intervals of their steps times their mean step time, in seconds."""
    total, previous = 0.0, None
    for r in logged:
        if previous is not None and r["step"] > previous and "step_time_sec" in r:
            total += (r["step"] - previous) * r["step_time_sec"]
        previous = r["step"]
    return total or None


@dataclasses.dataclass(frozen=True)
class Cell:
    """Runs that differ only in their seed."""

    name: str
    runs: tuple[RunRecord, ...]

    @property
    def mean(self) -> float:
        """The cell's final bound: the mean over its runs of `final_bits`, bits per token."""
        return float(np.mean([r.final_bits for r in self.runs]))

    @property
    def stderr(self) -> float:
        """Standard error of `mean` in bits per token: s / sqrt(n) over the runs' final bits
        (ddof 1), or the run's own Monte-Carlo standard error for a cell of one run."""
        finals = [r.final_bits for r in self.runs]
        if len(finals) == 1:
            return self.runs[0].final_stderr
        return float(np.std(finals, ddof=1) / math.sqrt(len(finals)))


def cells(runs: Sequence[RunRecord]) -> list[Cell]:
    """Runs grouped by cell, in order of first appearance."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(r.cell, []).append(r)
    return [Cell(name, tuple(rs)) for name, rs in groups.items()]


@dataclasses.dataclass(frozen=True)
class Difference:
    """A cell's final bound against a baseline's (`difference`): delta, its standard error and
    z = delta / stderr in bits per token; significant when |delta| > 2 stderr."""

    delta: float  # cell - baseline, bits per token (negative: the cell is better)
    stderr: float
    z: float
    significant: bool


def difference(cell: Cell, baseline: Cell) -> Difference:
    """`cell`'s mean minus `baseline`'s (bits per token), with standard error
    sqrt(se_cell^2 + se_baseline^2) and z = delta / stderr (inf when stderr is 0 and delta is
    not, 0 when both are); significant when |delta| exceeds twice the standard error."""
    delta = cell.mean - baseline.mean
    stderr = math.hypot(cell.stderr, baseline.stderr)
    z = delta / stderr if stderr > 0 else (math.inf if delta else 0.0)
    return Difference(delta, stderr, z, abs(delta) > 2 * stderr)

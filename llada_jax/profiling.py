"""Profiler traces: of training steps (`train.profile_steps`, written under the run's workdir)
and of the benchmark's steps (`tools/benchmark.py --profile_dir`).

  tracer = Tracer(log_dir)            # jax.profiler.start_trace
  ...                                 # the work to trace, then jax.block_until_ready on it
  paths = tracer.stop()               # the trace files in log_dir (the .xplane.pb first)
  print(how_to_view(log_dir, paths))

  profiler = StepProfiler(workdir, cfg.train.profile_steps, start, total, enabled)
  profiler.after_step(done, (params, opt_state, out))   # in the loop, after every step

A trace is JAX's: LOG_DIR/plugins/profile/<time>/<host>.xplane.pb (TensorBoard's profile plugin,
`pip install tensorboard-plugin-profile`, or its standalone successor xprof) with the same
events as <host>.trace.json.gz and perfetto_trace.json.gz (https://ui.perfetto.dev opens it).
On gs:// the trace is written to a local temporary directory and uploaded when it stops (JAX
exports the xplane through its own GCS client, not gcsfs, and the Perfetto file only to a
local path).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from typing import Any

import jax

from llada_jax import files

PERFETTO = "https://ui.perfetto.dev"


class Tracer:
    """One profiler trace into `log_dir` (a local directory or a gs:// path), started now."""

    def __init__(self, log_dir: str):
        self.log_dir = files.resolve(log_dir)
        self.local = tempfile.mkdtemp(prefix="llada_profile_") if files.is_uri(log_dir) else None
        jax.profiler.start_trace(self.local or self.log_dir, create_perfetto_trace=True)

    def stop(self) -> list[str]:
        """Stops the trace and returns the paths of its files in `log_dir`, the xplane first."""
        jax.profiler.stop_trace()
        root = os.path.join(self.local or self.log_dir, "plugins", "profile")
        newest = max(os.listdir(root), key=lambda name: os.path.getmtime(os.path.join(root, name)))
        names = sorted(os.listdir(os.path.join(root, newest)), key=lambda n: not n.endswith(".pb"))
        if not self.local:
            return [os.path.join(root, newest, name) for name in names]
        paths = []
        for name in names:
            paths.append(files.join(self.log_dir, "plugins", "profile", newest, name))
            files.upload(os.path.join(root, newest, name), paths[-1])
        shutil.rmtree(self.local, ignore_errors=True)
        return paths


def how_to_view(log_dir: str, paths: list[str]) -> str:
    """`<xplane path>; view: tensorboard --logdir=LOG_DIR (profile plugin) or <perfetto file> at
    https://ui.perfetto.dev`."""
    perfetto = next((p for p in paths if p.endswith("perfetto_trace.json.gz")), None)
    line = f"{paths[0]}; view: tensorboard --logdir={log_dir} (Profile tab: pip install "
    line += "tensorboard-plugin-profile)"
    return line + (f" or open {perfetto} at {PERFETTO}" if perfetto else "")


class StepProfiler:
    """Traces training steps first+1 .. first+count (as the progress lines number them, after
    `first` steps; step 1 includes compilation) into WORKDIR/profile, where `profile_steps` is
    (first, count) and count 0 is off; `start`: the steps complete when this run started
    (resumed), `total`: train.steps.
    Between the traced steps and their neighbours it waits for the device, so the trace holds
    exactly those steps. A run that stops inside the window (SIGTERM, SIGINT, an error) writes
    what was traced when the process exits. Prints one line when it starts nothing (the window
    is outside this run's steps) and one naming the trace and how to view it."""

    def __init__(
        self,
        workdir: str,
        profile_steps: tuple[int, int],
        start: int,
        total: int,
        enabled: bool = True,
    ):
        self.first, self.count = profile_steps
        self.start, self.total = start, total
        self.log_dir = files.join(workdir, "profile")
        self.tracer: Tracer | None = None
        self.done = self.start  # steps complete
        self.enabled = enabled and self.count > 0
        if self.enabled and not self.start <= self.first < self.total:
            where = "past train.steps" if self.first >= self.total else "before the resumed step"
            print(
                f"profile: nothing traced: train.profile_steps={tuple(profile_steps)} starts "
                f"after step {self.first}, {where} (steps {self.start + 1}..{self.total})",
                flush=True,
            )
            self.enabled = False
        if self.enabled and self.first == self.start:
            self._start(None)

    def after_step(self, done: int, outputs: Any) -> None:
        """Called after each step (`done` steps complete) with the step's outputs."""
        if not self.enabled:
            return
        self.done = done
        if self.tracer is None and done == self.first:
            self._start(outputs)
        elif self.tracer is not None and done in (self.first + self.count, self.total):
            jax.block_until_ready(outputs)
            self._stop()

    def _start(self, outputs: Any) -> None:
        jax.block_until_ready(outputs)
        try:
            self.tracer = Tracer(self.log_dir)
        except Exception as e:  # noqa: BLE001 - a trace is not worth the run
            self._failed(e)
            return
        atexit.register(self._stop)

    def _stop(self) -> None:
        if self.tracer is None:
            return
        atexit.unregister(self._stop)
        tracer, self.tracer, self.enabled = self.tracer, None, False
        try:
            paths = tracer.stop()
        except Exception as e:  # noqa: BLE001 - e.g. an upload to gs:// that failed
            self._failed(e)
            return
        first, last = self.first + 1, self.done
        traced = f"step {last}" if last == first else f"steps {first}-{last}"
        traced = traced if last >= first else "no step"  # stopped before the first one ended
        print(f"profile: {traced} traced in {how_to_view(self.log_dir, paths)}", flush=True)

    def _failed(self, e: Exception) -> None:
        self.enabled = False
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"profile: no trace written to {self.log_dir}: {reason}", file=sys.stderr, flush=True)

"""The training loop (pretraining and SFT): `train(run, signals)` resumes or starts the run in
its workdir and steps it to `train.steps`, logging and saving as it goes.

Running it again on the same workdir resumes from the latest checkpoint in DIR/checkpoints,
exactly (the data position and the masks are functions of the step); SIGTERM saves and stops
(every process at the same step, whichever got it).
Writes DIR/config.json (the resolved config), DIR/metrics.jsonl (one JSON object per logged
step: step metrics averaged over the steps since the previous line, plus throughput, MFU and ETA)
and TensorBoard events under DIR/tensorboard, and prints one progress line per log interval.
The command line (`python -m llada_jax.train`) is `__main__.py`, which also prints the
end-of-run report.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llada_jax import checkpoint, files, metrics, profiling, writer_lock
from llada_jax.data import pipeline
from llada_jax.host import decisions
from llada_jax.run import Run, create_state, make_step_fn
from llada_jax.run_sections import TrainConfig
from llada_jax.train_step import SFT_COUNTS


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C), handled by the phase the run is in.

    - Before the training loop and after it (`phase` "start" / "end"): SIGTERM exits 0 at once
      (os._exit: no save is in flight then, the last one was waited for; an exception raised
      from the handler could land in a garbage-collection callback and be ignored).
    - In the loop: SIGTERM saves the current step and stops (exit 0). SIGINT stops after the
      current step without starting a save, and the save in flight, if any, is finished (exit
      130). A second SIGINT abandons that save: the previous step stays the latest.

    Several processes: the checkpoint save is collective, so a process that stopped alone would
    leave the others hanging in their next step. JAX's preemption sync service (started by
    `jax.distributed.initialize`, with its own SIGTERM handler, which replaces this one) hears
    the signal of any process and agrees on the step at which all of them stop.
    """

    def __init__(self):
        self.phase = "start"
        self.terminate = self.interrupt = False
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_int)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.terminate = True
        if self.phase in ("start", "end"):
            os.write(2, b"SIGTERM outside the training loop: nothing new to save; exiting\n")
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(0)

    def _on_int(self, signum: int, frame: Any) -> None:
        if self.phase != "loop" or self.interrupt:
            raise KeyboardInterrupt
        self.interrupt = True
        print("SIGINT: stopping after this step (again to abandon the save in flight)", flush=True)

    def check(self, step: int) -> bool:
        """Whether to save and stop after `step` (SIGTERM); called after every step, on every
        process."""
        if jax.process_count() > 1:
            self.terminate = multihost_utils.reached_preemption_sync_point(step)
        return self.terminate


def restore_or_init(
    run: Run, ckpt: checkpoint.Checkpointer, params: Any, opt_state: Any
) -> tuple[Any, Any, int]:
    """Resumes from the workdir's newest good checkpoint, else starts from train.init_from's
    params (fresh optimizer), else from the initialization. Returns (params, opt_state,
    start_step). A damaged step is set aside with one line and the next older one is tried;
    a step whose arrays are not the ones the config makes stops the run (StructureMismatch)."""
    for step in reversed(ckpt.complete_steps()):
        try:
            params, opt_state = ckpt.restore(step, params, opt_state)
            return params, opt_state, step
        except checkpoint.DamagedCheckpoint as e:
            moved = ckpt.set_aside(step)
            if jax.process_index() == 0:
                print(f"checkpoints: {e}; moved it to {moved}", flush=True)
    if run.train_cfg.init_from:
        with checkpoint.Checkpointer(run.train_cfg.init_from) as source:
            params, _ = source.restore(source.latest_step(), params)
    return params, opt_state, 0


def interval_stats(
    interval: list[dict[str, jax.Array]], skipped_before: int = 0
) -> tuple[dict[str, float], int]:
    """Means of the step metrics since the last log line (counts summed), and the number of
    skipped steps in a row at its end, continuing the `skipped_before` run of the previous
    interval when every step of this one was skipped."""
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(interval))
    means = {k: float(np.mean(v)) for k, v in stacked.items()}
    for key in ("skipped",) + SFT_COUNTS:  # counts: totals over the interval
        if key in stacked:
            means[key] = int(np.sum(stacked[key]))
    taken = np.flatnonzero(stacked["skipped"] == 0)
    if taken.size == 0:
        return means, skipped_before + len(interval)
    return means, len(interval) - 1 - int(taken[-1])


class Trained(NamedTuple):
    """What a training run ends with."""

    params: Any  # the last step's parameters, on the run's mesh
    metrics: dict[str, float]  # the last logged metrics


def train(run: Run, signals: StopSignals) -> Trained:
    """Runs (or resumes) up to train.steps steps; returns the final parameters and the last
    logged metrics."""
    cfg, is_writer = run.cfg, jax.process_index() == 0
    c = run.checkpoint_cfg
    # First of all, wait for any other process still writing the workdir (the job this one
    # replaces may be saving); then the checkpointer clears what interrupted saves left behind.
    # Leaving the `with` waits for the save in flight, on every exit path: an interpreter that
    # exits under a save prints tracebacks.
    lock = (
        writer_lock.open_lock(run.workdir, c.wait_for_writer_sec, c.lock_stale_sec)
        if is_writer
        else contextlib.nullcontext()
    )
    with (
        lock,
        checkpoint.Checkpointer(
            run.workdir,
            c.save_every,
            c.max_to_keep,
            c.keep_every,
            c.async_save,
            writer=True,
            save_every_sec=c.save_every_sec,
        ) as ckpt,
    ):
        graphdef, params, opt_state = create_state(run)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        params, opt_state, start = restore_or_init(run, ckpt, params, opt_state)
        if is_writer:  # after the restore: a run that cannot resume leaves its config as it was
            files.write_atomically(
                files.join(run.workdir, "config.json"), cfg.to_json_best_effort(indent=2)
            )
            print(cfg, flush=True)
        with metrics.MetricsWriter(run.workdir, enabled=is_writer, after_step=start) as writer:
            params, last = train_steps(
                run, ckpt, writer, signals, graphdef, params, opt_state, start, n_params, lock
            )
    signals.phase = "end"  # the last save is complete: SIGTERM from here on exits at once
    return Trained(params, last)


def train_steps(
    run: Run,
    ckpt: checkpoint.Checkpointer,
    writer: metrics.MetricsWriter,
    signals: StopSignals,
    graphdef: nnx.GraphDef,
    params: Any,
    opt_state: Any,
    start: int,
    n_params: int,
    lock: Any = None,
) -> tuple[Any, dict[str, float]]:
    """Steps `start` .. train.steps (or up to a preemption), logging and saving as
    configured; returns the final params and the last logged metrics. `lock`: the workdir's
    writer lock (process 0): a lock another trainer took over stops the run before a save."""
    data, is_writer = run.data_cfg, jax.process_index() == 0
    batch_size, seq_len, total = data.batch_size, data.seq_len, run.train_cfg.steps
    batches = pipeline.iterate(run.batches, start, data.workers, data.prefetch)
    # One compiled step per block size of train.block_size_schedule (one without it).
    step_fns: dict[int, Any] = {}
    block_size_at = functools.partial(
        run.train_cfg.block_size_at, final=run.diffusion_cfg.block_size
    )
    flops_per_token = metrics.train_flops_per_token(run.model_cfg, seq_len, block_size_at(start))
    peak = metrics.total_peak_flops(run.model_cfg.dtype)
    if is_writer:
        _print_start(run, n_params, flops_per_token, peak, start)
    meta = {"config": run.cfg.to_dict()}
    last: dict[str, float] = {}
    interval: list[dict[str, jax.Array]] = []  # device metrics since the last log line
    skipped_in_a_row = 0
    profiler = profiling.StepProfiler(
        run.workdir, run.train_cfg.profile_steps, start, total, is_writer
    )
    mark_step, mark_time = start, time.perf_counter()
    signals.phase = "loop"
    for step in range(start, total):
        block_size = block_size_at(step)
        if block_size not in step_fns:
            step_fns[block_size] = make_step_fn(run, graphdef, params, opt_state, block_size)
            if is_writer and run.train_cfg.block_size_schedule:
                print(f"step {step + 1}: training at block size {block_size}", flush=True)
        flops_per_token = metrics.train_flops_per_token(run.model_cfg, seq_len, block_size)
        batch = pipeline.to_global(next(batches), run.mesh, batch_size)
        params, opt_state, out = step_fns[block_size](params, opt_state, batch, jnp.int32(step))
        interval.append(out)
        done = step + 1
        profiler.after_step(done, (params, opt_state, out))  # starts or stops a trace
        if step == start or done % run.train_cfg.log_every == 0 or done == total:
            means, skipped_in_a_row = interval_stats(interval, skipped_in_a_row)
            interval, now = [], time.perf_counter()
            _check_skipped(run.train_cfg, skipped_in_a_row, done)
            if step == start:  # includes compilation: no throughput; time from here on
                last = means
                if is_writer:
                    print(
                        f"step {done} compiled and ran in {now - mark_time:.1f}s, loss "
                        f"{means['loss']:.4f}",
                        flush=True,
                    )
            else:
                sec_per_step = (now - mark_time) / (done - mark_step)
                last = _with_throughput(run, means, done, sec_per_step, flops_per_token, peak)
                if is_writer:
                    print(metrics.format_log_line(done, total, last), flush=True)
            try:
                writer.write(done, last)
            except OSError:  # a save in flight that failed (e.g. it filled the disk) comes first
                ckpt.wait()
                raise
            mark_step, mark_time = done, now
        if _save_and_check_stop(run, ckpt, signals, lock, meta, done, params, opt_state):
            break
        if signals.interrupt:
            break
    signals.phase = "finishing"  # leaving the loop; the save in flight is waited for
    return params, last


def _print_start(
    run: Run, n_params: int, flops_per_token: float, peak: float | None, start: int
) -> None:
    """Prints the run's opening line (process 0 calls it): parameter count, training FLOPs per
    token, the data, the devices and their total peak FLOP/s (nan when unknown), and the step
    the run resumed at, if any."""
    print(
        f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token "
        f"(train); data: {run.data_summary}; devices: {jax.device_count()} "
        f"x {jax.devices()[0].device_kind}; peak {peak / 1e9 if peak else float('nan'):.1f} "
        f"GFLOP/s" + (f"; resumed at step {start}" if start else ""),
        flush=True,
    )


def _check_skipped(cfg: TrainConfig, skipped_in_a_row: int, done: int) -> None:
    """Stops the run (FloatingPointError) when more than train.max_skipped_in_a_row steps in a
    row, up to step `done`, were skipped for a NaN/Inf loss or gradient."""
    if skipped_in_a_row > cfg.max_skipped_in_a_row:
        raise FloatingPointError(
            f"{skipped_in_a_row} steps in a row up to step {done} had a NaN/Inf loss or "
            f"gradient (train.max_skipped_in_a_row={cfg.max_skipped_in_a_row}); "
            f"the last checkpoint holds no NaN: lower the learning rate and resume"
        )


def _with_throughput(
    run: Run,
    means: dict[str, float],
    done: int,
    sec_per_step: float,
    flops_per_token: float,
    peak: float | None,
) -> dict[str, float]:
    """The interval's mean metrics with its throughput added: tokens/s and masked tokens/s over
    all devices, MFU against the total `peak` FLOP/s (None when unknown), seconds per step and
    the seconds left to train.steps at that pace."""
    tokens_per_sec = run.data_cfg.batch_size * run.data_cfg.seq_len / sec_per_step
    return dict(
        means,
        tokens_per_sec=tokens_per_sec,
        masked_tokens_per_sec=means["num_masked"] / sec_per_step,
        mfu=flops_per_token * tokens_per_sec / peak if peak else None,
        step_time_sec=sec_per_step,
        eta_sec=(run.train_cfg.steps - done) * sec_per_step,
    )


def _save_and_check_stop(
    run: Run,
    ckpt: checkpoint.Checkpointer,
    signals: StopSignals,
    lock: Any,
    meta: dict[str, Any],
    done: int,
    params: Any,
    opt_state: Any,
) -> bool:
    """After step `done`, on every process: raises the error of a failed save, agrees on a
    SIGTERM (`signals.check`) and on whether a save is due (`agree`), and saves when one is due,
    at the last step or on SIGTERM (WorkdirBusy instead when another trainer took over the
    writer lock). Returns whether to stop for a SIGTERM (the checkpoint of `done` is saved)."""
    ckpt.check_for_errors()  # a failed save stops the run at once
    stop = signals.check(done)
    save, lock_lost = agree(signals, ckpt.should_save(done), getattr(lock, "lost", False))
    if save or done == run.train_cfg.steps or stop:
        if lock_lost:
            raise writer_lock.WorkdirBusy(
                f"another trainer took over the writer lock of {run.workdir} (this one did "
                f"not renew it for checkpoint.lock_stale_sec); stopping before the save of "
                f"step {done}"
            )
        ckpt.save(done, params, opt_state, dict(meta, step=done))
    if stop and jax.process_index() == 0:
        print(f"SIGTERM: saved a checkpoint at step {done}; exiting", flush=True)
    return stop


def agree(signals: StopSignals, save_due: bool, lock_lost: bool) -> tuple[bool, bool]:
    """The loop's host-side choices after a step, the same on every process: a SIGINT that
    reached any process stops all of them (`signals.interrupt`); whether a save is due (the
    step or clock cadence) and whether the writer lock was lost are process 0's. Returns
    (save_due, lock_lost). One small collective per step in a multi-process run."""
    votes_PxF = decisions.flags_of_every_process([signals.interrupt, save_due, lock_lost])
    signals.interrupt = bool(votes_PxF[:, 0].any())
    return bool(votes_PxF[0, 1]), bool(votes_PxF[0, 2])

"""Benchmarks of the training stack.

  python tools/benchmark.py --mode=train --config=configs/demo.py[:variant] [--config.key=value]
      [--steps=N] [--warmup=W] [--json]

  python tools/benchmark.py --mode=train ... --profile_dir=DIR   (also writes a profiler trace)
  python tools/benchmark.py --mode=train ... --against=diffusion.block_size=0   (A/B, alternated)
  python tools/benchmark.py --mode=data --config=configs/demo.py --config.data.seq_len=2048
  python tools/benchmark.py --mode=checkpoint --config=configs/demo.py
  python tools/benchmark.py --mode=sample --config=configs/demo.py [--workdir=demo_run]
  python tools/benchmark.py --mode=likelihood --config=configs/demo.py [--workdir=demo_run]
      [--num_requests=32 --mc_num=128 --lm_batch_size=32 --continuation_words=1,6]
      [--lettered_choices=4]

train: times the trainer's jitted step (built by `llada_jax.train`) on random token batches of
the config's shape (with document segment ids when data.segment_ids is set), and reports who
computes the matmuls (`matmul`: XLA, or the MKL kernels of llada_jax/kernels/mkl.py), the median
step time and its IQR, tokens/s, masked tokens/s, model TFLOP/step, achieved GFLOP/s, the
peak FLOP/s, MFU, compile time, the process's peak RSS and the device's peak memory
(accelerators). Prints a table, or one JSON object with --json. With --against=KEY=VALUE the
step of the config so changed is timed too, the two alternated step by step (against_* keys,
and the ratio of the step times).

sample: the sampler's tokens/s, batched over --num_prompts prompts and jitted, in exact mode
(LLaDA's algorithm), with threshold decoding and with each K/V cache, in exact mode on the
parameters as the checkpoint stacks them (`exact_stacked`, where inference holds each layer's
apart: on CPU, `run.for_inference`), against a baseline of the
same algorithm in the reference's style (a Python step loop, a full forward per step, one prompt
at a time); every mode's NFE and agreement with exact decoding, and whether the baseline's tokens
are exact mode's. The model and sample settings are --workdir's (a trained checkpoint), else
--config's, untrained; the kernels are --config's (`kernels` section) either way. A
block-diffusion model (diffusion.block_size > 0) is timed with its exact K/V cache, without it
(whose tokens it must equal) and with threshold decoding: tokens/s, model calls, mean length.
Every sampler runs on the kernels `inference.make_sampler` would choose (kernels.matmul=auto:
the faster on these shapes). --gen_length (with --sample_steps, --block_length) replaces the
sample section's length; --baseline=false leaves out the reference-style loop.

likelihood: lm-eval `loglikelihood` requests (contexts and continuations from the shipped corpus)
per second through the `llada_jax` lm-eval model with requests packed several per model row
(pack=True) and one per row (pack=False), against a baseline of the same estimator as LLaDA's
reference harness computes it (one request at a time, mc_num / batch_size forward passes of
batch_size copies, the output head on every position, the cross-entropy of the masked ones),
the three alternated; the largest differences of the estimates (the same masks: they must be
~0), the share of Monte-Carlo samples whose masks are scored (one per mask: short continuations
draw the same mask many times), each layout's padding (model row positions per token scored)
and what share of positions the output head runs on; the matmul work of the baseline against
ours (FLOPs, padding included) and the GFLOP/s each reaches beside the peak: the speed-up is
the one ratio times the other; and the held-out bound's tokens per second.
--config.kernels.matmul=xla (or mkl) forces the kernels, which auto times.

On CPU the peak is the matmul peak measured in this run: before and after the timed steps (both
reported), and in a short probe between every two steps. `mfu` divides the median step's FLOP/s by
the best of all of them, so a momentarily slow probe cannot inflate it. On a shared machine whose
speed drifts with its neighbours' load (as this project's 2-core VMs' does from one 2-second window
to the next), that compares a typical step with the fastest moment; `mfu_paired` is the median over
steps of each step's FLOP/s over the better of the probes just before and just after it: the same
moment's peak.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import (  # noqa: E402
    block_sampling,
    checkpoint,
    fingerprint,
    inference,
    likelihood,
    metrics,
    profiling,
    sampling,
    sharding,
)
from llada_jax import config as config_lib  # noqa: E402
from llada_jax import run as run_lib  # noqa: E402
from llada_jax.data import pipeline  # noqa: E402
from llada_jax.host import memory as host_memory  # noqa: E402
from llada_jax.host import xla_flags  # noqa: E402

FLAGS = flags.FLAGS
config_lib.define_flags()  # --config=configs/<name>.py[:variant]
flags.DEFINE_enum(
    "mode", "train", ["train", "data", "checkpoint", "sample", "likelihood"], "What to benchmark."
)
flags.DEFINE_integer("num_requests", 32, "likelihood: lm-eval loglikelihood requests.")
flags.DEFINE_list(
    "continuation_words",
    ["1", "6"],
    "likelihood: the least and the most words of a request's continuation (multiple-choice "
    "answers are short; HellaSwag's endings run to 20 words and more).",
)
flags.DEFINE_integer(
    "lettered_choices",
    0,
    "likelihood: N > 0: the requests are questions (contexts) each followed by N lettered "
    'answers " A", " B", ... (MMLU-style multiple choice), in place of --continuation_words.',
)
flags.DEFINE_integer("mc_num", 128, "likelihood: Monte-Carlo samples per request.")
flags.DEFINE_integer("lm_batch_size", 32, "likelihood: model rows per call (ours and baseline).")
flags.DEFINE_string(
    "workdir",
    "",
    "sample, likelihood: a trained workdir (its model and settings); checkpoint: a directory to "
    "time beside local disk (e.g. gs://bucket/bench).",
)
flags.DEFINE_multi_string(
    "against",
    [],
    "train: KEY=VALUE (repeatable): also time the step of the config changed so, alternated "
    "with the first, e.g. --against=diffusion.block_size=0",
)
flags.DEFINE_integer("num_prompts", 8, "sample: prompts per batch (8 texts, repeated past 8).")
flags.DEFINE_integer(
    "gen_length", 0, "sample: tokens per prompt; 0: the sample section's (or --workdir's)"
)
flags.DEFINE_integer(
    "sample_steps", 0, "sample: sampler steps with --gen_length; 0: one token per step"
)
flags.DEFINE_integer(
    "block_length", 0, "sample: a full-sequence model's semi-AR block with --gen_length"
)
flags.DEFINE_bool(
    "baseline", True, "sample: also time the reference-style loop (slow for long generations)"
)
flags.DEFINE_integer("steps", 10, "Timed steps (train), batches (data) or saves (checkpoint).")
flags.DEFINE_integer("warmup", 2, "Untimed repetitions first.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
flags.DEFINE_string(
    "profile_dir",
    "",
    "train: after the timed steps, trace 2 more steps into this "
    "directory or gs:// path (TensorBoard profile plugin and Perfetto formats).",
)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s: on CPU the matmul peak measured now (not the disk cache, which may be stale
    or from another load); on accelerators the table in `metrics`."""
    if jax.devices()[0].platform == "cpu":
        return metrics.measure_cpu_matmul_peak(dtype)
    return metrics.total_peak_flops(dtype)


def interleaved_probe(dtype: str) -> float:
    """The CPU matmul peak in a short probe (3 x 2048^3, ~0.3 s), taken between timed steps."""
    return metrics.measure_cpu_matmul_peak(dtype, sizes=(2048,), repeats=3)


class TrainTimer:
    """The trainer's jitted step for one config, compiled, with its state and random batches."""

    def __init__(self, cfg: config_lib.ConfigDict):
        self.cfg = cfg
        self.run = run_lib.build_run(cfg, data=False)  # random batches: no data, nothing written
        graphdef, self.params, self.opt_state = run_lib.create_state(self.run)
        step_fn = run_lib.make_step_fn(self.run, graphdef, self.params, self.opt_state)
        self.rng = np.random.default_rng(cfg.seed)
        start = time.perf_counter()
        self.step_fn = step_fn.lower(
            self.params, self.opt_state, self.batch(), jnp.int32(0)
        ).compile()
        self.compile_sec = time.perf_counter() - start
        self.times: list[float] = []
        self.masked: list[float] = []

    def batch(self) -> dict[str, jax.Array]:
        """Random tokens of the config's shape (with document ids when data.segment_ids)."""
        batch_size, seq_len, tok = (
            self.cfg.data.batch_size,
            self.cfg.data.seq_len,
            self.run.tokenizer,
        )
        tokens = self.rng.integers(0, tok.vocab_size, (batch_size, seq_len), np.int32)
        arrays = {"tokens": tokens}
        if self.cfg.data.segment_ids:  # packed documents: attention masked per document
            arrays["segment_ids"] = pipeline.document_ids(tokens, tok.eos_id)
        return pipeline.to_global(arrays, self.run.mesh, batch_size)

    def step(self, step: int, timed: bool) -> None:
        """One step on a fresh batch; its time and masked tokens kept when `timed`."""
        b, s = self.batch(), jnp.int32(step)
        jax.block_until_ready(b)
        start = time.perf_counter()
        self.params, self.opt_state, out = self.step_fn(self.params, self.opt_state, b, s)
        jax.block_until_ready((self.params, self.opt_state, out))
        if timed:
            self.times.append(time.perf_counter() - start)
            self.masked.append(float(out["num_masked"]))

    def flops_per_step(self) -> float:
        """Model FLOPs of one step (metrics.train_flops_per_token, block models' too)."""
        data, run = self.cfg.data, self.run
        per_token = metrics.train_flops_per_token(
            run.model_cfg, data.seq_len, run.diffusion_cfg.block_size
        )
        return data.batch_size * data.seq_len * per_token


def against_config(cfg: config_lib.ConfigDict, pairs: list[str]) -> config_lib.ConfigDict:
    """`cfg` with the `--against` KEY=VALUE pairs set (keys as in --config.KEY=VALUE)."""
    other = config_lib.ConfigDict(cfg.to_dict())
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(
                f"--against={pair!r} is invalid; valid: KEY=VALUE, e.g. diffusion.block_size=0"
            )
        node = other
        for part in key.split(".")[:-1]:
            node = node.get(part) if isinstance(node, config_lib.ConfigDict) else None
        leaf = key.split(".")[-1]
        current = node.get(leaf) if isinstance(node, config_lib.ConfigDict) else None
        config_lib.set_key(other, key, config_lib.coerce(key, current, value))
    config_lib.check(other)
    return other


def bench_train(cfg: config_lib.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
    """Times the trainer's step (and with --against the step of the config changed so, the two
    alternated step by step); see the module docstring for what is reported."""
    timers = [TrainTimer(cfg)]
    if FLAGS.against:
        timers.append(TrainTimer(against_config(cfg, FLAGS.against)))
    run = timers[0].run
    peak_before = peak_flops(run.model_cfg.dtype)
    on_cpu = jax.devices()[0].platform == "cpu"
    probes = []
    for step in range(warmup + steps):
        if on_cpu and step >= warmup:
            probes.append(interleaved_probe(run.model_cfg.dtype))
        for timer in timers:
            timer.step(step, timed=step >= warmup)
    if on_cpu:
        probes.append(interleaved_probe(run.model_cfg.dtype))
    trace = profile(timers[0]) if FLAGS.profile_dir else None
    peak_after = peak_flops(run.model_cfg.dtype) if on_cpu else None
    peak = max(peak_before, peak_after or 0.0, *probes) if peak_before else None
    result = dict(
        mode="train",
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        dtype=run.model_cfg.dtype,
        matmul=run.kernels.matmul,
        n_params=int(sum(x.size for x in jax.tree.leaves(timers[0].params))),
        steps=steps,
        warmup=warmup,
        **timing(timers[0], peak, probes, on_cpu),
        peak_gflops=peak / 1e9 if peak else None,
        peak_gflops_before=peak_before / 1e9 if peak_before else None,
        peak_gflops_after=peak_after / 1e9 if peak_after else None,
        peak_rss_mib=peak_rss_mib(),
        peak_device_mib=peak_device_mib(),
        **({"profile": trace} if trace else {}),  # the trace's .xplane.pb
    )
    if FLAGS.against:
        result["against"] = ",".join(FLAGS.against)
        other = timing(timers[1], peak, probes, on_cpu)
        result.update({f"against_{k}": v for k, v in other.items()})
        result["step_sec_ratio_to_against"] = result["step_sec_median"] / other["step_sec_median"]
    return result


def timing(timer: TrainTimer, peak: float | None, probes: list[float], on_cpu: bool) -> dict:
    """A timer's median step and its IQR, tokens/s, masked tokens/s, model TFLOP per step,
    achieved GFLOP/s, MFU (against `peak`, and paired with the probes) and compile time."""
    times, flops = timer.times, timer.flops_per_step()
    step_sec = float(np.median(times))
    q25, q75 = np.percentile(times, [25, 75])
    achieved = flops / step_sec
    return dict(
        step_sec_median=step_sec,
        step_sec_iqr=float(q75 - q25),
        tokens_per_sec=timer.cfg.data.batch_size * timer.cfg.data.seq_len / step_sec,
        masked_tokens_per_sec=float(np.median(timer.masked)) / step_sec,
        model_tflop_per_step=flops / 1e12,
        achieved_gflops=achieved / 1e9,
        mfu=achieved / peak if peak else None,
        mfu_paired=metrics.paired_mfu(flops, times, probes) if on_cpu else None,
        compile_sec=timer.compile_sec,
    )


def profile(timer: TrainTimer) -> str:
    """Traces 2 more steps into --profile_dir, as the trainer's train.profile_steps does
    (llada_jax/profiling.py); returns the trace's path."""
    tracer = profiling.Tracer(FLAGS.profile_dir)
    for step in range(2):
        timer.step(step, timed=False)
    paths = tracer.stop()
    print(f"profile: {profiling.how_to_view(FLAGS.profile_dir, paths)}", file=sys.stderr)
    return paths[0]


def peak_device_mib() -> float | None:
    """Peak memory in use on the first device (GPU, TPU), or None where jax keeps no statistics."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def bench_data(cfg: config_lib.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s of the pretraining pipeline alone (grain threads, and worker processes)."""
    run = run_lib.build_run(cfg)
    batch_size, seq_len = cfg.data.batch_size, cfg.data.seq_len
    result: dict[str, Any] = dict(
        mode="data",
        batch_size=batch_size,
        seq_len=seq_len,
        datasets=run.data_summary,
        batches=steps,
    )
    for workers in (0, 2):
        it = pipeline.iterate(run.batches, 0, workers, cfg.data.prefetch)
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(steps):
            pipeline.to_global(next(it), run.mesh, batch_size)
        result[f"tokens_per_sec_workers{workers}"] = (
            steps * batch_size * seq_len / (time.perf_counter() - start)
        )
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def bench_checkpoint(cfg: config_lib.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
    """How long a save blocks the step, the full save, and the restore, for cfg's train state,
    in a local temporary directory; with --workdir (e.g. gs://bucket/bench) also there, the two
    alternating in each repetition, with the ratios to local disk."""
    _, params, opt_state = run_lib.create_state(run_lib.build_run(cfg, data=False))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
    local = tempfile.mkdtemp(prefix="llada_ckpt_bench_")
    places = {"local": local, **({"workdir": FLAGS.workdir} if FLAGS.workdir else {})}
    times: dict[str, dict[str, list[float]]] = {p: collections.defaultdict(list) for p in places}
    checkpointers = {
        p: checkpoint.Checkpointer(d, max_to_keep=2, writer=True) for p, d in places.items()
    }
    for i in range(warmup + steps):
        before = time.perf_counter()
        fingerprint.fingerprints((params, opt_state))  # what a save and a restore each add
        fingerprint_sec = time.perf_counter() - before
        for place, ckpt in checkpointers.items():
            start = time.perf_counter()
            ckpt.save(i + 1, params, opt_state, {"step": i + 1})
            returned = time.perf_counter()
            ckpt.wait()
            done = time.perf_counter()
            params, opt_state = ckpt.restore(i + 1, params, opt_state)
            jax.block_until_ready((params, opt_state))
            if i >= warmup:
                times[place]["save_blocking_sec"].append(returned - start)
                times[place]["save_total_sec"].append(done - start)
                times[place]["restore_sec"].append(time.perf_counter() - done)
        if i >= warmup:
            times["local"]["fingerprint_sec"].append(fingerprint_sec)
    for ckpt in checkpointers.values():
        ckpt.close()
    shutil.rmtree(local)
    result: dict[str, Any] = dict(mode="checkpoint", state_mib=state_bytes / 2**20, saves=steps)
    for place, measured in times.items():
        prefix = "" if place == "local" else "workdir_"
        for key, values in measured.items():
            result[prefix + key] = float(np.median(values))
    if FLAGS.workdir:
        result["workdir"] = FLAGS.workdir
        for key in ("save_total_sec", "restore_sec"):
            result[f"workdir_{key}_x_local"] = result[f"workdir_{key}"] / result[key]
    result["peak_rss_mib"] = peak_rss_mib()
    return result


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
BENCH_PROMPTS = (
    "In the beginning",
    "And the LORD said unto Moses,",
    "Blessed are",
    "Chapter 3\n",
    "And it came to pass",
    "The LORD is my shepherd",
    "Then said Jesus unto them,",
    "And God said,",
)


def reference_style_generate(
    forward: Callable[[np.ndarray], np.ndarray],
    prompt: list[int],
    gen_length: int,
    steps: int,
    block_length: int,
    mask_id: int,
) -> list[int]:
    """The baseline: LLaDA's greedy low-confidence generate() as its reference is written, for
    one prompt: a Python loop over steps, each a full forward pass (`forward`, jitted, (1, T) ->
    (1, T, V) logits on the host) followed by the step's arithmetic in numpy."""
    x = np.array([prompt + [mask_id] * gen_length], np.int64)
    steps_per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        start, end = len(prompt) + b * block_length, len(prompt) + (b + 1) * block_length
        count = int((x[0, start:end] == mask_id).sum())
        per_step = [
            count // steps_per_block + (i < count % steps_per_block) for i in range(steps_per_block)
        ]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = forward(x).astype(np.float64)
            x0 = logits.argmax(-1)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            confidence = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            confidence[:, end:] = -np.inf
            confidence = np.where(mask_index, confidence, -np.inf)
            chosen = np.argsort(-confidence[0], kind="stable")[: per_step[i]]
            x[0, chosen] = x0[0, chosen]
    return x[0, len(prompt) :].tolist()


def bench_model(cfg: config_lib.ConfigDict) -> inference.LoadedModel:
    """--workdir's latest checkpoint (its model and settings) with --config's kernels section,
    else --config's model untrained (on one device; the speed does not depend on the weights)."""
    if FLAGS.workdir:
        return inference.load(FLAGS.workdir, kernels=cfg.kernels.to_dict())
    run = run_lib.build_run(cfg, devices=jax.local_devices()[:1], data=False, optimizer=False)
    inference_run, graphdef, params = run_lib.for_inference(run, run_lib.init_params(run)[1])
    return inference.LoadedModel("", inference_run, 0, graphdef, params, run)


SAMPLE_MODES = {  # name -> SampleSettings overrides; "exact" is the reference's algorithm
    "exact": {},
    "threshold": {"threshold": 0.9},
    "prefix_cache": {"kv_cache": "prefix"},
    "dual_cache": {"kv_cache": "dual"},
    "threshold_dual": {"threshold": 0.9, "kv_cache": "dual"},
}


BLOCK_SAMPLE_MODES = {  # name -> (exact K/V cache, SampleSettings overrides)
    "cache": (True, {}),
    "no_cache": (False, {}),
    "threshold_cache": (True, {"threshold": 0.9}),
}


def bench_block_sample(
    model: inference.LoadedModel, ids: np.ndarray, valid: np.ndarray, steps: int, warmup: int
) -> dict[str, Any]:
    """A block-diffusion model's sampler (block_sampling.py) with its exact K/V cache, without
    it (the whole canvas every step: the tokens must be the same) and with threshold decoding,
    timed alternately: tokens/s of the canvas, model calls and the tokens generated before EOS."""
    run, params, s = model.run, model.params, sample_shape(model.run)
    block_size, key = run.diffusion_cfg.block_size, jax.random.key(0)
    base = sampling.SampleSettings(gen_length=s.gen_length, steps=s.steps, block_length=block_size)

    def sampler(name: str, cache: bool, extra: dict[str, Any]) -> Any:
        """The block sampler with or without the cache, `extra` settings, jitted and compiled
        for these prompts; with kernels.matmul=auto the faster kernels on them, as
        `inference.make_sampler` chooses."""
        settings = dataclasses.replace(base, **extra)

        def build(graphdef: nnx.GraphDef) -> Any:
            def fn(params: Any, i: jax.Array, v: jax.Array, k: jax.Array) -> Any:
                block_model = block_sampling.from_transformer(
                    lambda: nnx.merge(graphdef, params), block_size
                )
                return block_sampling.generate_blocks(
                    block_model, i, v, k, settings, run.tokenizer.special_ids, cache
                )

            return sharding.jit_on_mesh(fn, run.mesh)

        return (
            run_lib.fastest(run, f"bench_block_{name}|{settings}", build)
            .lower(params, ids, valid, key)
            .compile()
        )

    samplers = {name: sampler(name, *mode) for name, mode in BLOCK_SAMPLE_MODES.items()}
    times: dict[str, list[float]] = {name: [] for name in samplers}
    outputs: dict[str, Any] = {}
    for rep in range(warmup + steps):  # alternating: every mode once per repetition
        for name, fn in samplers.items():
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(fn(params, ids, valid, key))
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = dict(
        mode="sample",
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        model=FLAGS.workdir or "untrained " + FLAGS.config,
        block_size=block_size,
        prompts=len(ids),
        gen_length=s.gen_length,
        steps=s.steps,
        repetitions=steps,
        cache_tokens_identical_to_no_cache=bool(
            np.array_equal(np.asarray(outputs["cache"][0]), np.asarray(outputs["no_cache"][0]))
        ),
    )
    for name, (canvas, nfe, lengths) in outputs.items():
        median = float(np.median(times[name]))
        result[f"{name}_tokens_per_sec"] = len(ids) * s.gen_length / median
        result[f"{name}_nfe"] = int(nfe)
        result[f"{name}_mean_length"] = float(np.mean(np.asarray(lengths)))
        result[f"{name}_speedup_vs_no_cache"] = float(np.median(times["no_cache"])) / median
    return result


def checkpoint_params(model: inference.LoadedModel) -> Any:
    """`model`'s parameters in the layout its checkpoint holds them (`model.saved_run`'s), not
    the one inference computes with."""
    if not FLAGS.workdir:
        return run_lib.init_params(model.saved_run)[1]  # the same seed: bench_model's values
    with checkpoint.Checkpointer(model.workdir) as ckpt:
        return ckpt.restore(model.step, run_lib.abstract_params(model.saved_run)[1])[0]


def sample_shape(run: run_lib.Run) -> types.SimpleNamespace:
    """gen_length, steps and block_length: the run's sample section, or --gen_length with
    --sample_steps (default one token per step) and --block_length (default the whole
    generation)."""
    s = run.cfg.sample
    if not FLAGS.gen_length:
        return types.SimpleNamespace(
            gen_length=s.gen_length, steps=s.steps, block_length=s.block_length
        )
    return types.SimpleNamespace(
        gen_length=FLAGS.gen_length,
        steps=FLAGS.sample_steps or FLAGS.gen_length,
        block_length=FLAGS.block_length or FLAGS.gen_length,
    )


def bench_sample(cfg: config_lib.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s of the batched, jitted sampler in each mode against the reference-style loop
    (one prompt at a time), timed alternately `steps` times; with the NFE of each mode and its
    agreement with exact decoding (the baseline's tokens must equal exact mode's). A
    block-diffusion model: `bench_block_sample`."""
    model = bench_model(cfg)  # untrained: the agreement of the approximate modes is not real
    run, graphdef, params = model.run, model.graphdef, model.params
    tok, s = run.tokenizer, sample_shape(run)
    prompts = [tok.encode(BENCH_PROMPTS[i % len(BENCH_PROMPTS)]) for i in range(FLAGS.num_prompts)]
    ids, valid = inference.left_pad(prompts, tok.pad_id)
    if run.diffusion_cfg.block_size:
        return bench_block_sample(model, ids, valid, steps, warmup)
    key = jax.random.key(0)
    settings = {
        name: sampling.SampleSettings(
            gen_length=s.gen_length, steps=s.steps, block_length=s.block_length, **extra
        )
        for name, extra in SAMPLE_MODES.items()
    }
    samplers = {
        name: inference.make_sampler(run, st).lower(params, ids, valid, key).compile()
        for name, st in settings.items()
    }
    inputs = dict.fromkeys(samplers, params)
    if model.saved_run.model_cfg != run.model_cfg:  # inference holds the layers apart (CPU)
        inputs["exact_stacked"] = stacked = checkpoint_params(model)
        exact = inference.make_sampler(model.saved_run, settings["exact"])
        samplers["exact_stacked"] = exact.lower(stacked, ids, valid, key).compile()
    forward_one = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
    forward = lambda x: np.asarray(forward_one(params, jnp.asarray(x, jnp.int32)))  # noqa: E731

    def baseline() -> list[list[int]]:
        return [
            reference_style_generate(forward, p, s.gen_length, s.steps, s.block_length, tok.mask_id)
            for p in prompts
        ]

    times: dict[str, list[float]] = {name: [] for name in ["baseline", *samplers]}
    outputs: dict[str, Any] = {}
    for rep in range(warmup + steps):  # alternating: every mode once per repetition
        if FLAGS.baseline:
            start = time.perf_counter()
            outputs["baseline"] = baseline()
            if rep >= warmup:
                times["baseline"].append(time.perf_counter() - start)
        for name, sampler in samplers.items():
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(sampler(inputs[name], ids, valid, key))
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    generated = len(prompts) * s.gen_length
    exact = np.asarray(outputs["exact"][0])[:, ids.shape[1] :]
    result: dict[str, Any] = dict(
        mode="sample",
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        model=FLAGS.workdir or "untrained " + FLAGS.config,
        n_params=int(sum(x.size for x in jax.tree.leaves(params))),
        prompts=len(prompts),
        gen_length=s.gen_length,
        steps=s.steps,
        block_length=s.block_length,
        repetitions=steps,
    )
    if FLAGS.baseline:
        result["baseline_tokens_per_sec"] = generated / float(np.median(times["baseline"]))
        result["baseline_identical_to_exact"] = bool(
            np.array_equal(np.asarray(outputs["baseline"]), exact)
        )
    for name in samplers:
        canvas, nfe = outputs[name]
        tokens = np.asarray(canvas)[:, ids.shape[1] :]
        median = float(np.median(times[name]))
        result[f"{name}_tokens_per_sec"] = generated / median
        if FLAGS.baseline:
            result[f"{name}_speedup_vs_baseline"] = float(np.median(times["baseline"])) / median
        result[f"{name}_nfe"] = int(nfe)
        if name != "exact":
            result[f"{name}_speedup_vs_exact"] = float(np.median(times["exact"])) / median
            result[f"{name}_agreement_with_exact"] = float(np.mean(tokens == exact))
    return result


def likelihood_requests(
    tok: Any, count: int, max_len: int, words: tuple[int, int] = (1, 6), letters: int = 0
) -> list[tuple[str, str]]:
    """`count` lm-eval-style (context, continuation) pairs from the shipped corpus: a context of
    8 to 40 words, then a continuation of `words` (least, most) words, shorter than `max_len`
    tokens. letters > 0: each context is followed by `letters` lettered answers (" A", " B",
    ...), one request each, as a multiple-choice task asks them."""
    from llada_jax.data.corpus import read_default_corpus

    corpus = read_default_corpus().split()
    rng = np.random.default_rng(0)
    out: list[tuple[str, str]] = []
    while len(out) < count:
        start, n_ctx, n_cont = (
            rng.integers(0, len(corpus) - max(64, 40 + words[1])),
            rng.integers(8, 41),
            rng.integers(words[0], words[1] + 1),
        )
        context = " ".join(corpus[start : start + n_ctx])
        continuations = (
            [f" {chr(ord('A') + k)}" for k in range(letters)]
            if letters
            else [" " + " ".join(corpus[start + n_ctx : start + n_ctx + n_cont])]
        )
        if all(len(tok.encode(context + c)) < max_len for c in continuations):
            out += [(context, c) for c in continuations]
    return out[:count]


def reference_style_nll(
    forward: Callable[[np.ndarray], np.ndarray],
    ids: list[int],
    targets: int,
    row_id: int,
    mc_num: int,
    batch_size: int,
    key: jax.Array,
    mask_id: int,
) -> float:
    """The baseline: one request's bound (nats) as LLaDA's reference harness computes it:
    mc_num / batch_size forward passes of batch_size masked copies of the request alone, the
    head on every position, the cross-entropy (float32) of the masked targets alone weighted by
    T / l, averaged. The masks are those `likelihood.draw_masks` gives ours, so the two estimates
    must agree."""
    length = len(ids)
    target = np.zeros((batch_size, length), bool)
    target[:, length - targets :] = True
    total = 0.0
    for first in range(0, mc_num, batch_size):
        samples = np.arange(first, first + batch_size, dtype=np.int32)
        masked, l_b, _ = likelihood.draw_masks(
            key,
            jnp.asarray(target),
            jnp.ones(target.shape, jnp.int32),  # one request per row
            jnp.full((batch_size, 1), row_id, jnp.int32),
            samples[:, None],
            mc_num,
        )
        masked, l_b = np.asarray(masked), np.asarray(l_b)[:, 0]
        x = np.where(masked, mask_id, np.asarray(ids, np.int32)[None])
        logits_MxV = forward(x)[masked].astype(np.float32)  # the masked positions' rows
        logp_MxV = logits_MxV - logits_MxV.max(-1, keepdims=True)
        logp_MxV -= np.log(np.exp(logp_MxV).sum(-1, keepdims=True))
        token_logp_M = logp_MxV[np.arange(len(logp_MxV)), np.broadcast_to(ids, x.shape)[masked]]
        weight_M = np.broadcast_to((targets / l_b)[:, None], x.shape)[masked]
        total += float(np.sum(-token_logp_M.astype(np.float64) * weight_M))
    return total / mc_num


def layout_ratios(lm: Any, rows: list[tuple[list[int], int]]) -> tuple[float, float, float]:
    """How the lm-eval model `lm` scores `rows` ((ids, targets) pairs; `LLaDAJaxLM.plan`):
    (masks scored / Monte-Carlo samples, model row positions / tokens of the masks scored,
    output-head positions / model row positions)."""
    first, pairs, model_rows, _ = lm.plan(rows)
    positions = sum(r.length for r in model_rows)
    tokens = sum(len(rows[i][0]) for i, _ in pairs)
    head = sum(r.head_positions for r in model_rows)
    return len(pairs) / first.size, positions / tokens, head / positions


def likelihood_work(
    lm: Any, rows: list[tuple[list[int], int]], model_cfg: Any
) -> tuple[float, float]:
    """Matmul FLOPs of scoring `rows` ((ids, targets) pairs): (the baseline's, mc_num forward
    passes of each request at its own length with the head on every position; the lm-eval
    model `lm`'s, its scorer calls (`LLaDAJaxLM.calls`, `metrics.scorer_flops`), padding rows
    included)."""
    baseline = sum(
        lm.mc_num * len(ids) * metrics.forward_flops_per_token(model_cfg, len(ids))
        for ids, _ in rows
    )
    copies = 2 if lm.block_size else 1  # a block model's rows carry their clean copy
    ours = sum(
        metrics.scorer_flops(model_cfg, lm.batch_size, copies * call.length, call.head_positions)
        for call in lm.calls(lm.plan(rows)[2])
    )
    return baseline, ours


def bench_likelihood(cfg: config_lib.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
    """lm-eval `loglikelihood` requests per second through our `llada_jax` model (batched,
    jitted, the head on the targets) with requests packed several per model row and one per row,
    against the reference-style baseline (`reference_style_nll`), timed alternately `steps`
    times, with the largest differences of their estimates on the same masks and each layout's
    padding; and the held-out bound's tokens per second (the evaluation job's scorer)."""
    from llada_jax import evaluate
    from llada_jax.lm_eval_model import LLaDAJaxLM, request_id

    try:
        least, most = (int(w) for w in FLAGS.continuation_words)
    except ValueError:  # not two integers
        least = most = 0
    if not 1 <= least <= most:
        raise ValueError(
            f"--continuation_words={','.join(FLAGS.continuation_words)} is invalid; valid: "
            "LEAST,MOST with 1 <= LEAST <= MOST"
        )
    model = bench_model(cfg)
    lms = {
        name: LLaDAJaxLM(
            model=model,
            mc_num=FLAGS.mc_num,
            batch_size=FLAGS.lm_batch_size,
            pack=name == "packed",
            progress=False,
        )
        for name in ("packed", "unpacked")
    }
    lm = lms["packed"]
    pairs = likelihood_requests(
        lm.tok, FLAGS.num_requests, lm.max_length, (least, most), FLAGS.lettered_choices
    )
    requests = [types.SimpleNamespace(args=pair) for pair in pairs]
    encoded = [lm.encode_pair(*pair) for pair in pairs]
    forward_one = jax.jit(lambda p, x: nnx.merge(model.graphdef, p)(x))

    def baseline() -> list[float]:
        return [
            -reference_style_nll(
                lambda x: np.asarray(forward_one(model.params, jnp.asarray(x))),
                ctx + cont,
                len(cont),
                request_id(ctx + cont, len(cont)),
                FLAGS.mc_num,
                FLAGS.lm_batch_size,
                jax.random.key(lm.seed),
                lm.tok.mask_id,
            )
            for ctx, cont in encoded
        ]

    def ours(name: str) -> Callable[[], list[float]]:
        return lambda: [ll for ll, _ in lms[name].loglikelihood(requests)]

    settings = model.run.eval_settings
    rows = evaluate.held_out_rows(model.run, settings.num_tokens)[0]
    scorer = evaluate.make_scorer(model.run, settings)
    bound_batch = evaluate.rounded_batch_size(settings, model.run.mesh)
    runs = {
        "packed": ours("packed"),
        "unpacked": ours("unpacked"),
        "baseline": baseline,
        "bound": lambda: evaluate.score_rows(scorer, model.params, rows, settings, bound_batch),
    }
    times: dict[str, list[float]] = collections.defaultdict(list)
    estimates: dict[str, np.ndarray] = {}
    for rep in range(warmup + steps):  # alternating
        for name, fn in runs.items():
            start = time.perf_counter()
            out = fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
            if name != "bound":
                estimates[name] = np.asarray(out)
    median = {name: float(np.median(t)) for name, t in times.items()}
    rows_in = [(c + t, len(t)) for c, t in encoded]
    scored, padded_packed, head_packed = layout_ratios(lms["packed"], rows_in)
    _, padded_unpacked, head_unpacked = layout_ratios(lms["unpacked"], rows_in)
    baseline_flops, packed_flops = likelihood_work(lm, rows_in, model.run.model_cfg)
    peak = peak_flops(model.run.model_cfg.dtype)
    return dict(
        mode="likelihood",
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        model=FLAGS.workdir or "untrained " + FLAGS.config,
        matmul=model.run.kernels.matmul,
        n_params=int(sum(x.size for x in jax.tree.leaves(model.params))),
        requests=len(requests),
        continuation_words=f"{least},{most}",
        lettered_choices=FLAGS.lettered_choices,
        request_tokens_mean=float(np.mean([len(ids) for ids, _ in rows_in])),
        continuation_tokens_mean=float(np.mean([t for _, t in rows_in])),
        mc_num=FLAGS.mc_num,
        batch_size=FLAGS.lm_batch_size,
        repetitions=steps,
        # masks scored / samples (a mask drawn by several samples is scored once); model row
        # positions / tokens of the masks scored; output-head positions / model row positions
        scored_masks_ratio=scored,
        padded_tokens_ratio_packed=padded_packed,
        padded_tokens_ratio_unpacked=padded_unpacked,
        head_positions_ratio_packed=head_packed,
        head_positions_ratio_unpacked=head_unpacked,
        packed_requests_per_sec=len(requests) / median["packed"],
        unpacked_requests_per_sec=len(requests) / median["unpacked"],
        baseline_requests_per_sec=len(requests) / median["baseline"],
        packed_speedup_vs_unpacked=median["unpacked"] / median["packed"],
        packed_speedup_vs_baseline=median["baseline"] / median["packed"],
        # The speed-up is the work ratio times the GFLOP/s ratio (matmul FLOPs, padding and
        # the last call's spare rows counted as work), and the peak bounds the GFLOP/s.
        work_ratio_baseline_to_packed=baseline_flops / packed_flops,
        packed_gflop_per_sec=packed_flops / median["packed"] / 1e9,
        baseline_gflop_per_sec=baseline_flops / median["baseline"] / 1e9,
        peak_gflop_per_sec=peak / 1e9 if peak else None,
        max_estimate_difference=float(np.abs(estimates["packed"] - estimates["baseline"]).max()),
        max_packed_unpacked_difference=float(
            np.abs(estimates["packed"] - estimates["unpacked"]).max()
        ),
        bound_tokens_per_sec=rows.size / median["bound"],
    )


MODES: dict[str, Callable[..., dict[str, Any]]] = {
    "train": bench_train,
    "data": bench_data,
    "checkpoint": bench_checkpoint,
    "sample": bench_sample,
    "likelihood": bench_likelihood,
}


def format_table(result: dict[str, Any]) -> str:
    """Two aligned columns, numbers with units."""

    def fmt(key: str, value: Any) -> str:
        key = key.removeprefix("against_")
        if value is None:
            return "n/a"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if key in ("mfu", "mfu_paired"):
            return f"{100 * value:.1f}%"
        if key in ("step_sec_median", "step_sec_iqr", "compile_sec"):
            return f"{value:.3f} s"
        if isinstance(value, float):
            return f"{value:,.1f}" if value >= 10 else f"{value:.3f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    width = max(map(len, result))
    return "\n".join(f"{k:<{width}}  {fmt(k, v)}" for k, v in result.items())


def main(argv: list[str]) -> int:
    """Command-line entry point; returns the exit code."""
    xla_flags.apply_defaults()
    try:
        cfg = config_lib.from_command_line(argv, __doc__)
        if cfg.train.keep_host_memory:  # before JAX starts its backend
            host_memory.keep_freed_memory()
        if FLAGS.steps < 1 or FLAGS.warmup < 0:
            raise ValueError(f"--steps={FLAGS.steps} must be >= 1 and --warmup={FLAGS.warmup} >= 0")
        result = MODES[FLAGS.mode](cfg, FLAGS.steps, FLAGS.warmup)
    except (ValueError, FileNotFoundError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if FLAGS.json else format_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

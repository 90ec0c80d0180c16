"""The offline evaluation job: checkpoints of a run scored on held-out data, and sampled.

  evaluator = Evaluator(workdir)          # the run's model and eval settings, on its own devices
  result = evaluator.evaluate(step)       # -> DIR/eval/step_<step>.json and TensorBoard
  watch(evaluator)                        # every checkpoint once, as training writes them

Each checkpoint gets the Monte-Carlo bound on the NLL of a fixed set of held-out rows (the first
`eval.num_tokens` tokens of the held-out split of the run's data), in nats and bits per token
with its standard error. The masks come from `eval.seed` alone, so every checkpoint, and every
run evaluated with the same settings, is scored on the same masks: differences between them are
not drowned in Monte-Carlo noise. With `eval.generate`, the sample section's prompts are sampled
too (texts, model calls, tokens/s).

The evaluator only reads the workdir's checkpoints (complete ones: a half-written save is never
seen) and takes no lock, so it never holds up the trainer. A step whose result file exists is
done: an evaluation killed and started again goes on where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from llada_jax import checkpoint, files, inference, likelihood, metrics, sharding, train_step
from llada_jax import run as run_lib
from llada_jax.data import datasets
from llada_jax.run import Run
from llada_jax.run_sections import EvalSettings

EVAL_DIR = "eval"  # DIR/eval/step_<N>.json


def result_path(workdir: str, step: int) -> str:
    """The path of `step`'s result file: DIR/eval/step_<step>.json."""
    return files.join(workdir, EVAL_DIR, f"step_{step}.json")


def evaluated_steps(workdir: str) -> list[int]:
    """Steps whose result file exists (written in one step: it is complete)."""
    names = [
        n
        for n in files.listdir(files.join(workdir, EVAL_DIR))
        if n.startswith("step_") and n.endswith(".json")
    ]
    return sorted(int(n[len("step_") : -len(".json")]) for n in names)


# --------------------------------------------------------------------------------------------
# Held-out rows and their scores
# --------------------------------------------------------------------------------------------
def held_out_rows(run: Any, num_tokens: int) -> tuple[np.ndarray, list[str]]:
    """The first rows of the held-out split of each of the run's datasets, split by their
    weights, ceil(num_tokens / seq_len) rows in all: (R, seq_len) int32 and the splits' names.
    Raises ValueError when a split holds fewer rows than its share."""
    sources = datasets.validation_sources(run.data_cfg, run.tokenizer, run.model_cfg.vocab_size)
    seq_len = run.data_cfg.seq_len
    total = math.ceil(num_tokens / seq_len)
    weights = np.array([s.weight for s in sources]) / sum(s.weight for s in sources)
    counts = np.floor(weights * total).astype(int)
    counts[: total - counts.sum()] += 1  # the remainder to the first ones
    rows = []
    for source, count in zip(sources, counts):
        if len(source.rows) < count:
            raise ValueError(
                f"the held-out split {source.name!r} holds {len(source.rows)} rows of {seq_len} "
                f"tokens; num_tokens={num_tokens} needs {count} of them: lower --num_tokens "
                "(eval.num_tokens)"
            )
        rows.extend(source.rows[i] for i in range(count))
    return np.stack(rows).astype(np.int32), [s.name for s in sources]


def bound_settings(run: Run, settings: EvalSettings) -> EvalSettings:
    """The eval settings the held-out bound runs with: one sample per row for a block model
    with blocks of one token, whose bound is the exact autoregressive NLL (no Monte Carlo)."""
    return settings.replace(num_samples=1) if run.diffusion_cfg.block_size == 1 else settings


def make_scorer(run: Run, settings: EvalSettings) -> sharding.OnMesh:
    """`likelihood.make_scorer` with the eval settings' samples and seed, on the run's mesh
    (with the fastest kernels, `run.fastest`); `score_rows` makes every position a target
    (unconditional text). A block-diffusion model is scored by its block bound."""
    block_size = run.diffusion_cfg.block_size
    return run_lib.fastest(
        run,
        f"scorer|{settings.num_samples}|{settings.seed}|{block_size}",
        lambda graphdef: likelihood.make_scorer(
            graphdef,
            run.mesh,
            mask_id=run.tokenizer.mask_id,
            num_samples=settings.num_samples,
            seed=settings.seed,
            block_size=block_size,
        ),
    )


def score_rows(
    scorer: sharding.OnMesh,
    params: Any,
    rows_RxL: np.ndarray,
    settings: EvalSettings,
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """Every (row, sample) pair scored in batches of `batch_size`: (R, num_samples) nats. In a
    multi-process run every process calls it with the same rows (each feeds its devices' part)."""
    mesh = scorer.mesh
    n = settings.num_samples
    row_id = np.repeat(np.arange(len(rows_RxL), dtype=np.int32), n)
    sample = np.tile(np.arange(n, dtype=np.int32), len(rows_RxL))
    pad = -len(row_id) % batch_size  # the last batch repeats pair 0; its extra scores are dropped
    row_id, sample = np.concatenate([row_id, row_id[:pad]]), np.concatenate([sample, sample[:pad]])
    out = []
    batches = range(0, len(row_id), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="held-out bound", unit="batch", leave=False)
    for start in batches:
        r_Bx1 = row_id[start : start + batch_size, None]  # one slot per model row
        s_Bx1 = sample[start : start + batch_size, None]
        every_BxL = np.ones((len(r_Bx1), rows_RxL.shape[1]), bool)  # every position a target
        segment_BxL = every_BxL.astype(np.int32)  # one segment, no padding
        args = (rows_RxL[r_Bx1[:, 0]], every_BxL, segment_BxL, r_Bx1, s_Bx1)
        out.append(sharding.to_host(scorer(params, *(sharding.to_devices(x, mesh) for x in args))))
    return np.concatenate(out)[: len(rows_RxL) * n].reshape(len(rows_RxL), n)


def rounded_batch_size(settings: EvalSettings, mesh: jax.sharding.Mesh) -> int:
    """eval.batch_size rounded up to a multiple of the mesh's data-parallel devices."""
    dp = sharding.data_parallel_size(mesh)
    return -(-settings.batch_size // dp) * dp


def make_objective_spread(model: inference.LoadedModel, draws: int) -> sharding.OnMesh:
    """Jitted (params, tokens (B, L)) -> (loss (draws,), grad_norm (draws,)): the run's training
    loss and its gradient's global norm for `draws` noisings of the same batch (keys from the
    run's seed), one after another (lax.map)."""
    graphdef, step_cfg = model.graphdef, model.run.step_cfg
    if step_cfg.objective != "pretrain":
        raise ValueError("eval.objective_draws: only pretraining runs (train.objective=pretrain)")

    def spread(params: Any, tokens_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(loss (draws,), grad_norm (draws,)) float32 over the draws on tokens (B, L) int32."""

        def one(key: jax.Array) -> tuple[jax.Array, jax.Array]:
            """The training loss () and its gradient's global norm () for the batch noised
            with `key`."""
            noised = train_step.noise(key, {"tokens": tokens_BxL}, step_cfg)
            grad_fn = jax.value_and_grad(train_step.loss_fn, argnums=1, has_aux=True)
            (loss, _), grads = grad_fn(graphdef, params, noised, step_cfg.diffusion.loss_weight)
            return loss, optax.tree.norm(grads)

        keys = jax.random.split(jax.random.key(step_cfg.seed), draws)
        return jax.lax.map(one, keys)

    return sharding.jit_on_mesh(spread, model.run.mesh)


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------
class Evaluator:
    """A run's checkpoints evaluated on `devices` (default: every local device), which need not
    be the ones it trained on: parameters are restored onto them, replicated or (`fsdp`)
    sharded as FSDP training shards them; batches are split over them."""

    def __init__(
        self,
        workdir: str,
        devices: Sequence[jax.Device] | None = None,
        step: int | None = None,
        fsdp: bool = False,
        progress: bool = True,
        log: Callable[[str], Any] = print,
        kernels: dict[str, str] | None = None,
        **overrides: Any,
    ):
        """Loads checkpoint `step` (default: the latest complete one): its config gives the model
        and the eval settings, each overridden by a non-None keyword of EvalSettings, and the
        kernels section, by `kernels`."""
        self.workdir, self.progress, self.log = workdir, progress, log
        devices = devices or jax.local_devices()
        self.model = inference.load(workdir, step, devices, fsdp, kernels)
        self.settings = bound_settings(
            self.model.run, self.model.run.eval_settings.replace(**overrides)
        )
        self.batch_size = rounded_batch_size(self.settings, self.model.run.mesh)
        self.tasks = None  # lm-eval's TaskManager, when there are tasks: checked before any work
        if self.settings.tasks:
            self.tasks = task_manager(self.settings.tasks, self.settings.task_dir)
        self.rows, self.data_names = held_out_rows(self.model.run, self.settings.num_tokens)
        self.scorer = make_scorer(self.model.run, self.settings)
        self.sampler = None
        self.objective_fn = None
        self.final_step = self.model.run.train_cfg.steps
        self._tb = None

    def evaluate(self, step: int) -> dict[str, Any]:
        """Scores (and samples) checkpoint `step`, writes its result file and TensorBoard
        scalars, and returns the result. Raises ValueError if the step is not (or no longer)
        a complete checkpoint."""
        t0 = time.perf_counter()
        model = self.model if step == self.model.step else inference.reload(self.model, step)
        self.model = model
        samples = score_rows(
            self.scorer, model.params, self.rows, self.settings, self.batch_size, self.progress
        )
        est = likelihood.estimate(samples, self.rows.size)
        result: dict[str, Any] = dict(
            step=step,
            nll_per_token=est.nll_per_token,
            nll_stderr=est.stderr_per_token,
            bits_per_token=est.bits_per_token,
            bits_stderr=est.bits_stderr_per_token,
            tokens=est.tokens,
            rows=len(self.rows),
            num_samples=self.settings.num_samples,
            seed=self.settings.seed,
            data=self.data_names,
        )
        if self.settings.objective_draws:
            result["objective"] = self.objective_spread(model)
        if self.settings.generate:
            result["generate"] = self.generate(model)
        if self.settings.tasks:
            result["tasks"] = run_tasks(
                model, self.settings, self.tasks, self.batch_size, self.progress
            )
        result["seconds"] = time.perf_counter() - t0
        self.write(result)
        return result

    def objective_spread(self, model: inference.LoadedModel) -> dict[str, float]:
        """The run's own training objective (its schedule and t-sampling) on one fixed batch of
        held-out rows, drawn `objective_draws` times: the spread of the loss estimator and of the
        gradient norm over the draws, at these parameters. Schedules change these, not the
        objective's expectation."""
        if self.objective_fn is None:
            self.objective_fn = make_objective_spread(model, self.settings.objective_draws)
        rows = self.rows[: self.settings.objective_rows]
        losses, norms = map(np.asarray, self.objective_fn(model.params, rows))
        return dict(
            loss_mean=float(losses.mean()),
            loss_std=float(losses.std(ddof=1)),
            grad_norm_mean=float(norms.mean()),
            grad_norm_std=float(norms.std(ddof=1)),
            draws=len(losses),
            rows=len(rows),
        )

    def generate(self, model: inference.LoadedModel) -> dict[str, Any]:
        """The sample section's prompts, sampled as one batch: texts, model calls, tokens/s."""
        tok = model.run.tokenizer
        prompts = list(model.run.printed_samples.prompts)
        ids, valid = inference.left_pad([tok.encode(p) for p in prompts], tok.pad_id)
        mesh = model.run.mesh
        ids, valid, rows = inference.pad_batch(ids, valid, sharding.data_parallel_size(mesh))
        key = jax.random.key(self.settings.seed)
        if self.sampler is None:  # compiled once; every step has the same shapes
            sample = inference.make_sampler(model.run, model.run.sample_settings)
            self.sampler = sample.lower(model.params, ids, valid, key).compile()
        t = time.perf_counter()
        canvas, nfe = jax.block_until_ready(self.sampler(model.params, ids, valid, key))
        seconds = time.perf_counter() - t
        texts = [tok.decode(row[ids.shape[1] :]) for row in np.asarray(canvas)[:rows].tolist()]
        return dict(
            prompts=prompts,
            texts=texts,
            nfe=int(nfe),
            tokens_per_sec=len(prompts) * model.run.sample_settings.gen_length / seconds,
            seconds=seconds,
        )

    def write(self, result: dict[str, Any]) -> None:
        """TensorBoard scalars beside training's (same step axis), then the result file: a step
        is done once its file exists."""
        step, scalars = result["step"], {}
        for key in ("nll_per_token", "bits_per_token", "bits_stderr"):
            scalars[f"eval/{key}"] = result[key]
        for key, value in result.get("objective", {}).items():
            scalars[f"eval/objective_{key}"] = value
        for task, task_metrics in result.get("tasks", {}).items():
            for name, value in task_metrics.items():
                scalars[f"eval/{task}/{name}"] = value
        if "generate" in result:
            scalars["eval/generate_tokens_per_sec"] = result["generate"]["tokens_per_sec"]
            scalars["eval/generate_nfe"] = result["generate"]["nfe"]
        if self._tb is None:
            self._tb = metrics.ScalarEvents(
                files.join(self.workdir, "tensorboard"), filename_suffix=".eval"
            )
        self._tb.write(step, scalars)
        files.makedirs(files.join(self.workdir, EVAL_DIR))
        files.write_atomically(result_path(self.workdir, step), json.dumps(result, indent=1) + "\n")

    def close(self) -> None:
        """Closes the TensorBoard writer, if `write` opened one."""
        if self._tb is not None:
            self._tb.close()


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness tasks
# --------------------------------------------------------------------------------------------
def task_manager(tasks: Sequence[str], task_dir: str) -> Any:
    """lm-eval's TaskManager for `tasks`: `task_dir`'s tasks alone when they hold them all
    (indexing lm-eval's own thousands of tasks takes seconds), else with lm-eval's. Raises
    ValueError naming the first task neither knows."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("tasks need lm-evaluation-harness: pip install -e '.[eval]'") from None
    if task_dir and not os.path.isdir(task_dir):
        raise ValueError(f"--task_dir={task_dir!r} is not a directory")
    if task_dir:
        local = TaskManager(include_path=task_dir, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=task_dir or None)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            raise ValueError(
                f"unknown task {task!r} (lm-eval knows {len(known)}: list them with "
                "python tools/lm_eval_harness.py ls tasks; local ones go in --task_dir)"
            )
    return manager


def run_tasks(
    model: inference.LoadedModel,
    settings: EvalSettings,
    manager: Any,
    batch_size: int,
    progress: bool,
) -> dict[str, dict[str, float]]:
    """Each task's metrics (lm-eval's `metric,filter` names, e.g. 'acc,none', with their
    'acc_stderr,none'), through the llada_jax model on the loaded parameters."""
    import lm_eval

    from llada_jax.lm_eval_model import LLaDAJaxLM

    lm = LLaDAJaxLM(
        model=model,
        mc_num=settings.mc_num,
        batch_size=batch_size,
        seed=settings.seed,
        progress=progress,
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(settings.tasks),
        task_manager=manager,
        limit=settings.limit or None,
        log_samples=False,
    )
    return {
        task: {k: float(v) for k, v in found.items() if "," in k and isinstance(v, (int, float))}
        for task, found in out["results"].items()
    }


def summary_line(result: dict[str, Any]) -> str:
    """`evaluate`'s result as one log line: the NLL bound in nats and bits per token with its
    standard error, then whichever of the objective spread, generation and task metrics it
    holds, and its time in seconds."""
    line = (
        f"step {result['step']}: NLL bound {result['nll_per_token']:.4f} "
        f"+- {result['nll_stderr']:.4f} nats/token, {result['bits_per_token']:.4f} "
        f"+- {result['bits_stderr']:.4f} bits/token ({result['tokens']} tokens, "
        f"{result['num_samples']} samples/row)"
    )
    if "objective" in result:
        o = result["objective"]
        line += f"; training loss {o['loss_mean']:.3f} (std {o['loss_std']:.3f} over draws)"
    if "generate" in result:
        g = result["generate"]
        line += f"; generation: {g['nfe']} model calls, {g['tokens_per_sec']:.1f} tokens/s"
    for task, task_metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in task_metrics.items() if "stderr" not in k)
        line += f"; {task}: {shown}"
    return line + f"; {result['seconds']:.1f}s"


# --------------------------------------------------------------------------------------------
# Watching a training run
# --------------------------------------------------------------------------------------------
def open_watched(
    workdir: str,
    make: Callable[[int], Evaluator],
    poll_sec: float,
    idle_timeout_sec: float = 0.0,
    log: Callable[[str], Any] = print,
    sleep: Callable[[float], Any] = time.sleep,
) -> Evaluator:
    """`make(step)` on the newest checkpoint of `workdir` that can be read, waiting for one to
    appear (ValueError after `idle_timeout_sec` > 0 without one). A step that the trainer
    removes meanwhile, or that is damaged, is passed over with a line."""
    start = time.monotonic()
    while True:
        for step in reversed(inference.complete_steps(workdir)):
            try:
                return make(step)
            except Exception as e:  # noqa: BLE001 - sorted out by skip_reason
                why = skip_reason(workdir, step, e)
                if why is None:
                    raise
                log(f"step {step}: {why}; skipped")
        if idle_timeout_sec and time.monotonic() - start > idle_timeout_sec:
            raise ValueError(f"--workdir={workdir!r} has no checkpoint after {idle_timeout_sec}s")
        sleep(poll_sec)


def skip_reason(workdir: str, step: int, error: Exception) -> str | None:
    """Why a watcher may pass over `step` after `error`: the trainer removed it (its retention
    keeps the latest few), or it is damaged. None: a real error, to raise."""
    if step not in inference.complete_steps(workdir):
        return "removed by the trainer before it could be evaluated"
    if isinstance(error, checkpoint.DamagedCheckpoint):
        return f"damaged ({error.reason})"
    return None


def watch(
    evaluator: Evaluator,
    poll_sec: float = 10.0,
    idle_timeout_sec: float = 0.0,
    sleep: Callable[[float], Any] = time.sleep,
) -> list[dict[str, Any]]:
    """Evaluates every complete checkpoint not evaluated yet, oldest first, then waits for new
    ones, until the run's last step is evaluated or passed over (or `idle_timeout_sec` > 0
    passes with nothing new). Whatever the trainer does meanwhile (removing old steps,
    committing new ones, setting a damaged one aside) is passed over with a line, never an
    error: a removed step is skipped, a damaged one is skipped until it is saved again.
    Returns this call's results."""
    workdir, log = evaluator.workdir, evaluator.log
    results, idle_since = [], time.monotonic()
    passed_over: dict[int, float | None] = {}  # damaged step -> its commit time when seen
    while True:
        done = set(evaluated_steps(workdir))
        pending = [
            s
            for s in inference.complete_steps(workdir)
            if s not in done and passed_over.get(s, -1.0) != commit_time(workdir, s)
        ]
        for step in pending:
            try:
                results.append(evaluator.evaluate(step))
            except Exception as e:  # noqa: BLE001 - sorted out by skip_reason
                why = skip_reason(workdir, step, e)
                if why is None:
                    raise
                log(f"step {step}: {why}; skipped")
                passed_over[step] = commit_time(workdir, step)
                continue
            log(summary_line(results[-1]))
            done.add(step)
        if evaluator.final_step in done or evaluator.final_step in passed_over:
            return results
        if pending:
            idle_since = time.monotonic()
        elif idle_timeout_sec and time.monotonic() - idle_since > idle_timeout_sec:
            log(f"no new checkpoint for {idle_timeout_sec:.0f}s; stopping")
            return results
        sleep(poll_sec)


def commit_time(workdir: str, step: int) -> float | None:
    """When `step`'s checkpoint was committed (None: it is gone): a step saved again after it
    was set aside has a new one."""
    return files.mtime(
        files.join(checkpoint.checkpoint_dir(workdir), str(step), checkpoint.COMMIT_FILE)
    )

"""A run built from its config: the objects every job (train, benchmark, AOT compile, and the
coming sample and evaluate) is made of, each built once and checked against the machine.

  run = build_run(cfg, workdir=DIR)                   # the trainer: data and workdir checked
  run = build_run(cfg, devices=topology, data=False)  # AOT compile: no data, nothing on disk
  graphdef, params, opt_state = create_state(run)     # or abstract_state(run): nothing allocated
  step = make_step_fn(run, graphdef, params, opt_state)

Every check raises ValueError with one line naming the config key as the user types it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
import optax
from flax import nnx

from llada_jax import (
    checkpoint,
    diffusion,
    files,
    kernels,
    optim,
    run_sections,
    sampling,
    sections,
    sharding,
)
from llada_jax import config as config_lib
from llada_jax.data import datasets, pipeline
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer
from llada_jax.host import decisions
from llada_jax.kernels import autotune, mkl, splash
from llada_jax.model import ModelConfig, Transformer
from llada_jax.special_ids import SpecialIds
from llada_jax.train_step import StepConfig, make_train_step, step_jit_options


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a job is built from."""

    cfg: config_lib.ConfigDict
    workdir: str  # "" for a job that writes nothing (AOT compile, benchmarks)
    mesh: jax.sharding.Mesh
    model_cfg: ModelConfig
    kernels: kernels.Kernels  # what computes the model's matmuls and attention on this mesh
    # The kernels timed against each other for inference (`fastest`); `kernels` is the first.
    kernel_candidates: tuple[kernels.Kernels, ...]
    diffusion_cfg: diffusion.DiffusionConfig
    step_cfg: StepConfig
    data_cfg: run_sections.DataConfig
    train_cfg: run_sections.TrainConfig
    checkpoint_cfg: run_sections.CheckpointConfig
    sample_settings: sampling.SampleSettings  # the sample section's sampler
    printed_samples: run_sections.PrintedSamples  # and what it samples after training
    eval_settings: run_sections.EvalSettings
    tokenizer: Tokenizer
    optimizer: optax.GradientTransformation | None  # None: a run built for inference
    lr_schedule: optax.Schedule | None
    batches: grain.MapDataset | None  # element s: this process's rows of step s; None: no data
    data_summary: str


def build_run(
    cfg: config_lib.ConfigDict,
    *,
    workdir: str = "",
    devices: Sequence[jax.Device] | None = None,
    data: bool = True,
    optimizer: bool = True,
) -> Run:
    """Checks `cfg` against the machine (or `devices`, e.g. a TPU topology) and builds the run.

    workdir: where the job writes (checked: its parent exists, and a checkpoint in it has the
      config's model shapes); "" for none. data: open the configured datasets. optimizer: build
      the optimizer and learning-rate schedule (False for inference: both are None, and
      `abstract_params` gives the parameters to restore).
    """
    if workdir:
        check_workdir(workdir)
    config_lib.check(cfg)
    tx = lr_schedule = None
    if optimizer:
        tx = optim.make_optimizer(cfg.optim, cfg.train.steps)  # before optim.grad_accum is used
        lr_schedule = optim.make_lr_schedule(cfg.optim, cfg.train.steps)
    elif cfg.optim.grad_accum < 1:  # read by check_batch (an int: the config checks the type)
        accum = cfg.optim.grad_accum
        raise ValueError(f"optim.grad_accum={accum!r} is invalid; valid: an integer >= 1")
    mesh = sharding.make_mesh(cfg.mesh.shape, devices, cfg.mesh.num_slices)
    check_batch(cfg, mesh)
    model_cfg = sections.from_section(ModelConfig, cfg.model)
    tokenizer = run_tokenizer(cfg, model_cfg.vocab_size, data)
    kernel_cfg = sections.from_section(kernels.KernelConfig, cfg.kernels)
    candidates = kernels.candidates(kernel_cfg, model_cfg.compute_dtype, mesh)
    chosen = candidates[0]
    check_attention(kernel_cfg, chosen, cfg.data.seq_len)
    diffusion_cfg = sections.from_section(
        diffusion.DiffusionConfig, cfg.diffusion, mask_id=tokenizer.mask_id
    )
    # Training's batch (tools that load a run for other work set their own batch size).
    if data and diffusion_cfg.masking != "independent" and cfg.data.batch_size % 2:
        raise ValueError(
            f"diffusion.masking={diffusion_cfg.masking!r} sees each sequence twice: "
            f"data.batch_size={cfg.data.batch_size} must be even"
        )
    if workdir:
        check_resumable(cfg, workdir)
    batches, summary = (
        open_batches(
            cfg, tokenizer, model_cfg.vocab_size, pipeline.process_rows(mesh, cfg.data.batch_size)
        )
        if data
        else (None, "")
    )
    return Run(
        cfg=cfg,
        workdir=workdir,
        mesh=mesh,
        model_cfg=model_cfg,
        kernels=chosen,
        kernel_candidates=candidates,
        diffusion_cfg=diffusion_cfg,
        step_cfg=StepConfig(diffusion_cfg, cfg.optim.grad_accum, cfg.seed, cfg.train.objective),
        data_cfg=sections.from_section(run_sections.DataConfig, cfg.data),
        train_cfg=sections.from_section(run_sections.TrainConfig, cfg.train),
        checkpoint_cfg=sections.from_section(run_sections.CheckpointConfig, cfg.checkpoint),
        sample_settings=sections.from_section(sampling.SampleSettings, cfg.sample),
        printed_samples=sections.from_section(run_sections.PrintedSamples, cfg.sample),
        eval_settings=sections.from_section(run_sections.EvalSettings, cfg.eval),
        tokenizer=tokenizer,
        optimizer=tx,
        lr_schedule=lr_schedule,
        batches=batches,
        data_summary=summary,
    )


def run_tokenizer(cfg: config_lib.ConfigDict, vocab_size: int, data: bool) -> Tokenizer:
    """The data section's tokenizer with the tokens section's special ids, which must fit the
    model; with `data`, its vocabulary too (data is encoded with it; without data, e.g.
    sampling given token ids, the ids are checked where they are read)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if data and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab_size} is smaller than the vocabulary of "
            f"data.tokenizer={cfg.data.tokenizer or tokenizer.path!r} ({tokenizer.vocab_size})"
        )
    ids = sections.from_section(SpecialIds, cfg.tokens)
    ids.check_below(vocab_size)
    tokenizer = tokenizer.with_special_ids(ids)
    if tokenizer.mask_id < 0:
        raise ValueError(
            f"data.tokenizer={cfg.data.tokenizer!r} has no mask token: name the one the model "
            "uses with tokens.mask_id=ID"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def check_workdir(workdir: str) -> None:
    """The workdir is a directory, or its parent one in which it can be made, and this process
    can write there (a uniquely named file is created and removed). On an object store
    (gs://...) only the last: a bucket that does not exist or is not writable is one line."""
    if files.is_uri(workdir):
        probe = files.join(files.resolve(workdir), f".write-probe-{os.getpid()}")
        try:
            files.write_atomically(probe, "")
            files.remove(probe)
        except Exception as e:  # noqa: BLE001 - gcsfs and the GCS client raise their own types
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--workdir={workdir!r} is not writable: {reason}") from None
        return
    parent = os.path.dirname(os.path.abspath(workdir))
    if not os.path.isdir(parent):
        raise ValueError(f"--workdir={workdir!r}: parent directory {parent!r} does not exist")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} exists and is not a directory")
    exists = os.path.isdir(workdir)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=workdir if exists else parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        where = "is not writable" if exists else f"cannot be created in {parent!r}"
        raise ValueError(f"--workdir={workdir!r} {where}: {e.strerror}") from None


def check_batch(cfg: config_lib.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The global batch splits into micro-batches (optim.grad_accum), each over the data-parallel
    devices. (Any split of its rows over processes can be fed: each reads those its devices
    hold.)"""
    dp, batch, accum = sharding.data_parallel_size(mesh), cfg.data.batch_size, cfg.optim.grad_accum
    where = f"mesh {dict(mesh.shape)} over {mesh.size} devices"
    if batch % dp:
        raise ValueError(
            f"data.batch_size={batch} is not divisible by the data-parallel size {dp} ({where})"
        )
    if batch % accum or (batch // accum) % dp:
        raise ValueError(
            f"data.batch_size={batch} / optim.grad_accum={accum} is not a micro-batch divisible "
            f"by the data-parallel size {dp} ({where})"
        )


# kernels.attention settings that name a kernel of one platform: (platform, what, what runs else).
PLATFORM_KERNELS = {
    "splash": ("tpu", "a TPU kernel", "it runs in Pallas's interpreter (slow)"),
    "cudnn": ("gpu", "an NVIDIA GPU kernel", "jax's XLA implementation of it runs"),
}


def check_attention(asked: kernels.KernelConfig, chosen: kernels.Kernels, seq_len: int) -> None:
    """A length the splash kernel cannot tile is refused; a kernel off its platform is said."""
    if asked.attention == "splash":
        splash.block_size(seq_len)
    if asked.attention in PLATFORM_KERNELS:
        platform, what, instead = PLATFORM_KERNELS[asked.attention]
        if platform != chosen.platform:
            print(
                f"warning: kernels.attention={asked.attention!r} is {what}; on "
                f"{chosen.platform} {instead}",
                file=sys.stderr,
                flush=True,
            )


def check_resumable(cfg: config_lib.ConfigDict, workdir: str) -> None:
    """Refuses to resume (or initialize from train.init_from) with different model shapes.
    Every process reads the step process 0 lists (reading meta is collective in Orbax)."""
    for directory, what in ((workdir, "resume"), (cfg.train.init_from, "initialize from")):
        found = directory and decisions.process_0_decides(
            lambda: files.isdir(checkpoint.checkpoint_dir(directory))
        )
        if not found:
            if directory and what == "initialize from":
                raise ValueError(f"train.init_from={directory!r} has no checkpoints/ directory")
            continue
        with checkpoint.Checkpointer(directory) as ckpt:
            newest = ckpt.newest_meta()  # a step with damaged meta is the trainer's to set aside
        step, saved = (None, None) if newest is None else (newest[0], newest[1]["config"]["model"])
        if step is None:
            if what == "initialize from":
                raise ValueError(f"train.init_from={directory!r} holds no complete checkpoint")
            continue
        changes = checkpoint.shape_changes(saved, cfg.model.to_dict())
        if changes:
            raise ValueError(
                f"cannot {what} {directory!r} (step {step}): the config changes model "
                f"shapes: {'; '.join(changes)}"
            )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def open_batches(
    cfg: config_lib.ConfigDict, tokenizer: Tokenizer, vocab_size: int, rows: np.ndarray
) -> tuple[grain.MapDataset, str]:
    """The configured datasets, checked against the run, as per-step batches of the global
    `rows` this process reads."""
    d = cfg.data
    if cfg.train.objective == "sft":
        if not d.datasets:
            raise ValueError(
                "train.objective='sft' needs data.datasets: prepared SFT data "
                "(tools/prepare_data.py --format=sft)"
            )
        sources = datasets.open_sources(d.datasets, "sft", None, tokenizer, vocab_size)
        batches = pipeline.sft_local_batches(
            pipeline.mixed_rows(sources, cfg.seed),
            d.batch_size,
            d.seq_len,
            tokenizer.eos_id,
            vocab_size,
            d.sft_overflow,
            d.sft_pairs_per_row,
            rows,
        )
    else:
        sources = datasets.pretrain_sources(d, tokenizer, vocab_size)
        batches = pipeline.local_batches(
            pipeline.mixed_rows(sources, cfg.seed),
            d.batch_size,
            vocab_size,
            tokenizer.eos_id,
            d.segment_ids,
            rows,
        )
    return batches, pipeline.describe(sources)


# --------------------------------------------------------------------------------------------
# State and step
# --------------------------------------------------------------------------------------------
def init_params(run: Run) -> tuple[nnx.GraphDef, Any]:
    """The model's initial parameters (from the run's seed), created in their shardings."""
    with sharding.use_mesh(run.mesh):
        model = Transformer(run.model_cfg, rngs=nnx.Rngs(run.cfg.seed), kernels=run.kernels)
        return nnx.split(model, nnx.Param)


def create_state(run: Run) -> tuple[nnx.GraphDef, Any, Any]:
    """Model parameters and optimizer state, created directly in their shardings."""
    graphdef, params = init_params(run)
    with sharding.use_mesh(run.mesh):
        shardings = opt_state_shardings(run.optimizer, params, run.mesh)
        opt_state = jax.jit(run.optimizer.init, out_shardings=shardings)(params)
    return graphdef, params, opt_state


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh):
    """Shardings of `tx.init(params)`: every copy of the parameter tree in it (Adam's moments)
    sharded like the parameters, everything else (counts) replicated. A bare `jax.jit(tx.init)`
    does not do this: zeros do not depend on their input, and XLA replicates them."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda p: p.sharding, params),
        transform_non_params=lambda _: replicated,
    )


def abstract_params(run: Run) -> tuple[nnx.GraphDef, Any]:
    """`init_params`'s result without allocating anything: the parameters as
    `jax.ShapeDtypeStruct`s carrying their shardings on the run's mesh (what a checkpoint's
    parameters are restored into; needs no optimizer)."""
    with sharding.use_mesh(run.mesh):
        model = nnx.eval_shape(
            lambda: Transformer(run.model_cfg, rngs=nnx.Rngs(run.cfg.seed), kernels=run.kernels)
        )
        graphdef, params = nnx.split(model, nnx.Param)
        params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            params,
            nnx.get_named_sharding(params, run.mesh),
        )
    return graphdef, params


def graphdef_for(run: Run, chosen: kernels.Kernels) -> nnx.GraphDef:
    """The run's model graph with `chosen` kernels (parameters are the same for any kernels)."""
    if chosen == run.kernels:
        return abstract_params(run)[0]
    return abstract_params(dataclasses.replace(run, kernels=chosen))[0]


def for_inference(run: Run, params: Any) -> tuple[Run, nnx.GraphDef, Any]:
    """The run, model graph and parameters inference computes with (samplers, scorers), given
    `params` of `run`'s layout. On CPU a scanned model's layers get buffers of their own (the
    run's model with model.scan_layers off, the same values): XLA:CPU's matmuls cannot read a
    layer's weights in place from the stacked arrays, so each call copies them all out first,
    which at a sampler's small batches is much of the call (docs/performance.md). Training
    keeps the stack, and so do accelerators, where the copy was not measured: there `run` and
    `params` are returned as they are.

    `params` is taken over: each stacked array is freed as soon as its layers are copied out,
    so that loading holds the layers' parameters once and one array twice, not all of them
    twice (an 8B model in bfloat16 is 16 GB)."""
    if run.kernels.platform != "cpu" or not run.model_cfg.scan_layers:
        return run, abstract_params(run)[0], params
    cfg = run.cfg.copy_and_resolve_references()
    cfg.model.scan_layers = False
    apart = dataclasses.replace(
        run, cfg=cfg, model_cfg=dataclasses.replace(run.model_cfg, scan_layers=False)
    )
    graphdef, abstract = abstract_params(apart)
    n = run.model_cfg.n_layers
    layer_shardings = nnx.to_pure_dict(jax.tree.map(lambda a: a.sharding, abstract))["blocks"][0]

    def unstack(stacked_NxA: jax.Array, sharding: jax.sharding.Sharding) -> tuple[jax.Array, ...]:
        """The n layers of one stacked array (n, ...), the stack freed."""
        layers = _unstacker(n, sharding)(stacked_NxA)
        stacked_NxA.delete()
        return layers

    tree = nnx.to_pure_dict(params)
    per_leaf = jax.tree.map(unstack, tree["blocks"], layer_shardings)
    is_layers = lambda x: isinstance(x, tuple)
    tree["blocks"] = {
        i: jax.tree.map(lambda t: t[i], per_leaf, is_leaf=is_layers) for i in range(n)
    }
    nnx.replace_by_pure_dict(abstract, tree)
    return apart, graphdef, abstract


@functools.cache
def _unstacker(n: int, sharding: jax.sharding.Sharding) -> Callable:
    """A jitted function from a stacked array (n, ...) to its n slices placed by `sharding`
    (compiled once per shape, however many checkpoints are loaded)."""
    return jax.jit(lambda a: tuple(a[i] for i in range(n)), out_shardings=(sharding,) * n)


def fastest(
    run: Run, name: str, build: Callable[[nnx.GraphDef], sharding.OnMesh]
) -> sharding.OnMesh | autotune.Fastest:
    """`build(graphdef)` (a jitted function of the parameters) for the run's kernels; where
    there are several candidates (kernels.matmul=auto on one CPU device), a version for each,
    of which every call runs the fastest on its shapes (kernels/autotune.py). `name` says which
    function it is (with its static settings) for the remembered choices."""
    if len(run.kernel_candidates) == 1:
        return build(graphdef_for(run, run.kernels))
    versions = {k.matmul: build(graphdef_for(run, k)) for k in run.kernel_candidates}
    return autotune.Fastest(name, versions)


def abstract_state(run: Run) -> tuple[nnx.GraphDef, Any, Any]:
    """`create_state`'s result without allocating anything: params and optimizer state as
    `jax.ShapeDtypeStruct`s carrying the shardings `create_state` gives them (for ahead-of-time
    compilation, e.g. for a TPU topology from a CPU machine: tools/aot_compile.py)."""
    graphdef, params = abstract_params(run)
    # Outside the mesh context: optax runs tx.init eagerly on placeholders, which fails on a mesh
    # of abstract (topology) devices.
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(run.optimizer.init, params),
        opt_state_shardings(run.optimizer, params, run.mesh),
    )
    return graphdef, params, opt_state


def make_step_fn(
    run: Run, graphdef: nnx.GraphDef, params: Any, opt_state: Any, block_size: int | None = None
) -> sharding.OnMesh:
    """The jitted training step on the run's mesh, as the trainer runs it (the benchmark times
    this function), with `train_step.step_jit_options`' shardings and donation. block_size:
    the block size it trains at, if not diffusion.block_size (train.block_size_schedule)."""
    step_cfg = run.step_cfg
    if block_size is not None:
        diffusion_cfg = dataclasses.replace(step_cfg.diffusion, block_size=block_size)
        step_cfg = dataclasses.replace(step_cfg, diffusion=diffusion_cfg)
    step = make_train_step(graphdef, run.optimizer, run.lr_schedule, step_cfg)
    options = mkl.STEP_COMPILER_OPTIONS if run.kernels.matmul == "mkl" else None
    return sharding.jit_on_mesh(
        step,
        run.mesh,
        compiler_options=options,
        **step_jit_options(params, opt_state, run.mesh),
    )

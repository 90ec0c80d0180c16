"""A trained model put to use: a workdir's checkpoint loaded for inference, prompts encoded,
samples drawn. The runner under tools/sample.py and the trainer's end-of-run samples.

  model = load(workdir)                                   # latest complete step, params only
  ids_BxP, valid_BxP = left_pad([tok.encode(p) for p in prompts], tok.pad_id)
  sample = make_sampler(model.run, settings)
  canvas_BxT, nfe = sample(model.params, ids_BxP, valid_BxP, jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from llada_jax import block_sampling, checkpoint, files, sampling, sharding
from llada_jax import config as config_lib
from llada_jax import run as run_lib
from llada_jax.data.tokenizer import Tokenizer
from llada_jax.run import Run, abstract_params, build_run


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's parameters with the run its config describes, both as inference computes
    with them (`run_lib.for_inference`: on CPU each layer's parameters apart)."""

    workdir: str
    run: Run
    step: int
    graphdef: nnx.GraphDef
    params: Any
    saved_run: Run  # `run` as the checkpoint holds it (its parameters' layout)


def load(
    workdir: str,
    step: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    fsdp: bool = False,
    kernels: dict[str, str] | None = None,
) -> LoadedModel:
    """The parameters of `workdir`'s latest complete checkpoint (or `step`) with the run built
    from the config saved in it, on `devices` (default: the first local device), whatever mesh
    trained it: replicated on a data-parallel mesh of them, or with `fsdp` sharded over them
    as FSDP training shards them (the batch is split over the devices either way). `kernels`:
    keys of the kernels section that replace the saved ones (a tool's --matmul). Works on any
    workdir that holds parameters, including a params-only one from tools/convert_hf.py.
    Raises ValueError with one line."""
    devices = list(devices) if devices is not None else jax.local_devices()[:1]
    restore = functools.partial(_restore, devices=devices, fsdp=fsdp, kernels=kernels or {})
    with _reader(workdir) as ckpt:
        step = _complete_step(ckpt, workdir, step)
        try:
            saved_run, params = restore(ckpt, step)
        except checkpoint.DamagedCheckpoint as e:
            raise _refusal(e, ckpt, lambda s: restore(ckpt, s)) from None
    run, graphdef, params = run_lib.for_inference(saved_run, params)
    return LoadedModel(workdir, run, step, graphdef, params, saved_run)


def _restore(
    ckpt: checkpoint.Checkpointer,
    step: int,
    devices: list[jax.Device],
    fsdp: bool,
    kernels: dict[str, str],
) -> tuple[Run, Any]:
    """The run of a step's saved config (no optimizer or learning-rate schedule: parameters
    only; `kernels` over the saved kernels section) and its verified parameters on `devices`."""
    cfg = saved_config(ckpt.meta(step)["config"], len(devices), fsdp)
    cfg.kernels.update(kernels)
    run = build_run(cfg, devices=devices, data=False, optimizer=False)
    return run, ckpt.restore(step, abstract_params(run)[1])[0]


def refusal(error: checkpoint.DamagedCheckpoint, workdir: str) -> checkpoint.DamagedCheckpoint:
    """`error` with the newest good step of `workdir` named, for a tool that reads the
    parameters its own way (the exporter)."""
    devices = jax.local_devices()[:1]
    with _reader(workdir) as ckpt:
        return _refusal(error, ckpt, lambda s: _restore(ckpt, s, devices, False, {}))


def reload(model: LoadedModel, step: int) -> LoadedModel:
    """Another step of the same workdir in `model`'s layout, shapes and shardings (no new run).
    Raises DamagedCheckpoint (without looking for a good step: a watcher skips it)."""
    with _reader(model.workdir) as ckpt:
        step = _complete_step(ckpt, model.workdir, step)
        params, _ = ckpt.restore(step, abstract_params(model.saved_run)[1])
    params = run_lib.for_inference(model.saved_run, params)[2]
    return dataclasses.replace(model, step=step, params=params)


def complete_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps of `workdir` now (none while its checkpoints/ is missing)."""
    return checkpoint.complete_steps(checkpoint.checkpoint_dir(workdir))


def _reader(workdir: str) -> checkpoint.Checkpointer:
    if not files.isdir(checkpoint.checkpoint_dir(workdir)):
        raise ValueError(f"--workdir={workdir!r} holds no checkpoints/ directory")
    return checkpoint.Checkpointer(workdir)


def _complete_step(ckpt: checkpoint.Checkpointer, workdir: str, step: int | None) -> int:
    steps = ckpt.complete_steps()
    if not steps or (step is not None and step not in steps):
        found = f"complete steps: {steps}" if steps else "no complete checkpoint"
        raise ValueError(f"--workdir={workdir!r} has no checkpoint at step {step} ({found})")
    return steps[-1] if step is None else step


def _refusal(
    error: checkpoint.DamagedCheckpoint,
    ckpt: checkpoint.Checkpointer,
    restore: Callable[[int], Any],
) -> checkpoint.DamagedCheckpoint:
    """A read-only tool's one line for a damaged step: what is wrong, and the newest other
    step that restores and verifies (found by trying them, newest first), as `--step=N`."""
    for step in reversed(ckpt.complete_steps()):
        if step == error.step:
            continue
        try:
            restore(step)
        except (checkpoint.DamagedCheckpoint, checkpoint.StructureMismatch):
            continue
        advice = f"the newest good step is {step}: pass --step={step}"
        break
    else:
        advice = "no other step of this workdir can be read"
    return checkpoint.DamagedCheckpoint(error.directory, error.step, f"{error.reason}; {advice}")


def saved_config(saved: dict, num_devices: int = 1, fsdp: bool = False) -> config_lib.ConfigDict:
    """A checkpoint's config over today's defaults (keys added since it was saved keep their
    defaults), on a mesh of `num_devices` (data-parallel, or FSDP): inference needs neither the
    training mesh nor its batch."""
    cfg = config_lib.base_config()
    for name, value in config_lib.upgrade(saved).items():
        if name not in cfg:
            continue
        if isinstance(cfg[name], config_lib.ConfigDict):
            for key, v in value.items():
                if key in cfg[name]:
                    cfg[name][key] = _tuples(v)
        else:
            cfg[name] = _tuples(value)
    cfg.mesh.shape = (1, num_devices, 1) if fsdp else (num_devices, 1, 1)
    cfg.mesh.num_slices = 1
    cfg.data.batch_size = num_devices
    cfg.optim.grad_accum = 1
    return cfg


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples a config holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one left-padded batch, as the sampler takes them:
    ids (B, P) int32 and valid (B, P) bool (False on the pads), P the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :], valid[i, width - len(p) :] = p, True
    return ids, valid


def make_sampler(run: Run, settings: sampling.SampleSettings) -> sharding.OnMesh:
    """The jitted reverse process: (params, ids (B, P), valid (B, P), key) -> (canvas (B, P +
    gen_length) int32, nfe: the model calls it ran). The mask, EOS and end-of-turn ids are the
    run's tokenizer's (which carries the ids its config names). Jitted on the run's mesh (a
    loaded model's, or the trainer's): the batch is split over its data-parallel axes, B a
    multiple of them. Under kernels.matmul=auto on one CPU device, each call runs the kernels
    that were fastest on its shapes (`run.fastest`). The tools, the evaluation job, lm-eval and
    the benchmark all use it.

    A block-diffusion model (diffusion.block_size b > 0) samples with
    `block_sampling.generate_blocks` and its exact K/V cache, whatever kv_cache says:
    block_length is taken from the model (`block_sampling.block_settings`: ValueError when
    gen_length or steps do not fit its blocks), gen_length is a cap (after a row's EOS or
    end-of-turn, EOS), nfe the denoising steps run."""
    block_size = run.diffusion_cfg.block_size
    if block_size:
        settings = block_sampling.block_settings(settings, block_size)
    return run_lib.fastest(
        run,
        f"sampler|{settings}",
        lambda graphdef: _jitted_sampler(graphdef, settings, run.tokenizer, run.mesh, block_size),
    )


def _jitted_sampler(
    graphdef: nnx.GraphDef,
    settings: sampling.SampleSettings,
    tokenizer: Tokenizer,
    mesh: jax.sharding.Mesh,
    block_size: int,
) -> sharding.OnMesh:
    """`make_sampler`'s function for the model graph `graphdef` (a block-diffusion model's
    when block_size > 0)."""

    def sample(params: Any, ids: jax.Array, valid: jax.Array, key: jax.Array):
        """The reverse process from ids (B, P) int32, valid (B, P) bool -> (canvas (B, P +
        gen_length) int32, nfe), the model `graphdef` with `params`."""

        def model() -> Any:
            """The model: `graphdef` merged with `params` where it is called (inside the loop)."""
            return nnx.merge(graphdef, params)  # merged inside the loop

        if block_size:
            block_model = block_sampling.from_transformer(model, block_size)
            canvas, nfe, _ = block_sampling.generate_blocks(
                block_model, ids, valid, key, settings, tokenizer.special_ids
            )
            return canvas, nfe
        cached = settings.kv_cache != "none"
        sampler_model = sampling.SamplerModel(
            body=lambda tokens, v: model().hidden(tokens, v, return_cache=cached),
            head=lambda hidden: model().head(hidden),
            window=(lambda tokens, v, cache, start: model().window(tokens, v, cache, start))
            if cached
            else None,
        )
        return sampling.generate(sampler_model, ids, valid, key, settings, tokenizer.special_ids)

    batch = sharding.batch_sharding(mesh)
    return sharding.jit_on_mesh(sample, mesh, in_shardings=(None, batch, batch, None))


def pad_batch(
    ids: np.ndarray, valid: np.ndarray, multiple: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """A batch grown to a multiple of `multiple` rows (copies of row 0): ids, valid and the
    number of real rows."""
    extra = -len(ids) % multiple
    return (
        np.concatenate([ids, np.repeat(ids[:1], extra, 0)]),
        np.concatenate([valid, np.repeat(valid[:1], extra, 0)]),
        len(ids),
    )

"""The runner's config sections: data, train, checkpoint, eval, mesh, and the samples printed at
the end of training. The method's own sections live beside the code that reads them
(`model.ModelConfig`, `kernels.KernelConfig`, `special_ids.SpecialIds`,
`diffusion.DiffusionConfig`, `optim.OptimConfig`, `sampling.SampleSettings`); `config.SECTIONS`
lists them all.

Each check raises `sections.SettingError` naming the key as the user types it
(`data.batch_size=0 is invalid; ...`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from llada_jax.data.sft import OVERFLOW
from llada_jax.sections import SettingError, check_choices, setting


def _at_least(obj: Any, minimums: dict[str, int]) -> None:
    """Each named integer key of `obj` is at least its minimum."""
    for name, minimum in minimums.items():
        value = getattr(obj, name)
        if value < minimum:
            raise SettingError(
                obj.SECTION, f"{{p}}{name}={value!r} is invalid; valid: an integer >= {minimum}"
            )


def _seconds(obj: Any, name: str, positive: bool = False, note: str = "") -> None:
    """`name` is a number of seconds >= 0 (> 0 when `positive`); NaN is refused too."""
    value = getattr(obj, name)
    if not (value > 0 if positive else value >= 0):
        bound = "> 0" if positive else ">= 0"
        raise SettingError(
            obj.SECTION,
            f"{{p}}{name}={value!r} is invalid; valid: a number of seconds {bound}{note}",
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the trainer reads, and how."""

    SECTION: ClassVar[str] = "data"

    datasets: tuple = setting((), "((prepared_dir, weight), ...); empty: the shipped corpus")
    tokenizer: str = setting(
        "", "sentencepiece .model or Hugging Face tokenizer.json; empty: the shipped one"
    )
    seq_len: int = setting(256, "tokens per row")
    batch_size: int = setting(16, "rows per step, global (all processes together)")
    segment_ids: bool = setting(False, "keep packed documents apart in attention")
    workers: int = setting(0, "grain worker processes (0: in the training process)")
    prefetch: int = setting(4, "batches prepared ahead")
    sft_overflow: str = setting("truncate", "SFT pairs longer than seq_len", OVERFLOW)
    sft_pairs_per_row: int = setting(1, "SFT pairs packed per row (> 1 uses segment ids)")

    def __post_init__(self) -> None:
        check_choices(self)  # the SFT keys whatever the objective: a typo is a typo
        _at_least(
            self,
            {"seq_len": 1, "batch_size": 1, "workers": 0, "prefetch": 0, "sft_pairs_per_row": 1},
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    SECTION: ClassVar[str] = "train"

    steps: int = setting(1000, "optimizer steps of the whole run")
    log_every: int = setting(10, "steps between progress lines (metrics averaged over them)")
    objective: str = setting("pretrain", "what is trained", ("pretrain", "sft"))
    init_from: str = setting("", "a workdir whose latest params start this run (e.g. converted)")
    max_skipped_in_a_row: int = setting(10, "NaN/Inf steps skipped in a row before the run stops")
    final_bound: bool = setting(False, "at the end: the held-out NLL bound (the eval section's)")
    compare_untrained: bool = setting(False, "at the end: the untrained model's samples and bound")
    keep_host_memory: bool = setting(
        True, "CPU: glibc keeps freed memory for the next step (host/memory.py)"
    )
    compilation_cache: str = setting(
        "auto", 'JAX compilation cache: auto | DIR | gs://... | "" (off)'
    )
    profile_steps: tuple = setting(
        (0, 0), "(first, count): trace the count steps after `first` to DIR/profile"
    )
    block_size_schedule: tuple = setting(
        (),
        "((block_size, until_step), ...): diffusion.block_size over phases (0: full "
        "sequence), then diffusion.block_size; e.g. AR to diffusion ((1, 200), (8, 400), (0, 900))",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self, {"log_every": 1, "max_skipped_in_a_row": 0})
        self._check_block_size_schedule()
        value = self.profile_steps
        pair = isinstance(value, tuple) and len(value) == 2
        if not (
            pair and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            raise SettingError(
                self.SECTION,
                f"{{p}}profile_steps={value!r} is invalid; valid: (first, count), two integers "
                ">= 0, tracing the count steps after the first `first` ((0, 0), count 0: off)",
            )

    def _check_block_size_schedule(self) -> None:
        """Pairs of integers (block size >= 0, a step), the steps increasing and below `steps`."""
        value = self.block_size_schedule
        pairs = isinstance(value, tuple) and all(
            isinstance(p, tuple)
            and len(p) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in p)
            for p in value
        )
        until = [p[1] for p in value] if pairs else []
        if not pairs or until != sorted(set(until)) or (until and until[-1] >= self.steps):
            raise SettingError(
                self.SECTION,
                f"{{p}}block_size_schedule={value!r} is invalid; valid: ((block_size, "
                f"until_step), ...), integers >= 0, the steps increasing and below "
                f"{{p}}steps={self.steps}, e.g. ((1, 200), (8, 400), (0, 900))",
            )

    def block_size_at(self, step: int, final: int) -> int:
        """The block size step `step` trains at: that of the schedule's first phase whose
        until_step is above it, else `final` (diffusion.block_size). 0: the full sequence."""
        for block_size, until in self.block_size_schedule:
            if step < until:
                return block_size
        return final


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and which are kept."""

    SECTION: ClassVar[str] = "checkpoint"

    save_every: int = setting(500, "steps between checkpoints (also at the end and on SIGTERM)")
    save_every_sec: float = setting(
        0.0, "also save when this many seconds passed since the last save; 0: off"
    )
    max_to_keep: int | None = setting(3, "most recent checkpoints kept; None: all", optional=True)
    keep_every: int | None = setting(
        0, "also keep every keep_every-th step for good; 0 or None: none", optional=True
    )
    async_save: bool = setting(True, "write in the background (only the device copy blocks)")
    wait_for_writer_sec: float = setting(
        600.0, "wait for another process still writing the workdir, seconds"
    )
    lock_stale_sec: float = setting(
        120.0, "gs:// workdirs: a writer lock not renewed this long is taken over"
    )

    def __post_init__(self) -> None:
        _at_least(self, {"save_every": 0})
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise SettingError(
                self.SECTION,
                f"{{p}}max_to_keep={self.max_to_keep!r} is invalid; valid: a positive integer, or "
                "None to keep every checkpoint",
            )
        if self.keep_every is not None and self.keep_every < 0:
            raise SettingError(
                self.SECTION,
                f"{{p}}keep_every={self.keep_every!r} is invalid; valid: an integer >= 0 (0 or "
                "None: none kept beyond {p}max_to_keep)",
            )
        _seconds(self, "wait_for_writer_sec")
        _seconds(self, "save_every_sec", note=" (0: off)")
        _seconds(self, "lock_stale_sec", positive=True)


@dataclasses.dataclass(frozen=True)
class PrintedSamples:
    """The `sample` section's keys besides the sampler's (`sampling.SampleSettings`): what the
    trainer samples at its end and the evaluation job with eval.generate."""

    SECTION: ClassVar[str] = "sample"

    num_samples: int = setting(4, "samples printed at the end of training (0: none)")
    prompts: tuple = setting(
        ("In the beginning", "And the LORD said unto Moses,", "Blessed are", "Chapter 3\n"),
        "the prompts those samples continue",
    )

    def __post_init__(self) -> None:
        _at_least(self, {"num_samples": 0})


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a checkpoint is evaluated (tools/evaluate.py, the trainer's final bound)."""

    SECTION: ClassVar[str] = "eval"

    num_tokens: int = setting(16384, "held-out tokens scored per checkpoint (whole rows)")
    num_samples: int = setting(8, "Monte-Carlo masks per row, stratified over how many are masked")
    batch_size: int = setting(16, "model rows per call (rows x samples, split over the devices)")
    seed: int = setting(0, "seeds the masks: every checkpoint and run is scored on the same ones")
    generate: bool = setting(True, "also sample the sample section's prompts (texts, NFE, tok/s)")
    tasks: tuple = setting((), "lm-evaluation-harness tasks run on each checkpoint (`eval` extra)")
    task_dir: str = setting("", "a directory of task YAML files (local tasks) besides lm-eval's")
    limit: int = setting(0, "documents per task; 0: all")
    mc_num: int = setting(128, "Monte-Carlo samples per loglikelihood request of the tasks")
    objective_draws: int = setting(0, "the run's own loss and gradient drawn this often; 0: off")
    objective_rows: int = setting(8, "held-out rows of the batch those draws share")

    def __post_init__(self) -> None:
        _at_least(
            self,
            {"num_tokens": 1, "num_samples": 1, "batch_size": 1, "mc_num": 1, "objective_rows": 1},
        )
        if self.limit < 0:
            raise SettingError(
                self.SECTION,
                f"{{p}}limit={self.limit!r} is invalid; valid: an integer >= 0 (0: all)",
            )
        if self.objective_draws == 1 or self.objective_draws < 0:
            raise SettingError(
                self.SECTION,
                f"{{p}}objective_draws={self.objective_draws!r} is invalid; valid: 0 (off) or >= 2",
            )

    def replace(self, **overrides: Any) -> EvalSettings:
        """A copy with the non-None `overrides` (a tool's flags) applied."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How the devices are arranged (llada_jax/sharding.py checks it against the machine)."""

    SECTION: ClassVar[str] = "mesh"

    shape: tuple = setting((-1, 1, 1), "(data, fsdp, tensor) device counts; -1: the rest")
    # TPU slices joined over the data-center network (DCN); the batch is split across them
    # (parameters are not), and `shape` is then the mesh within one slice.
    num_slices: int = setting(1, "TPU slices joined over the data-center network")

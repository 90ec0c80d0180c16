"""The run configuration: defaults, variants, command-line overrides, and their checks.

A config file in configs/ defines `get_config(variant: str = "") -> ConfigDict`, starting from
`base_config()` and applying its own sizes. Variants are `+`-joined names: the file's own plus the
shared ablation variants below, e.g. `configs/demo.py:cosine+stratified`. Overrides are
`--config.<section>.<key>=<value>`, type-checked against the default.

Each section is checked in one place, with errors that name the key as the user types it
(`diffusion.schedule`), the bad value and what would be valid: here the config file, keys,
variants and types; the values by what reads the section (`model.ModelConfig`,
`diffusion.DiffusionConfig`, `optim.make_optimizer`, `sampling.check_settings`, `run.build_run`
for the mesh, batch, data, train and checkpoint sections, the seed and sample.num_samples).
A key in OPTIONAL_KEYS also takes None: `--config.checkpoint.max_to_keep=None`.

Not `ml_collections.config_flags`: for an unknown override key it raises an AttributeError
traceback through absl's flag parser instead of listing the valid keys, a value of the wrong
type is reported as Python's `invalid literal for int()`, and it knows nothing of `+`-joined
variants' names, so its errors would not be one actionable line.

Importing this module defines no flag: a command-line entry point calls `define_flags()` (or
`from_command_line`, which does), so a host program importing the library keeps its own
`--config`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import traceback
from types import ModuleType
from typing import Any, Callable, Mapping

import ml_collections
from absl import flags

ConfigDict = ml_collections.ConfigDict

# Ablation variants shared by every config file.
COMMON_VARIANTS: dict[str, dict[str, Any]] = {
    "linear": {"diffusion.schedule": "linear"},
    "cosine": {"diffusion.schedule": "cosine"},
    "poly2": {"diffusion.schedule": "polynomial", "diffusion.power": 2.0},
    "stratified": {"diffusion.t_sampling": "stratified"},
    "bell": {"diffusion.t_density": "bell"},
    "complementary": {"diffusion.masking": "complementary"},
    "bf16": {"model.dtype": "bfloat16"},
}


def base_config() -> ConfigDict:
    """Every key a run reads, with defaults (LLaDA's objective and optimizer settings)."""
    c = ConfigDict()
    c.seed = 0  # seeds the initialization, the data order and every mask

    c.model = m = ConfigDict()
    m.vocab_size = 4096  # embedding rows; at least the tokenizer's vocabulary
    m.d_model = 256  # width of the residual stream
    m.n_layers = 4  # transformer blocks
    m.n_heads = 4  # query heads
    m.n_kv_heads = 4  # key/value heads (grouped-query attention when fewer); divides n_heads
    m.mlp_hidden = 688  # SwiGLU hidden width
    m.head_dim = 0  # per head; 0: d_model // n_heads
    m.rope_theta = 500_000.0  # RoPE base frequency
    m.norm_eps = 1e-5  # RMSNorm epsilon
    m.tie_embeddings = False  # logits from the embedding table (no lm_head)
    m.causal = False  # causal attention (autoregressive baselines); LLaDA is bidirectional
    m.scan_layers = True  # layers as one lax.scan over stacked parameters
    m.scan_unroll = 1  # layers per scan iteration (CPU configs unroll fully)
    m.attention = "xla"  # xla (einsums) | cudnn (NVIDIA GPUs) | splash (TPU); llada_jax/kernels
    m.matmul = "auto"  # auto | xla | mkl: who computes float32 matmuls on one CPU device
    m.remat = "none"  # none | full | dots | dots_no_batch | dots_attn: what the backward recomputes
    m.dtype = "float32"  # compute dtype: float32 | bfloat16
    m.param_dtype = "float32"  # storage dtype of the parameters
    m.init_std = 0.02  # std of the normal initialization
    m.mask_id = -1  # the mask token the model was trained with; -1: the tokenizer's
    m.eos_id = -1  # its end-of-sequence token; -1: the tokenizer's
    m.eot_id = -1  # its end-of-turn token (chat); -1: the tokenizer's

    c.diffusion = d = ConfigDict()
    d.schedule = "linear"  # mask-rate schedule alpha(t): linear | cosine | polynomial
    d.power = 2.0  # exponent of the polynomial schedule
    d.eps = 1e-3  # floor of the diffusion time: t is mapped to eps + (t_max - eps) t
    d.t_max = 1.0  # top of the diffusion time; < 1 clips the mask rates (not a bound)
    d.t_sampling = "iid"  # iid | stratified (antithetic t over the global batch)
    d.t_density = "uniform"  # uniform | bell (Beta(2, 2) t, importance-weighted: same ELBO)
    d.loss_weight = "elbo"  # elbo | none (mean masked cross-entropy: not a bound)
    d.masking = "independent"  # independent | paired | complementary (B/2 sequences, twice)
    d.random_length_prob = 0.01  # share of sequences cut to a random length (LLaDA: 1%)
    d.cfg_prompt_dropout = 0.0  # SFT: share of prompts masked whole (for classifier-free guidance)

    c.optim = o = ConfigDict()
    o.lr = 4e-4  # peak learning rate
    o.schedule = "wsd"  # wsd (warmup-stable-decay) | cosine | constant
    o.warmup_steps = 100  # linear warmup from 0, in steps (LLaDA-8B: 2000)
    o.final_lr = 1e-5  # learning rate at the last step
    o.decay_steps = 0  # wsd: linear decay to final_lr over the last decay_steps steps
    o.lr_drops = ()  # wsd: ((step, lr), ...) held from each step on
    o.weight_decay = 0.1  # AdamW decoupled weight decay
    o.weight_decay_on = "matrices"  # matrices (not norms) | all
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.95  # Adam beta2
    o.eps = 1e-8  # Adam epsilon
    o.clip_norm = 1.0  # global gradient-norm clip; 0 disables it
    o.grad_accum = 1  # micro-batches per step (the batch is split, the step is the same)

    c.data = a = ConfigDict()
    a.datasets = ()  # ((prepared_dir, weight), ...); empty: the shipped corpus
    a.tokenizer = ""  # sentencepiece .model or Hugging Face tokenizer.json; empty: the shipped one
    a.seq_len = 256  # tokens per row
    a.batch_size = 16  # rows per step, global (all processes together)
    a.segment_ids = False  # keep packed documents apart in attention
    a.workers = 0  # grain worker processes (0: in the training process)
    a.prefetch = 4  # batches prepared ahead
    a.sft_overflow = "truncate"  # SFT pairs longer than seq_len: truncate | drop
    a.sft_pairs_per_row = 1  # SFT pairs packed per row (> 1 uses segment ids)

    c.train = t = ConfigDict()
    t.steps = 1000  # optimizer steps of the whole run
    t.log_every = 10  # steps between progress lines (metrics are averaged over them)
    t.objective = "pretrain"  # pretrain | sft
    t.init_from = ""  # a workdir whose latest params start this run (e.g. converted HF weights)
    t.max_skipped_in_a_row = 10  # NaN/Inf steps skipped in a row before the run stops
    t.final_bound = False  # at the end: the held-out NLL bound (eval section's tokens and masks)
    t.compare_untrained = False  # at the end: the untrained model's samples and bound beside
    t.keep_host_memory = True  # CPU: glibc keeps freed memory for the next step (host/memory.py)
    t.compilation_cache = "auto"  # JAX compilation cache: auto | DIR | gs://... | "" (off)
    t.profile_steps = (0, 0)  # (first, count): trace the count steps after `first` to DIR/profile

    c.checkpoint = k = ConfigDict()
    k.save_every = 500  # steps between checkpoints (also saved at the end and on SIGTERM)
    k.save_every_sec = 0.0  # also save when this many seconds passed since the last save; 0: off
    k.max_to_keep = 3  # most recent checkpoints kept
    k.keep_every = 0  # also keep every keep_every-th step for good; 0: none
    k.async_save = True  # write in the background (only the device-to-host copy blocks)
    k.wait_for_writer_sec = 600.0  # wait for another process still writing the workdir, seconds
    k.lock_stale_sec = 120.0  # gs:// workdirs: a writer lock not renewed this long is taken over

    c.sample = p = ConfigDict()
    p.num_samples = 4  # samples printed at the end of training (0: none)
    p.prompts = ("In the beginning", "And the LORD said unto Moses,", "Blessed are", "Chapter 3\n")
    p.gen_length = 64  # generated tokens per prompt
    p.steps = 64  # sampling steps (forward passes) for the whole generation
    p.block_length = 64  # semi-autoregressive block; divides gen_length
    p.temperature = 0.0  # 0: greedy; > 0: Gumbel-max sampling
    p.remasking = "low_confidence"  # low_confidence | random
    p.cfg_scale = 0.0  # classifier-free guidance weight w; 0: none
    p.threshold = 0.0  # commit every token this confident per step (Fast-dLLM); 0: off
    p.ban_eos = False  # EOS is never proposed (its logit is -inf)
    p.eos_zero_confidence = False  # proposed end-of-turn (and at temperature 0 EOS): committed last
    p.kv_cache = "none"  # none | prefix | dual: K/V reused across a block's steps (Fast-dLLM)

    c.eval = e = ConfigDict()
    e.num_tokens = 16384  # held-out tokens scored per checkpoint (whole rows of data.seq_len)
    e.num_samples = 8  # Monte-Carlo masks per row, stratified over how many are masked
    e.batch_size = 16  # model rows per call (rows x samples together, split over the devices)
    e.seed = 0  # seeds the masks: every checkpoint and run is scored on the same ones
    e.generate = True  # also sample the sample section's prompts (texts, NFE, tokens/s)
    e.tasks = ()  # lm-evaluation-harness tasks run on each checkpoint (the `eval` extra)
    e.task_dir = ""  # a directory of task YAML files (local tasks) besides lm-eval's own
    e.limit = 0  # documents per task; 0: all
    e.mc_num = 128  # Monte-Carlo samples per loglikelihood request of the tasks
    e.objective_draws = 0  # the run's own training loss and gradient drawn this often; 0: off
    e.objective_rows = 8  # held-out rows of the batch those draws share

    c.mesh = ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor) device counts; -1: the remaining devices
    # TPU slices joined over the data-center network (DCN); the batch is split across them
    # (parameters are not), and `shape` is then the mesh within one slice.
    c.mesh.num_slices = 1
    return c


# Keys that also take None (`--config.checkpoint.max_to_keep=None`), and the type of their
# other values.
OPTIONAL_KEYS: dict[str, type] = {"checkpoint.max_to_keep": int, "checkpoint.keep_every": int}


class ConfigError(ValueError):
    """A config file, variant, key or value a user got wrong."""


def apply_variant(c: ConfigDict, variant: str, own: Mapping[str, Mapping[str, Any]]) -> ConfigDict:
    """Applies `+`-joined variant names from the file's `own` variants or COMMON_VARIANTS."""
    table = {**COMMON_VARIANTS, **own}
    for name in filter(None, variant.split("+")):
        if name not in table:
            raise ConfigError(
                f"unknown config variant {name!r}; valid variants: {', '.join(sorted(table))}"
            )
        for key, value in table[name].items():
            set_key(c, key, value)
    return c


def set_key(c: ConfigDict, dotted: str, value: Any) -> None:
    """Sets an existing dotted key; unknown keys and type changes are ConfigErrors."""
    *path, leaf = dotted.split(".")
    node = c
    for i, part in enumerate(path):
        if not isinstance(node, ConfigDict) or part not in node:
            raise ConfigError(_unknown(".".join(path[: i + 1]), node))
        node = node[part]
    if not isinstance(node, ConfigDict) or leaf not in node or isinstance(node[leaf], ConfigDict):
        raise ConfigError(_unknown(dotted, node))
    node[leaf] = _coerce(dotted, node[leaf], value)


def _unknown(dotted: str, node: Any) -> str:
    keys = sorted(k for k in node.keys()) if isinstance(node, ConfigDict) else []
    return f"unknown config key {dotted!r}; valid keys here: {', '.join(keys)}"


def _coerce(dotted: str, default: Any, value: Any) -> Any:
    """`value` (a string from the command line, or a Python value) as the type of `default`
    (or None, for a key in OPTIONAL_KEYS)."""
    kind = OPTIONAL_KEYS.get(dotted, type(default))
    if isinstance(value, str) and kind is not str:
        text = value
        if kind is bool and value.lower() in ("true", "false"):
            return value.lower() == "true"
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"config.{dotted}={text!r} is not a valid {kind.__name__}") from None
    if value is None and dotted in OPTIONAL_KEYS:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"config.{dotted}={value!r} is not a valid {kind.__name__} (default {default!r})"
        )
    return value


def load_config_file(spec: str) -> ConfigDict:
    """`path.py[:variant]` -> ConfigDict from that file's `get_config(variant)`."""
    path, _, variant = spec.partition(":")
    get_config: Callable[[str], ConfigDict] = getattr(run_config_file(path), "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path!r} defines no get_config(variant)")
    return get_config(variant)


def run_config_file(path: str) -> ModuleType:
    """The config file at `path`, run as a module. A missing file, a directory, a file that is
    not Python, and an error raised while it runs (with the file's line) are ConfigErrors."""
    expected = "expected a .py file, e.g. configs/demo.py"
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; {expected}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; {expected}")
    if not path.endswith(".py"):
        raise ConfigError(f"config file {path!r} is not a Python file; {expected}")
    module_spec = importlib.util.spec_from_file_location("llada_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}:{e.lineno}: {e.msg}") from None
    except Exception as e:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        where = f"{path}:{lines[-1]}" if lines else path
        raise ConfigError(f"config file {where}: {type(e).__name__}: {e}") from None
    return module


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.key=value` arguments from the rest of argv."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                raise ConfigError(f"override {arg!r} needs a value: --config.{key}=VALUE")
            overrides.append((key, value))
        else:
            rest.append(arg)
    return rest, overrides


def load(spec: str, overrides: list[tuple[str, str]]) -> ConfigDict:
    """Config file + variant + command-line overrides, checked, and locked against new keys."""
    c = load_config_file(spec)
    for key, value in overrides:
        set_key(c, key, value)
    c.lock()
    return c


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--config=configs/<name>.py[:variant]` in `flag_values`, once (a second call does
    nothing). For command-line entry points: the library itself defines no flag."""
    if "config" not in flag_values:
        flags.DEFINE_string(
            "config",
            None,
            "Config file and variant: configs/<name>.py[:variant]",
            flag_values=flag_values,
        )


def from_command_line(argv: list[str]) -> ConfigDict:
    """Parses absl flags from argv without its --config.* overrides, then loads --config with
    them (defining --config first if the entry point has not)."""
    define_flags()
    rest, overrides = split_overrides(argv[1:])
    flags.FLAGS([argv[0]] + rest)
    if not flags.FLAGS.config:
        raise ConfigError("--config=configs/<name>.py[:variant] is required")
    return load(flags.FLAGS.config, overrides)

"""The run configuration: defaults, variants, command-line overrides, and their checks.

A config file in configs/ defines `get_config(variant: str = "") -> ConfigDict`, starting from
`base_config()` and applying its own sizes. Variants are `+`-joined names: the file's own plus the
shared ablation variants below, e.g. `configs/demo.py:cosine+stratified`. Overrides are
`--config.<section>.<key>=<value>`, type-checked against the default.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Callable, Mapping

import ml_collections
from absl import flags

flags.DEFINE_string("config", None, "Config file and variant: configs/<name>.py[:variant]")

ConfigDict = ml_collections.ConfigDict

# Ablation variants shared by every config file.
COMMON_VARIANTS: dict[str, dict[str, Any]] = {
    "linear": {"diffusion.schedule": "linear"},
    "cosine": {"diffusion.schedule": "cosine"},
    "poly2": {"diffusion.schedule": "polynomial", "diffusion.power": 2.0},
    "stratified": {"diffusion.t_sampling": "stratified"},
    "bf16": {"model.dtype": "bfloat16"},
}


def base_config() -> ConfigDict:
    """Every key a run reads, with defaults (LLaDA's objective and optimizer settings)."""
    c = ConfigDict()
    c.seed = 0
    c.model = ConfigDict(
        dict(
            vocab_size=4096,
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=4,
            mlp_hidden=688,
            head_dim=0,
            rope_theta=500_000.0,
            norm_eps=1e-5,
            tie_embeddings=False,
            causal=False,
            scan_layers=True,
            scan_unroll=1,
            attention="xla",
            matmul="auto",
            remat="none",
            dtype="float32",
            param_dtype="float32",
            init_std=0.02,
        )
    )
    c.diffusion = ConfigDict(
        dict(
            schedule="linear",
            power=2.0,
            eps=1e-3,
            t_sampling="iid",
            random_length_prob=0.01,
            cfg_prompt_dropout=0.0,
        )
    )
    c.optim = ConfigDict(
        dict(
            lr=4e-4,
            schedule="wsd",
            warmup_steps=2000,
            final_lr=1e-5,
            decay_steps=0,
            lr_drops=(),
            weight_decay=0.1,
            weight_decay_on="matrices",
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            grad_accum=1,
        )
    )
    # datasets: ((prepared_dir, weight), ...); empty = the shipped corpus. tokenizer: "" = shipped.
    # SFT: pairs longer than seq_len are truncated or dropped; pairs_per_row > 1 packs pairs.
    c.data = ConfigDict(
        dict(
            datasets=(),
            tokenizer="",
            seq_len=256,
            batch_size=16,
            segment_ids=False,
            workers=0,
            prefetch=4,
            sft_overflow="truncate",
            sft_pairs_per_row=1,
        )
    )
    # init_from: a workdir whose latest checkpoint's params start this run (e.g. converted HF
    # weights); max_skipped_in_a_row: NaN/Inf steps skipped in a row before the run stops.
    # keep_host_memory: on CPU, glibc keeps freed memory for the next step
    # (llada_jax/host/memory.py): faster steps, a higher resident peak.
    c.train = ConfigDict(
        dict(
            steps=1000,
            log_every=10,
            objective="pretrain",
            init_from="",
            max_skipped_in_a_row=10,
            keep_host_memory=True,
        )
    )
    # wait_for_writer_sec: how long a (re)started trainer waits for another process that still
    # writes the workdir (e.g. the job it replaces, saving after SIGTERM) before it gives up.
    c.checkpoint = ConfigDict(
        dict(
            save_every=500, max_to_keep=3, keep_every=0, async_save=True, wait_for_writer_sec=600.0
        )
    )
    c.sample = ConfigDict(
        dict(
            num_samples=4,
            prompts=(
                "In the beginning",
                "And the LORD said unto Moses,",
                "Blessed are",
                "Chapter 3\n",
            ),
            gen_length=64,
            steps=64,
            block_length=64,
            temperature=0.0,
            remasking="low_confidence",
        )
    )
    c.mesh = ConfigDict(dict(shape=(-1, 1, 1)))
    return c


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
    """`value` (a string from the command line, or a Python value) as the type of `default`."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value
        if kind is bool and value.lower() in ("true", "false"):
            return value.lower() == "true"
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"config.{dotted}={text!r} is not a valid {kind.__name__}") from None
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
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (expected e.g. configs/demo.py)")
    module_spec = importlib.util.spec_from_file_location("llada_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config: Callable[[str], ConfigDict] = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {path!r} defines no get_config(variant)")
    return get_config(variant)


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


def from_command_line(argv: list[str]) -> ConfigDict:
    """Parses absl flags from argv without its --config.* overrides, then loads --config with
    them."""
    rest, overrides = split_overrides(argv[1:])
    flags.FLAGS([argv[0]] + rest)
    if not flags.FLAGS.config:
        raise ConfigError("--config=configs/<name>.py[:variant] is required")
    return load(flags.FLAGS.config, overrides)

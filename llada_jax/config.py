"""The run configuration: defaults, variants, command-line overrides, and their checks.

A config file in configs/ defines `get_config(variant: str = "") -> ConfigDict`, starting from
`base_config()` and applying its own sizes. Variants are `+`-joined names: the file's own plus the
shared ablation variants below, e.g. `configs/demo.py:cosine+stratified`. Overrides are
`--config.<section>.<key>=<value>`, type-checked against the default.

Each section is a frozen dataclass (SECTIONS; llada_jax/sections.py): its keys, defaults,
one-line descriptions and checks are written there once, and `base_config()` is made of them
(`describe()` lists them). Errors name the key as the user types it (`diffusion.schedule`), the
bad value and what would be valid: here the config file, keys, variants and types; each
section's values in its dataclass (`check` builds them all); what depends on the machine (mesh,
batch, files) in `run.build_run`. A key marked optional also takes None:
`--config.checkpoint.max_to_keep=None`.

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

from llada_jax import block_sampling, cli, run_sections, sections
from llada_jax.diffusion import DiffusionConfig
from llada_jax.kernels.choice import KernelConfig
from llada_jax.model import ModelConfig
from llada_jax.optim import OptimConfig
from llada_jax.sampling import SampleSettings
from llada_jax.special_ids import SpecialIds

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


# Every section of a run's config, each the config keys of its dataclasses (sections.py).
SECTIONS: dict[str, tuple[type, ...]] = {
    "model": (ModelConfig,),
    "kernels": (KernelConfig,),
    "tokens": (SpecialIds,),
    "diffusion": (DiffusionConfig,),
    "optim": (OptimConfig,),
    "data": (run_sections.DataConfig,),
    "train": (run_sections.TrainConfig,),
    "checkpoint": (run_sections.CheckpointConfig,),
    "sample": (SampleSettings, run_sections.PrintedSamples),
    "eval": (run_sections.EvalSettings,),
    "mesh": (run_sections.MeshConfig,),
}

# Keys that moved to another section: an override naming the old key says where it went.
MOVED_KEYS = {
    "model.attention": "kernels.attention",
    "model.matmul": "kernels.matmul",
    "model.mask_id": "tokens.mask_id",
    "model.eos_id": "tokens.eos_id",
    "model.eot_id": "tokens.eot_id",
}


def upgrade(saved: dict) -> dict:
    """A config saved as JSON (a checkpoint's) with the keys that moved since (MOVED_KEYS) in
    their new sections; `saved` itself is left as it is."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for old, new in MOVED_KEYS.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if key in out.get(section, {}):
            out.setdefault(new_section, {})[new_key] = out[section].pop(key)
    return out


def base_config() -> ConfigDict:
    """Every key a run reads, with its default (LLaDA's objective and optimizer settings): the
    seed, then each section of SECTIONS."""
    c = ConfigDict()
    c.seed = 0  # seeds the initialization, the data order and every mask
    for name, classes in SECTIONS.items():
        c[name] = sections.defaults(*classes)
    return c


# Keys that also take None (`--config.checkpoint.max_to_keep=None`), and the type of their
# other values.
OPTIONAL_KEYS: dict[str, type] = {
    f"{name}.{f.name}": type(f.default)
    for name, classes in SECTIONS.items()
    for cls in classes
    for f in sections.keys(cls)
    if f.metadata.get("optional")
}


def describe() -> str:
    """Every config key, one per line: `section.key = default  # what it sets`."""
    lines = ["seed = 0  # seeds the initialization, the data order and every mask"]
    for name, classes in SECTIONS.items():
        for cls in classes:
            for f in sections.keys(cls):
                lines.append(f"{name}.{f.name} = {f.default!r}  # {sections.doc(f)}")
    return "\n".join(lines)


def check(c: ConfigDict) -> None:
    """Builds every section, so that a wrong value anywhere is one SettingError before a run
    starts. (The diffusion section's mask id is the tokenizer's, given when the run is built;
    no check of the section depends on it, so 0 stands in for it here.)"""
    if not isinstance(c.seed, int) or c.seed < 0:
        raise ValueError(f"seed={c.seed!r} is invalid; valid: an integer >= 0")
    for name, classes in SECTIONS.items():
        for cls in classes:
            given = {"mask_id": 0} if cls is DiffusionConfig else {}
            sections.from_section(cls, c[name], **given)
    if c.diffusion.block_size and c.sample.num_samples:  # the samples printed at the end
        settings = sections.from_section(SampleSettings, c.sample)
        block_sampling.block_settings(settings, c.diffusion.block_size)
    seq_len = c.data.seq_len
    given = [("diffusion.block_size", c.diffusion.block_size)] + [
        ("train.block_size_schedule", block) for block, _ in c.train.block_size_schedule
    ]
    for key, block in given:
        if block and seq_len % block:
            raise ValueError(
                f"{key}: block size {block} does not divide data.seq_len={seq_len}; valid: a "
                "divisor of it, or 0 (the full-sequence model)"
            )


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
    if dotted in MOVED_KEYS:
        raise ConfigError(f"config key {dotted!r} is now {MOVED_KEYS[dotted]!r}")
    *path, leaf = dotted.split(".")
    node = c
    for i, part in enumerate(path):
        if not isinstance(node, ConfigDict) or part not in node:
            raise ConfigError(_unknown(".".join(path[: i + 1]), node))
        node = node[part]
    if not isinstance(node, ConfigDict) or leaf not in node or isinstance(node[leaf], ConfigDict):
        raise ConfigError(_unknown(dotted, node))
    node[leaf] = coerce(dotted, node[leaf], value)


def _unknown(dotted: str, node: Any) -> str:
    keys = sorted(k for k in node.keys()) if isinstance(node, ConfigDict) else []
    return f"unknown config key {dotted!r}; valid keys here: {', '.join(keys)}"


def coerce(dotted: str, default: Any, value: Any) -> Any:
    """`value` (a string from the command line, or a Python value) as the type of `default`
    (or None, for a key in OPTIONAL_KEYS); a ConfigError names it `config.<dotted>`."""
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


def from_command_line(argv: list[str], doc: str = "") -> ConfigDict:
    """Parses absl flags from argv without its --config.* overrides, then loads --config with
    them (defining --config first if the entry point has not). --help prints `doc` (the entry
    point's usage), every config key (`describe`) and the program's flags."""
    define_flags()
    rest, overrides = split_overrides(argv[1:])
    usage = "--config=configs/<name>.py[:variant] [--config.<section>.<key>=<value> ...]"
    cli.parse([argv[0]] + rest, f"{doc.strip()}\n\n{usage}\n\nconfig keys:\n{describe()}")
    if not flags.FLAGS.config:
        raise ConfigError("--config=configs/<name>.py[:variant] is required")
    return load(flags.FLAGS.config, overrides)

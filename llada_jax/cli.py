"""Command-line plumbing the tools share: flags made from a config section's dataclass, --help,
and settings read back from the flags.

  cli.define_section_flags(sampling.SampleSettings)       # --gen_length, --steps, ... with help
  cli.parse(argv, __doc__)                                # --help prints the doc and the flags
  settings = cli.section_from_flags(sampling.SampleSettings)

A tool that works on a saved run defines them with `overrides=True` instead: each flag then
defaults to the run's own value, and `overrides_from_flags` gives those the user set.

A flag takes its name, type, default and help from the dataclass field (sections.py), so a new
setting reaches the tool without touching it.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from absl import flags

from llada_jax import sections

T = TypeVar("T")
HELP_ARGS = ("--help", "-help", "-h", "--helpfull", "--helpshort")


def define_section_flags(
    cls: type, flag_values: flags.FlagValues = flags.FLAGS, overrides: bool = False
) -> None:
    """One flag per config key of section dataclass `cls`, with its default and description;
    with `overrides`, defaulting to None (the section's value in the run the tool loads)."""
    for f in sections.keys(cls):
        kind, choices = type(f.default), f.metadata.get("choices")
        doc = f.metadata["doc"] if choices else sections.doc(f)  # absl shows an enum's choices
        if overrides:
            doc += f" (default: the run's {cls.SECTION}.{f.name})"
        default = None if overrides else f.default
        common = dict(name=f.name, default=default, help=doc, flag_values=flag_values)
        if choices:
            flags.DEFINE_enum(enum_values=list(choices), **common)
        elif kind is bool:
            flags.DEFINE_bool(**common)
        elif kind is int:
            flags.DEFINE_integer(**common)
        elif kind is float:
            flags.DEFINE_float(**common)
        elif kind is str:
            flags.DEFINE_string(**common)
        elif kind is tuple:
            flags.DEFINE_list(**common)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {kind.__name__}")


def section_from_flags(
    cls: type[T], flag_values: flags.FlagValues = flags.FLAGS, **fixed: Any
) -> T:
    """`cls` built from the flags `define_section_flags` made, the keys in `fixed` (e.g. a
    block model's block_length) set to those values instead. Raises ValueError naming the flag
    (`--block_length=5 does not divide --gen_length=64`)."""
    given = {f.name: flag_values[f.name].value for f in sections.keys(cls)}
    try:
        return cls(**{**given, **fixed})
    except sections.SettingError as e:
        raise ValueError(e.with_prefix("--")) from None


def overrides_from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The keys of section `cls` whose flags (`define_section_flags(..., overrides=True)`) were
    set, with their values (lists as tuples), checked by the section against its defaults.
    Raises ValueError naming the flag."""
    given = {}
    for f in sections.keys(cls):
        value = flag_values[f.name].value
        if value is not None:
            given[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        cls(**given)
    except sections.SettingError as e:
        raise ValueError(e.with_prefix("--")) from None
    return given


def parse(argv: list[str], doc: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Parses `argv` into `flag_values`, after `exit_on_help`."""
    exit_on_help(argv, doc, flag_values)
    flag_values(argv)


def exit_on_help(argv: list[str], doc: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """With --help (or -h) in `argv`, prints `doc` and every flag this program defined, with its
    default and help, and exits with status 0 (absl's own --help exits 1 and lists its flags
    too)."""
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print(help_text(doc, flag_values))
        sys.exit(0)


def help_text(doc: str, flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """`doc`, then one line per flag of the program with its default where it has one (those of
    the libraries it imports, absl's and Orbax's, left out)."""
    lines = [doc.strip(), "", "flags:"]
    for module, defined in sorted(flag_values.flags_by_module_dict().items()):
        if not (module == "__main__" or module.startswith("llada_jax") or module.endswith(".py")):
            continue
        for flag in sorted(defined, key=lambda f: f.name):
            shown = "" if flag.default is None else f" (default: {_shown(flag.default)})"
            lines.append(f"  --{flag.name}: {flag.help}{shown}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)

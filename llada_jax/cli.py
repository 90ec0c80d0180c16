"""Command-line plumbing the tools share: flags made from a config section's dataclass, --help,
and settings read back from the flags.

  cli.define_section_flags(sampling.SampleSettings)       # --gen_length, --steps, ... with help
  cli.parse(argv, __doc__)                                # --help prints the doc and the flags
  settings = cli.section_from_flags(sampling.SampleSettings)

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


def define_section_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """One flag per config key of section dataclass `cls`, with its default and description."""
    for f in sections.keys(cls):
        kind, choices = type(f.default), f.metadata.get("choices")
        common = dict(name=f.name, default=f.default, help=sections.doc(f), flag_values=flag_values)
        if choices:  # absl shows the choices itself
            common["help"] = f.metadata["doc"]
            flags.DEFINE_enum(enum_values=list(choices), **common)
        elif kind is bool:
            flags.DEFINE_bool(**common)
        elif kind is int:
            flags.DEFINE_integer(**common)
        elif kind is float:
            flags.DEFINE_float(**common)
        elif kind is str:
            flags.DEFINE_string(**common)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {kind.__name__}")


def section_from_flags(cls: type[T], flag_values: flags.FlagValues = flags.FLAGS) -> T:
    """`cls` built from the flags `define_section_flags` made. Raises ValueError naming the flag
    (`--block_length=5 does not divide --gen_length=64`)."""
    try:
        return cls(**{f.name: flag_values[f.name].value for f in sections.keys(cls)})
    except sections.SettingError as e:
        raise ValueError(e.with_prefix("--")) from None


def parse(argv: list[str], doc: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Parses `argv` into `flag_values`; with --help (or -h), prints `doc` and every flag this
    program defined, with its default and help, and exits with status 0."""
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print(help_text(doc, flag_values))
        sys.exit(0)
    flag_values(argv)


def help_text(doc: str, flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """`doc`, then one line per flag of the program (those of the libraries it imports, absl's
    and Orbax's, left out)."""
    lines = [doc.strip(), "", "flags:"]
    for module, defined in sorted(flag_values.flags_by_module_dict().items()):
        if not (module == "__main__" or module.startswith("llada_jax") or module.endswith(".py")):
            continue
        for flag in sorted(defined, key=lambda f: f.name):
            lines.append(f"  --{flag.name}: {flag.help} (default: {_shown(flag.default)})")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)

"""Command-line plumbing the tools share: flags made from a config section's dataclass, --help,
and settings read back from the flags.

  cli.define_section_flags(sampling.SampleSettings)       # --gen_length, ... with their help
  cli.parse(argv, __doc__)                                # --help prints the doc and the flags
  settings = cli.section_with_flags(run.sample_settings)  # the run's, with the flags given

The tools work on a saved run, so each flag defaults to the run's own value:
`section_with_flags` gives the run's section with the flags the user set, `overrides_from_flags`
those flags alone (for a caller that applies them itself).

A flag takes its name, type, default and help from the dataclass field (sections.py), so a new
setting reaches the tool without touching it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, TypeVar

from absl import flags

from llada_jax import sections

T = TypeVar("T")
HELP_ARGS = ("--help", "-help", "-h", "--helpfull", "--helpshort")


def define_section_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """One flag per config key of section dataclass `cls`, with its description, defaulting to
    None: the section's value in the run the tool loads."""
    for f in sections.keys(cls):
        kind, choices = type(f.default), f.metadata.get("choices")
        doc = f.metadata["doc"] if choices else sections.doc(f)  # absl shows an enum's choices
        doc += f" (default: the run's {cls.SECTION}.{f.name})"
        common = dict(name=f.name, default=None, help=doc, flag_values=flag_values)
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


def _given(cls: type, flag_values: flags.FlagValues) -> dict[str, Any]:
    """The keys of section `cls` whose override flags were set, with their values (lists as
    tuples)."""
    given = {}
    for f in sections.keys(cls):
        value = flag_values[f.name].value
        if value is not None:
            given[f.name] = tuple(value) if isinstance(value, list) else value
    return given


def section_with_flags(base: T, flag_values: flags.FlagValues = flags.FLAGS, **fixed: Any) -> T:
    """`base` (the section of the run a tool loads) with the keys whose flags
    (`define_section_flags`) were set, then the keys in `fixed` (e.g. a block model's
    block_length), replaced. Raises ValueError naming the flags, and saying which of them the
    user did not give (they are the run's): `--block_length=8 does not divide --gen_length=12
    (--block_length: the run's sample.block_length)`."""
    cls = type(base)
    given = _given(cls, flag_values)
    try:
        return dataclasses.replace(base, **{**given, **fixed})
    except sections.SettingError as e:
        from_run = [
            f.name
            for f in sections.keys(cls)
            if "{p}" + f.name in e.template and f.name not in given and f.name not in fixed
        ]
        note = ", ".join(f"--{k}: the run's {cls.SECTION}.{k}" for k in from_run)
        raise ValueError(e.with_prefix("--") + (f" ({note})" if note else "")) from None


def overrides_from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The keys of section `cls` whose flags (`define_section_flags`) were set, with their
    values (lists as tuples), checked by the section against its defaults. Raises ValueError
    naming the flag."""
    given = _given(cls, flag_values)
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

"""Config sections as frozen dataclasses: each setting's name, type, default, one-line
description and checks, written once.

  @dataclasses.dataclass(frozen=True)
  class SampleSettings:
      SECTION: ClassVar[str] = "sample"
      gen_length: int = setting(64, "generated tokens per prompt")

      def __post_init__(self) -> None:
          check_choices(self)
          if self.gen_length < 1:
              raise SettingError(self.SECTION, "{p}gen_length=... is invalid; valid: ...")

`config.base_config()` is made of the sections' defaults (`defaults`); a job builds each section
from its ConfigDict by name (`from_section`); a command-line tool makes its flags from the same
fields (`llada_jax.cli`). A field made without `setting` is not a config key: the job passes it
(e.g. the tokenizer's mask id).

A check raises `SettingError`, whose message names the key with the prefix of where the user typed
it: `sample.gen_length=0` for a config, `--gen_length=0` for tools/sample.py (`with_prefix`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")
_DOC, _CHOICES = "doc", "choices"


class SettingError(ValueError):
    """A setting's value a user got wrong. `template` writes each key as `{p}name`; the message
    puts the section in front (`sample.name`), `with_prefix` anything else (`--name`)."""

    def __init__(self, section: str, template: str):
        self.section, self.template = section, template
        super().__init__(self.with_prefix(f"{section}."))

    def with_prefix(self, prefix: str) -> str:
        """The message with every key written `prefix` + name."""
        return self.template.replace("{p}", prefix)


def setting(default: Any, doc: str, choices: tuple[Any, ...] = (), **marks: bool) -> Any:
    """A dataclass field that is a config key: its default, its one-line description (a tool's
    --help, `config.describe`) and, for a closed set of values, the valid choices. `marks` tag it
    for its section's readers (the model's `shape=True`)."""
    return dataclasses.field(default=default, metadata={_DOC: doc, _CHOICES: choices, **marks})


def keys(cls: type) -> list[dataclasses.Field]:
    """The fields of section dataclass `cls` that are config keys, in order."""
    return [f for f in dataclasses.fields(cls) if _DOC in f.metadata]


def doc(field: dataclasses.Field) -> str:
    """A config key's one-line description, with its choices when it has a closed set."""
    choices = field.metadata[_CHOICES]
    return field.metadata[_DOC] + (f" ({' | '.join(map(str, choices))})" if choices else "")


def defaults(*classes: type) -> ml_collections.ConfigDict:
    """A ConfigDict of the config keys of `classes` (one config section) and their defaults."""
    return ml_collections.ConfigDict({f.name: f.default for cls in classes for f in keys(cls)})


def from_section(cls: type[T], section: Mapping[str, Any] | Any, **given: Any) -> T:
    """`cls` built by name from the values of its config keys in `section` (a ConfigDict or a
    mapping; other keys there are ignored), plus `given` (fields that are not config keys, or
    overrides). Raises SettingError from the dataclass's checks."""
    values = {f.name: section[f.name] for f in keys(cls) if f.name in section}
    return cls(**{**values, **given})


def check_choices(obj: Any) -> None:
    """Every config key of `obj` that has choices holds one of them, else a SettingError."""
    for f in keys(type(obj)):
        choices, value = f.metadata[_CHOICES], getattr(obj, f.name)
        if choices and value not in choices:
            raise SettingError(
                obj.SECTION, f"{{p}}{f.name}={value!r} is invalid; valid choices: {choices}"
            )

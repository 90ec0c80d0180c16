"""The token ids the method gives a meaning to: mask, end of sequence, end of turn, padding.

The tokenizer provides them (its named special tokens); a model trained with other ids (a
converted LLaDA-8B: mask 126336, EOS 126081, end of turn 126348) names them in its config's
`tokens` section, and those win. The network reads none of them; the objective, the sampler and
the likelihood do.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from llada_jax.sections import SettingError, keys, setting


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Special token ids; -1 where there is none (in a config: take the tokenizer's)."""

    SECTION: ClassVar[str] = "tokens"

    mask_id: int = setting(-1, "the mask token the model was trained with; -1: the tokenizer's")
    eos_id: int = setting(-1, "its end-of-sequence token; -1: the tokenizer's")
    eot_id: int = setting(-1, "its end-of-turn token (chat); -1: the tokenizer's")
    pad_id: int = setting(-1, "the token left pads hold (never attended to); -1: the tokenizer's")

    def __post_init__(self) -> None:
        for f in keys(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise SettingError(
                    self.SECTION,
                    f"{{p}}{f.name}={value!r} is invalid; valid: -1 (the tokenizer's) or a "
                    "token id >= 0",
                )

    def over(self, base: SpecialIds) -> SpecialIds:
        """These ids where set (not -1), `base`'s elsewhere."""
        return SpecialIds(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) >= 0
                else getattr(base, f.name)
                for f in keys(SpecialIds)
            }
        )

    def check_below(self, vocab_size: int) -> None:
        """Every id set here is below `vocab_size` (the model's embedding rows)."""
        for f in keys(type(self)):
            if getattr(self, f.name) >= vocab_size:
                raise SettingError(
                    self.SECTION,
                    f"{{p}}{f.name}={getattr(self, f.name)} is invalid; valid: -1 (the "
                    f"tokenizer's) or an id below model.vocab_size={vocab_size}",
                )

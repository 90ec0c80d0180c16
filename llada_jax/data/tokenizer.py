"""Tokenizers with the special tokens a masked-diffusion LM needs: sentencepiece models, and
Hugging Face `tokenizer.json` files (the `tokenizers` package), behind one interface.

`load_tokenizer(path)` picks by the path: a `tokenizer.json` (or a directory holding one) is a
Hugging Face tokenizer, anything else a sentencepiece model. The shipped model
(`assets/tokenizer.model`, made by `tools/train_tokenizer.py`) is lossless: `decode(encode(text))
== text` for any text, since it keeps whitespace and newlines as they are and falls back to
bytes instead of an unknown id.

Special ids (pad, EOS, mask, end-of-turn) come from the tokenizer: named pieces of a
sentencepiece model; for a Hugging Face tokenizer, the `eos_token` / `pad_token` / `mask_token` /
`eot_token` of the `tokenizer_config.json` beside it and the tokens in `HF_SPECIAL_TOKENS`. A
model trained with other ids overrides them (`with_special_ids`, from the run config's `tokens`
section).
"""

import copy
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from llada_jax import files
from llada_jax.special_ids import SpecialIds

PAD_PIECE = "<pad>"
EOS_PIECE = "<|eos|>"
MASK_PIECE = "<|mdm_mask|>"
EOT_PIECE = "<|eot|>"

# Hugging Face tokenizers: the tokens looked for, in order, when tokenizer_config.json names none
# (LLaDA-8B's are <|mdm_mask|>, <|endoftext|> and <|eot_id|>).
HF_SPECIAL_TOKENS = {
    "mask": ("<|mdm_mask|>", "<|mask|>", "<mask>", "[MASK]"),
    "eos": ("<|endoftext|>", "</s>", "<|eos|>", "<|end_of_text|>"),
    "eot": ("<|eot_id|>", "<|im_end|>", "<|eot|>"),
}

DEFAULT_TOKENIZER_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model"
)


class Tokenizer:
    """What every tokenizer offers: encode / decode, its vocabulary size, the special ids and a
    fingerprint of its file (datasets record it; a run refuses data of another tokenizer)."""

    path: str
    fingerprint: str  # first 16 hex digits of the SHA-256 of the tokenizer file
    pad_id: int
    eos_id: int
    mask_id: int
    eot_id: int  # end of turn, closing each chat message

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the model's vocabulary must hold at least these)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, with no BOS or EOS added."""
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` of each text, in order."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of a 1-D sequence of ids; special tokens (pad, EOS, ...) decode to ""."""
        raise NotImplementedError

    @property
    def special_ids(self) -> SpecialIds:
        """The mask, EOS, end-of-turn and pad ids, as the sampler and the objective take them."""
        return SpecialIds(self.mask_id, self.eos_id, self.eot_id, self.pad_id)

    def with_special_ids(self, ids: SpecialIds) -> "Tokenizer":
        """A copy whose special ids are `ids`' where set (not -1), else this one's."""
        out = copy.copy(self)
        for name, value in dataclasses.asdict(ids.over(self.special_ids)).items():
            setattr(out, name, value)
        return out


def _read(path: str) -> bytes:
    if not files.isfile(path):
        raise FileNotFoundError(f"Tokenizer file not found: {path}")
    return files.read_bytes(path)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus the ids of its pad, EOS, mask and end-of-turn pieces."""

    def __init__(self, model_file: str) -> None:
        """Loads `model_file`. Raises FileNotFoundError if it does not exist, ValueError if the
        model lacks one of the special pieces."""
        model_bytes = _read(model_file)
        self.path = files.resolve(model_file)
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()[:16]
        self.pad_id, self.eos_id, self.mask_id, self.eot_id = (
            self._special_id(model_file, piece)
            for piece in (PAD_PIECE, EOS_PIECE, MASK_PIECE, EOT_PIECE)
        )

    def _special_id(self, model_file: str, piece: str) -> int:
        """Returns the id of `piece`, or raises ValueError if the model lacks it."""
        piece_id = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(piece_id) != piece:
            raise ValueError(f"Tokenizer model {model_file} has no special piece {piece!r}")
        return piece_id

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special and byte pieces included."""
        return self._sp.vocab_size()

    @property
    def unk_id(self) -> int:
        """Id of the unknown piece (never produced, thanks to byte fallback)."""
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, with no BOS or EOS added."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` of each text, in order (one SentencePiece call)."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of a 1-D sequence of ids."""
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` package), with the special ids of the
    `tokenizer_config.json` beside it (see the module docstring)."""

    def __init__(self, path: str) -> None:
        """Loads `path` (a tokenizer.json, or a directory holding one). Raises FileNotFoundError
        if it does not exist, ValueError if it is not a tokenizer.json or has no EOS token. One
        without a mask token (an autoregressive model's) has mask_id -1: the model config must
        name one."""
        from tokenizers import Tokenizer as _HF

        if files.isdir(path):
            path = files.join(path, "tokenizer.json")
        data = _read(path)
        self.path = files.resolve(path)
        try:
            self._tok = _HF.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
            raise ValueError(
                f"{path} is not a Hugging Face tokenizer.json ({e}); a sentencepiece model is "
                "its .model file"
            ) from None
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        config = self._config(files.join(files.dirname(self.path), "tokenizer_config.json"))
        template = config.get("chat_template")  # Jinja, rendered by chat.chat_prompt
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        self.template_tokens = {  # the special-token strings a chat template may use
            name: value.get("content") if isinstance(value, dict) else value
            for name, value in config.items()
            if name in ("bos_token", "eos_token", "pad_token", "unk_token") and value
        }
        self.eos_id = self._special(config.get("eos_token"), "eos")
        self.mask_id = self._special(config.get("mask_token"), "mask", default=-1)  # -1: none
        self.eot_id = self._special(config.get("eot_token"), "eot", default=self.eos_id)
        self.pad_id = self._special(config.get("pad_token"), "pad", default=self.eos_id)

    @staticmethod
    def _config(path: str) -> dict:
        if not files.isfile(path):
            return {}
        return json.loads(files.read_text(path))

    def _special(self, named: object, kind: str, default: int | None = None) -> int:
        """The id of the token tokenizer_config.json names (a string or {"content": ...}), else
        of the first of HF_SPECIAL_TOKENS[kind] in the vocabulary, else `default`."""
        if isinstance(named, dict):
            named = named.get("content")
        candidates = ([named] if isinstance(named, str) else []) + list(
            HF_SPECIAL_TOKENS.get(kind, ())
        )
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        if default is not None:
            return default
        raise ValueError(
            f"tokenizer {self.path} has no {kind} token (looked for {candidates}); name it in "
            f"the config: tokens.{kind}_id=ID"
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, with no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` of each text, in order (one batched call)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of a 1-D sequence of ids, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def is_hf_tokenizer(path: str) -> bool:
    """Whether `path` names a Hugging Face tokenizer: a *.json file, or a directory holding a
    tokenizer.json."""
    if files.isdir(path):
        return files.isfile(files.join(path, "tokenizer.json"))
    return path.endswith(".json")


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path` (see the module docstring); "" is the shipped one."""
    if not path:
        return default_tokenizer()
    return HFTokenizer(path) if is_hf_tokenizer(path) else SentencePieceTokenizer(path)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """Returns the tokenizer shipped in `llada_jax/data/assets/` (loaded once)."""
    return SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)

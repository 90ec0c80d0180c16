"""Sentencepiece tokenizer with the special tokens a masked-diffusion LM needs.

The shipped model (`assets/tokenizer.model`, made by `tools/train_tokenizer.py`) is
lossless: `decode(encode(text)) == text` for any text, since it keeps whitespace and
newlines as they are and falls back to bytes instead of an unknown id.
"""

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_PIECE = "<pad>"
EOS_PIECE = "<|eos|>"
MASK_PIECE = "<|mdm_mask|>"
EOT_PIECE = "<|eot|>"

DEFAULT_TOKENIZER_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model"
)


class Tokenizer:
    """A sentencepiece model plus the ids of its pad, EOS, mask and end-of-turn pieces."""

    def __init__(self, model_file: str) -> None:
        """Loads `model_file`.

        Raises:
          FileNotFoundError: if `model_file` does not exist.
          ValueError: if the model lacks one of the special pieces.
        """
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"Tokenizer model file not found: {model_file}")
        self.path = os.path.abspath(model_file)
        with open(model_file, "rb") as f:
            model_bytes = f.read()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self._fingerprint = hashlib.sha256(model_bytes).hexdigest()[:16]
        self._pad_id, self._eos_id, self._mask_id, self._eot_id = (
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
    def pad_id(self) -> int:
        """Id of the padding piece."""
        return self._pad_id

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence piece."""
        return self._eos_id

    @property
    def mask_id(self) -> int:
        """Id of the diffusion mask piece."""
        return self._mask_id

    @property
    def eot_id(self) -> int:
        """Id of the end-of-turn piece used in chat formatting."""
        return self._eot_id

    @property
    def unk_id(self) -> int:
        """Id of the unknown piece (never produced, thanks to byte fallback)."""
        return self._sp.unk_id()

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the SHA-256 of the model file's bytes."""
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, with no BOS or EOS added."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Returns the ids of each text, as `encode` would."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of a 1-D sequence of ids; control pieces (pad, EOS) decode to ""."""
        return self._sp.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """Returns the tokenizer shipped in `llada_jax/data/assets/` (loaded once)."""
    return Tokenizer(DEFAULT_TOKENIZER_PATH)

"""Hugging Face tokenizer files for our tokenizers: a sentencepiece BPE model converted into an
equivalent `tokenizer.json`, written with a `tokenizer_config.json` and `special_tokens_map.json`
naming the special tokens, so that `HFTokenizer` and `transformers.AutoTokenizer` load it.

The conversion reproduces sentencepiece's encoding exactly (same ids for every text) for models
trained as `llada_jax/data/tokenizer_training.py` does, and refuses other models:

- Merging. Sentencepiece BPE starts from characters and repeatedly merges the adjacent pair whose
  concatenation is a (normal) piece of highest score, the leftmost on ties. A `models.BPE` gets
  every split of every normal piece into two normal pieces as a merge, ranked by the piece's
  score, highest first, so its lowest-rank-first merging picks the same pairs. Characters outside
  the vocabulary fall back to byte pieces in both.
- Whitespace. Sentencepiece replaces spaces by "▁" (no dummy prefix, runs of spaces kept) and
  merges across the whole text; the pre-tokenizer does the same replacement and splits the text
  into words (a run of "▁" and the characters up to the next "▁"), and into single digits where
  the model was trained with split_digits. That is exact because no piece spans such a boundary
  (the trainer keeps pieces within words); the conversion checks it for every piece.
- User-defined pieces ("<|mdm_mask|>", "<|eot|>", "\\n") are matched whole wherever they occur,
  longest first, before merging: added tokens, which Hugging Face splits out the same way.
- Control pieces (<pad>, <|eos|>) are never produced from text by sentencepiece, so they are no
  added tokens (which Hugging Face would match in text): plain vocabulary entries that no merge
  produces. The decoder turns them into "" (and <unk> into sentencepiece's " ⁇ "), as
  sentencepiece's decoding does, then "▁" into " ", byte pieces into their bytes, and fuses.

`transformers` registers the special tokens tokenizer_config.json names (eos, pad, unk, mask,
end of turn) as added tokens, so it, unlike sentencepiece and `HFTokenizer`, reads "<|eos|>" or
"<pad>" typed in a text as that token; other texts get the same ids.
"""

import json
import re

from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizerModel

from llada_jax import files
from llada_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

SPACE = "\u2581"  # sentencepiece's "▁", which replaces " "
_PIECE = sp_pb2.ModelProto.SentencePiece


def _model_proto(model_file: str) -> sp_pb2.ModelProto:
    """The parsed sentencepiece model at `model_file`."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(files.read_bytes(model_file))
    return proto


def _unsupported(proto: sp_pb2.ModelProto) -> list[str]:
    """What of the model the conversion cannot reproduce exactly (empty: convertible)."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    types = {p.type for p in proto.pieces}
    scores = [p.score for p in proto.pieces if p.type == _PIECE.NORMAL and len(p.piece) > 1]
    problems = {
        f"model type {sp_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} (only BPE)": (
            trainer.model_type != sp_pb2.TrainerSpec.BPE
        ),
        f"normalization rule {normalizer.name!r} (only identity)": normalizer.name != "identity"
        or bool(normalizer.precompiled_charsmap),
        "add_dummy_prefix": normalizer.add_dummy_prefix,
        "remove_extra_whitespaces": normalizer.remove_extra_whitespaces,
        "escape_whitespaces off": not normalizer.escape_whitespaces,
        "a denormalizer": bool(proto.denormalizer_spec.precompiled_charsmap),
        "byte_fallback off": not trainer.byte_fallback,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "unused pieces": _PIECE.UNUSED in types,
        "pieces of equal score": len(set(scores)) < len(scores),
        f"user-defined pieces with {SPACE!r}": any(
            p.type == _PIECE.USER_DEFINED and SPACE in p.piece for p in proto.pieces
        ),
    }
    return [name for name, present in problems.items() if present]


def _merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every (left, right) pair of normal pieces whose concatenation is a normal piece, ordered by
    the score of that piece, highest first (its splits left to right). Only where two splits of
    one piece overlap (x+y and y+z both that piece, x y z adjacent) could the order differ from
    sentencepiece's (leftmost first); no text of the shipped corpus meets that."""
    normal = {p.piece for p in proto.pieces if p.type == _PIECE.NORMAL}
    merged = sorted(
        (p for p in proto.pieces if p.type == _PIECE.NORMAL and len(p.piece) > 1),
        key=lambda p: -p.score,
    )
    return [
        (p.piece[:i], p.piece[i:])
        for p in merged
        for i in range(1, len(p.piece))
        if p.piece[:i] in normal and p.piece[i:] in normal
    ]


def _pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
    """Spaces to "▁" and words split as sentencepiece's trainer splits them; digits apart."""
    steps = [
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=False),
        pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated"),
    ]
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


def _decoder(proto: sp_pb2.ModelProto) -> decoders.Decoder:
    """Sentencepiece's decoding: control pieces to "", <unk> to its surface, "▁" to " ", byte
    pieces to bytes, all joined."""
    surfaces = {
        p.piece: proto.trainer_spec.unk_surface if p.type == _PIECE.UNKNOWN else ""
        for p in proto.pieces
        if p.type in (_PIECE.CONTROL, _PIECE.UNKNOWN)
    }
    whole = [decoders.Replace(Regex(f"^{re.escape(p)}$"), s) for p, s in surfaces.items()]
    return decoders.Sequence(
        [*whole, decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )


def _check_words(tok: HFTokenizerModel, proto: sp_pb2.ModelProto, model_file: str) -> None:
    """Raises ValueError if a normal piece spans a pre-tokenizer boundary (then merging within
    words would differ from sentencepiece's merging across the whole text)."""
    for p in (p for p in proto.pieces if p.type == _PIECE.NORMAL):
        words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(p.piece)]
        if words != [p.piece]:
            raise ValueError(
                f"cannot convert {model_file} exactly: its piece {p.piece!r} spans words {words}"
            )


def tokenizer_json(model_file: str) -> str:
    """The text of a Hugging Face `tokenizer.json` giving the ids of the sentencepiece BPE model
    `model_file` (see the module docstring). Raises ValueError, naming what, for a model it
    cannot convert exactly."""
    proto = _model_proto(model_file)
    problems = _unsupported(proto)
    if problems:
        raise ValueError(f"cannot convert {model_file} exactly: {', '.join(problems)}")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = HFTokenizerModel(
        models.BPE(
            vocab=vocab,
            merges=_merges(proto),
            unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
            byte_fallback=True,
        )
    )
    tok.pre_tokenizer = _pre_tokenizer(proto.trainer_spec.split_digits)
    tok.decoder = _decoder(proto)
    tok.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=False)
            for p in proto.pieces
            if p.type == _PIECE.USER_DEFINED
        ]
    )
    _check_words(tok, proto, model_file)
    return tok.to_str(pretty=True)


def _tokenizer_json_text(tok: Tokenizer) -> str:
    """`tok`'s tokenizer.json: converted from a sentencepiece model, or its own file as is (UTF-8,
    as `HFTokenizer` reads it, so written back byte for byte)."""
    if isinstance(tok, SentencePieceTokenizer):
        return tokenizer_json(tok.path)
    if isinstance(tok, HFTokenizer):
        return files.read_bytes(tok.path).decode("utf-8")
    raise TypeError(f"cannot write Hugging Face files for a {type(tok).__name__}")


def _existing_config(tok: Tokenizer) -> dict:
    """The tokenizer_config.json beside an HFTokenizer's file ({} if none, or not one)."""
    if not isinstance(tok, HFTokenizer):
        return {}
    path = files.join(files.dirname(tok.path), "tokenizer_config.json")
    return json.loads(files.read_text(path)) if files.isfile(path) else {}


def _content(token: object) -> object:
    """A token of a config, written as a string or as {"content": ...}: its string."""
    return token.get("content") if isinstance(token, dict) else token


def _special_tokens(tok: Tokenizer, hf: HFTokenizerModel) -> dict[str, str]:
    """The special tokens of `tok` (its special ids, overrides included) by config key."""
    ids = tok.special_ids
    named = {
        "eos_token": ids.eos_id,
        "pad_token": ids.pad_id,
        "mask_token": ids.mask_id,
        "eot_token": ids.eot_id,
    }
    if isinstance(tok, SentencePieceTokenizer):
        named["unk_token"] = tok.unk_id
    return {key: hf.id_to_token(i) for key, i in named.items() if i >= 0}


def _config(tok: Tokenizer, special: dict[str, str], model_max_length: int) -> dict:
    """tokenizer_config.json: an HFTokenizer's own, with the special tokens set to `special`
    where it names others or none, the end-of-turn token among the extra special tokens
    (transformers 5's list, else 4's), and the keys missing added."""
    config = _existing_config(tok)
    for key, token in special.items():
        if _content(config.get(key)) != token:
            config[key] = token
    extra_key = (
        "extra_special_tokens"
        if isinstance(config.get("extra_special_tokens"), list)
        else "additional_special_tokens"
    )
    extra = config.get(extra_key) or []
    if special["eot_token"] not in [_content(t) for t in extra]:
        config[extra_key] = [*extra, special["eot_token"]]
    defaults = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    return {**defaults, **config}


def write_tokenizer_files(tok: Tokenizer, out_dir: str, model_max_length: int) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json of `tok` into
    `out_dir` (see the module docstring); `HFTokenizer(out_dir)` gives `tok`'s ids and special
    ids. Returns the names of the files written."""
    data = _tokenizer_json_text(tok)
    special = _special_tokens(tok, HFTokenizerModel.from_str(data))
    config = _config(tok, special, model_max_length)
    special_map = {k: config[k] for k in (*special, "additional_special_tokens") if k in config}
    texts = {
        "tokenizer.json": data,
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
    }
    files.makedirs(out_dir)
    for name, text in texts.items():
        files.write_atomically(files.join(out_dir, name), text)
    return list(texts)

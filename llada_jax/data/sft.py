"""SFT batch building: prepared single-turn records -> fixed-shape rows for the train step.

Pure numpy (no JAX). Notation: L = ``seq_len``, B = number of rows of a batch.

Record layout (written by the SFT data preparation): one int32 array per single-turn pair,
``[prompt_len, *prompt_ids, *response_ids]``; the response already ends with an end-of-turn id,
multi-turn dialogues were already split into single-turn pairs (prompt = full history).

A row is a dict of three (L,) arrays:
    tokens      (L,) int32: prompt + response (+ more pairs when packed) + EOS padding;
    prompt_mask (L,) bool:  True exactly at prompt positions (never noised);
    segment_ids (L,) int32: pair index 1, 2, 3 ... within the row (no packing: all 1).

EOS padding semantics, as in LLaDA's SFT: the EOS tokens that pad a row up to L are part of the
response of the pair they follow: they are masked, trained on and counted in that pair's answer
length. With packing, the trailing padding of a row therefore carries the segment id of the LAST
pair of the row (it is that pair's response tail), so every position of a row belongs to a pair
and no position has segment id 0.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

OVERFLOW = ("truncate", "drop")

Row = dict[str, np.ndarray]
Pair = tuple[np.ndarray, np.ndarray]


def decode_record(record: Union[bytes, bytearray, memoryview, np.ndarray]) -> Pair:
    """Splits one prepared record into (prompt_ids, response_ids): prompt_ids (prompt_len,)
    int32 and response_ids (N - 1 - prompt_len,) int32 (copies).

    record: int32 array (N,) = ``[prompt_len, *prompt_ids, *response_ids]``, or its raw bytes
    (little-endian int32, 4 * N bytes). Raises ValueError on an empty / malformed record or a
    prompt_len outside [0, N - 1].
    """
    if isinstance(record, (bytes, bytearray, memoryview)):
        raw = bytes(record)
        if len(raw) % 4:
            raise ValueError(
                f"decode_record: record of {len(raw)} bytes is not a whole number of int32 ids"
            )
        arr = np.frombuffer(raw, dtype="<i4").astype(np.int32)
    else:
        arr = np.asarray(record)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"decode_record: expected a 1-D integer array, got shape {arr.shape} "
                f"dtype {arr.dtype}"
            )
        arr = arr.astype(np.int32)
    if arr.size == 0:
        raise ValueError("decode_record: empty record (expected [prompt_len, *prompt, *response])")
    n_prompt = int(arr[0])
    if not 0 <= n_prompt <= arr.size - 1:
        raise ValueError(
            f"decode_record: prompt_len={n_prompt} is invalid for a record of {arr.size - 1} ids"
        )
    return arr[1 : 1 + n_prompt].copy(), arr[1 + n_prompt :].copy()


def _check_overflow(overflow: str) -> None:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r} is invalid; valid choices: {OVERFLOW}")


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} is invalid; valid: an integer >= 2")


def fit_pair(
    prompt: np.ndarray, response: np.ndarray, seq_len: int, overflow: str
) -> Optional[Pair]:
    """Makes a pair, prompt (P,) and response (R,) int token ids, fit in ``seq_len`` = L (>= 2)
    tokens -> (prompt (P',) int32, response (R',) int32) with P' + R' <= L, or None (dropped).

    A pair with len(prompt) + len(response) <= seq_len is returned unchanged. Otherwise:
      * overflow="drop": returns None (the caller counts the drop).
      * overflow="truncate":
          - if len(prompt) < seq_len: the whole prompt is kept and the response is truncated from
            the RIGHT to seq_len - len(prompt) tokens (>= 1);
          - if len(prompt) >= seq_len: the prompt is truncated from the LEFT to its last
            seq_len - 1 tokens (the end of the history, next to the answer, is what matters) and
            the response keeps its first token, so every truncated pair still has >= 1 response
            position (a non-zero answer length). If the response is empty, only the prompt is
            truncated (to seq_len - 1 tokens), leaving >= 1 position for EOS padding.
        In both cases the result has exactly seq_len tokens (or seq_len - 1 with an empty
        response). A truncated response loses its end-of-turn id.
    """
    _check_overflow(overflow)
    _check_seq_len(seq_len)
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    response = np.asarray(response, np.int32).reshape(-1)
    if prompt.size + response.size <= seq_len:
        return prompt, response
    if overflow == "drop":
        return None
    if prompt.size < seq_len:
        return prompt, response[: seq_len - prompt.size]
    keep = seq_len - 1
    return prompt[prompt.size - keep :], response[:1]


def _row_from_pairs(pairs: Sequence[Pair], seq_len: int, eos_id: int) -> Row:
    """Concatenates pairs (total length <= seq_len) into one row; see ``pack_pairs``."""
    tokens = np.full((seq_len,), eos_id, np.int32)
    prompt_mask = np.zeros((seq_len,), bool)
    segment_ids = np.zeros((seq_len,), np.int32)
    pos = 0
    for seg, (prompt, response) in enumerate(pairs, start=1):
        n_p, n_r = prompt.size, response.size
        tokens[pos : pos + n_p] = prompt
        tokens[pos + n_p : pos + n_p + n_r] = response
        prompt_mask[pos : pos + n_p] = True
        segment_ids[pos : pos + n_p + n_r] = seg
        pos += n_p + n_r
    if pos > seq_len:
        raise ValueError(f"pairs of {pos} tokens do not fit in seq_len={seq_len}")
    # Trailing EOS padding = response tail of the last pair (same segment).
    segment_ids[pos:] = max(len(pairs), 1)
    return {"tokens": tokens, "prompt_mask": prompt_mask, "segment_ids": segment_ids}


def _as_pair(prompt: np.ndarray, response: np.ndarray, seq_len: int) -> Pair:
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    response = np.asarray(response, np.int32).reshape(-1)
    if prompt.size + response.size > seq_len:
        raise ValueError(
            f"pair of {prompt.size} + {response.size} tokens does not fit in seq_len={seq_len}; "
            "call fit_pair first"
        )
    return prompt, response


def pad_pair(prompt: np.ndarray, response: np.ndarray, seq_len: int, eos_id: int) -> Row:
    """One unpacked row: prompt (P,) int + response (R,) int + EOS padding (`eos_id`) up to
    ``seq_len`` = L -> {"tokens": (L,) int32, "prompt_mask": (L,) bool (True on the P prompt
    positions), "segment_ids": (L,) int32 all 1}. The L - P - R padding EOS belong to the
    response. P + R <= L (use ``fit_pair`` first); raises ValueError if the pair is longer.
    """
    return _row_from_pairs([_as_pair(prompt, response, seq_len)], seq_len, eos_id)


def pack_pairs(pairs: Sequence[Pair], seq_len: int, eos_id: int) -> list[Row]:
    """Greedy first-fit packing of several pairs per row (deterministic).

    Pairs are taken in the given order; each goes into the first (oldest) row that still has
    room for all of its prompt + response tokens, else it opens a new row. A pair is never split
    across rows. Within a row, pairs keep their arrival order and get segment ids 1, 2, 3 ...;
    the row is padded at the end with EOS, and that padding carries the LAST pair's segment id
    (it is that pair's response tail: masked, trained on, counted in its answer length).

    pairs: (prompt (P_i,) int, response (R_i,) int), each P_i + R_i <= seq_len = L; eos_id: the
    padding token id. -> the rows in the order they were opened, each {"tokens": (L,) int32,
    "prompt_mask": (L,) bool, "segment_ids": (L,) int32 in 1..k}. Raises ValueError if a pair is
    longer than seq_len.
    """
    bins: list[list[Pair]] = []
    used: list[int] = []
    for prompt, response in pairs:
        pair = _as_pair(prompt, response, seq_len)
        n = pair[0].size + pair[1].size
        for i in range(len(bins)):
            if used[i] + n <= seq_len:
                bins[i].append(pair)
                used[i] += n
                break
        else:
            bins.append([pair])
            used.append(n)
    return [_row_from_pairs(b, seq_len, eos_id) for b in bins]


def sft_batch(
    records: Sequence[Union[bytes, np.ndarray]],
    seq_len: int,
    eos_id: int,
    overflow: str = "truncate",
    pack: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Records -> one batch of stacked rows.

    Each record is decoded (``decode_record``), fitted (``fit_pair`` with ``overflow``), then
    either padded one pair per row (pack=False, B = number of kept pairs) or packed
    (pack=True, ``pack_pairs``, B = number of rows). B is data dependent; the caller chooses how
    many records to pass to get its global batch size.

    -> batch {"tokens": (B, L) int32, "prompt_mask": (B, L) bool, "segment_ids": (B, L) int32}
    (B may be 0) and stats {"dropped": pairs dropped (overflow="drop"), "truncated": pairs
    shortened (overflow="truncate")}.
    """
    _check_overflow(overflow)
    _check_seq_len(seq_len)
    pairs: list[Pair] = []
    dropped = truncated = 0
    for rec in records:
        prompt, response = decode_record(rec)
        fitted = fit_pair(prompt, response, seq_len, overflow)
        if fitted is None:
            dropped += 1
            continue
        if fitted[0].size + fitted[1].size < prompt.size + response.size:
            truncated += 1
        pairs.append(fitted)
    if pack:
        rows = pack_pairs(pairs, seq_len, eos_id)
    else:
        rows = [pad_pair(p, r, seq_len, eos_id) for p, r in pairs]
    batch = {
        "tokens": np.zeros((0, seq_len), np.int32),
        "prompt_mask": np.zeros((0, seq_len), bool),
        "segment_ids": np.zeros((0, seq_len), np.int32),
    }
    if rows:
        batch = {k: np.stack([r[k] for r in rows]) for k in batch}
    return batch, {"dropped": dropped, "truncated": truncated}


def fixed_batch(
    records: Sequence[Union[bytes, np.ndarray]],
    num_rows: int,
    seq_len: int,
    eos_id: int,
    overflow: str = "truncate",
    pack: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``sft_batch`` cut or filled to exactly ``num_rows`` rows (static shapes for the step).

    Rows past ``num_rows`` are left out (their pairs counted in stats["unplaced"]); missing rows
    are fillers with ``valid`` all False and segment id 0, which attend nowhere and add nothing
    to the loss.

    -> batch with tokens, prompt_mask, segment_ids and valid (num_rows, L), and the stats of
    ``sft_batch`` plus "unplaced".
    """
    batch, stats = sft_batch(records, seq_len, eos_id, overflow, pack)
    kept = min(num_rows, batch["tokens"].shape[0])
    unplaced = int(sum(len(np.unique(r)) for r in batch["segment_ids"][kept:]))
    fill = num_rows - kept
    out = {
        "tokens": np.concatenate(
            [batch["tokens"][:kept], np.full((fill, seq_len), eos_id, np.int32)]
        ),
        "prompt_mask": np.concatenate(
            [batch["prompt_mask"][:kept], np.zeros((fill, seq_len), bool)]
        ),
        "segment_ids": np.concatenate(
            [batch["segment_ids"][:kept], np.zeros((fill, seq_len), np.int32)]
        ),
        "valid": np.arange(num_rows)[:, None] < np.full((1, seq_len), kept),
    }
    return out, dict(stats, unplaced=unplaced)

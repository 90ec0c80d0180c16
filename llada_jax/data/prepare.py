"""Offline data preparation: text / JSONL inputs -> tokenized ArrayRecord shards + metadata.json.

The driver behind `tools/prepare_data.py`. Reading the inputs is `inputs.py`, chat formatting
`chat.py`, the plan of work units and the worker that writes a shard `shards.py` (which also
describes the records). A rerun skips the shards that are complete for the same inputs and
options and removes the stale ones; metadata.json is written last, so a directory that has it
is complete. It lists every shard with its record count and size, which is all a training run
needs to know before it reads a record (no shard is listed or opened at start).

The output directory may be a `gs://` URI (the `gcs` extra): shards are written locally, then
uploaded (each before its sidecar), and metadata.json last, in one upload; a rerun resumes
there as it does locally. Inputs are local files.

Documents:
  * plain text: split on `doc_separator` (bytes-level `str.split` semantics; "" = one document
    per file, the default); whitespace-only pieces are skipped.
  * JSONL, format "pretrain": one document per line, the string field `text_field`.
  * JSONL, format "sft": one dialogue per line, either {"prompt": ..., "response": ...
    [, "system": ...]} or {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}.

Held out: with `validation_fraction`, documents are assigned by a hash of their content to the
training split (`output_dir`) or the validation split (`output_dir/validation/`, prepared the
same way, read by the evaluation job).

Bad records (invalid UTF-8, invalid JSON, a missing or non-string field, empty text, a
malformed dialogue) are counted and reported with file and line; they are not fatal. An input
that cannot be read at all, or inputs that give no record (empty, or shorter than one row),
raise `InputError` (the CLI prints "error: ..." and exits 2); no metadata.json is written then.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from llada_jax import files
from llada_jax.data import chat, shards
from llada_jax.data.inputs import InputError, Piece, check_readable, expand_inputs, is_jsonl
from llada_jax.data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer, load_tokenizer

CREATED_BY = f"llada_jax.data.prepare/{shards.PREPARE_VERSION}"
METADATA_FILE = "metadata.json"
VALIDATION_DIR = "validation"  # the held-out split, inside a prepared directory
FORMATS = ("pretrain", "sft")
DEFAULT_SEQ_LEN = 2048
DEFAULT_SHARD_BYTES = 16 << 20
BAD_RECORDS_PRINTED = 20


def prepare(
    inputs: Sequence[str],
    output_dir: str,
    format: str = "pretrain",  # noqa: A002
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    tokenizer_path: str | None = None,
    text_field: str = "text",
    doc_separator: str = "",
    workers: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    validation_fraction: float = 0.0,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Prepares `inputs` into `output_dir` (see the module docstring); returns the metadata.

    validation_fraction: the share of documents held out, by a hash of their content, into
    `output_dir/validation/` (a prepared directory of its own, which the evaluation job reads);
    the rest go to `output_dir`. 0: every document is prepared into `output_dir`, and a
    validation split an earlier run made there is removed (it would overlap the training data).

    The returned dict is what `metadata.json` holds plus two run statistics not written there:
    "_tokens_per_second" (tokens tokenized / wall time of this run's work) and "_shards_written"
    (shards made by this run; the others were complete and skipped). Progress goes to a tqdm
    bar (tokens/s) when `progress`; summary lines (and bad-record locations) go to `log`.

    Raises InputError when an input cannot be read at all (nothing in `output_dir` is changed
    when this is found while planning, before any work) or a split gives no record (its shards
    stay, without a metadata.json: training refuses the directory); ValueError on bad options
    or a gs:// `output_dir` without the gcs extra installed.
    """
    if files.is_uri(output_dir):
        output_dir = files.resolve(output_dir)  # first: no gcsfs is one line, before any work
    _check_options(format, seq_len, shard_bytes, validation_fraction)
    tokenizer_path = os.path.abspath(tokenizer_path or DEFAULT_TOKENIZER_PATH)
    try:
        tok = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load tokenizer: {e}") from e
    input_files = expand_inputs(inputs)
    for path in input_files:
        if format == "sft" and not is_jsonl(path):
            raise InputError(f"format 'sft' needs JSONL inputs (*.jsonl / *.json), got {path}")
        check_readable(path)
    options = shards.Options(
        format,
        tokenizer_path,
        tok.fingerprint,
        seq_len if format == "pretrain" else 0,
        text_field,
        doc_separator,
    )
    held_out = files.join(output_dir, VALIDATION_DIR)
    if not validation_fraction:
        if files.isdir(held_out):
            files.rmtree(held_out)
        return _prepare_split(
            inputs, input_files, output_dir, options, tok, workers, shard_bytes, progress, log
        )
    train = dataclasses.replace(options, split="train", validation_fraction=validation_fraction)
    meta = _prepare_split(
        inputs, input_files, output_dir, train, tok, workers, shard_bytes, progress, log
    )
    validation = dataclasses.replace(train, split="validation")
    meta["_validation"] = _prepare_split(
        inputs, input_files, held_out, validation, tok, workers, shard_bytes, progress, log
    )
    return meta


def _prepare_split(
    inputs: Sequence[str],
    input_files: list[str],
    output_dir: str,
    options: shards.Options,
    tok: Tokenizer,
    workers: int | None,
    shard_bytes: int,
    progress: bool,
    log: Callable[[str], Any],
) -> dict[str, Any]:
    """Prepares the documents of `options.split` into `output_dir`; returns its metadata.
    Raises InputError, writing no metadata.json, if they give no record."""
    fmt = options.format

    # The plan, and what of it is already done.
    units = shards.plan_units(input_files, options, shard_bytes)
    names = [shards.shard_name(fmt, i, len(units)) for i in range(len(units))]
    specs = [shards.unit_spec(u, options) for u in units]
    files.makedirs(output_dir)
    results = [shards.complete_result(files.join(output_dir, n), s) for n, s in zip(names, specs)]
    jobs = [
        shards.Job(i, files.join(output_dir, names[i]), units[i], options, specs[i])
        for i, r in enumerate(results)
        if r is None
    ]
    skipped = len(units) - len(jobs)
    if skipped:
        log(f"skipped {skipped} complete shards")
    meta_path = files.join(output_dir, METADATA_FILE)
    if jobs and files.exists(meta_path):
        files.remove(meta_path)  # it would describe shards about to change

    # The work, then the clean-up of what an earlier plan left.
    start = time.perf_counter()
    tokenized = _run_jobs(jobs, results, workers, options.tokenizer_path, progress, fmt, skipped)
    rate = tokenized / (time.perf_counter() - start) if tokenized else 0.0
    _remove_stale_shards(output_dir, fmt, names)

    meta = _metadata(options, tok, inputs, input_files, units, names, results)
    if not meta["num_records"]:
        if files.exists(meta_path):
            files.remove(meta_path)  # an earlier version's record of an empty dataset
        raise InputError(_no_records(inputs, options, meta))
    shards.write_json(meta_path, meta)
    _log_summary(log, meta, len(jobs), skipped, rate, meta_path)
    meta["_tokens_per_second"] = rate
    meta["_shards_written"] = len(jobs)
    return meta


def _check_options(
    format: str,  # noqa: A002
    seq_len: int,
    shard_bytes: int,
    validation_fraction: float,
) -> None:
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "pretrain" and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")


def _run_jobs(
    jobs: list[shards.Job],
    results: list[dict[str, Any] | None],
    workers: int | None,
    tokenizer_path: str,
    progress: bool,
    format: str,  # noqa: A002
    skipped: int,
) -> int:
    """Writes the jobs' shards (in worker processes unless one is enough), filling `results`
    in; returns the tokens tokenized."""
    if not jobs:
        return 0
    count, done, tokenized = len(results), skipped, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=None, unit="tok", unit_scale=True, desc=f"{format} shards", dynamic_ncols=True
        )
        bar.set_postfix_str(f"{done}/{count} shards")
    workers = max(1, workers or os.cpu_count() or 1)
    pool = None
    if workers == 1 or len(jobs) == 1:
        shards.init_worker(tokenizer_path)
        written = map(shards.write_shard, jobs)
    else:
        # spawn, not fork: the parent may hold JAX's threads.
        pool = multiprocessing.get_context("spawn").Pool(
            min(workers, len(jobs)), initializer=shards.init_worker, initargs=(tokenizer_path,)
        )
        written = pool.imap(shards.write_shard, jobs, chunksize=1)
    try:
        for job, result in zip(jobs, written):
            results[job.index] = result
            done += 1
            tokenized += result["tokenized_tokens"]
            if bar is not None:
                bar.update(result["tokenized_tokens"])
                bar.set_postfix_str(f"{done}/{count} shards")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return tokenized


def _remove_stale_shards(output_dir: str, format: str, names: list[str]) -> None:  # noqa: A002
    """Shards of an earlier plan of this format, and leftover temporaries."""
    keep = set(names) | {n + ".json" for n in names}
    for name in files.listdir(output_dir):
        if shards.SHARD_RE.match(name) and name.startswith(format + "-") and name not in keep:
            files.remove(files.join(output_dir, name))


def _bad_record_locations(
    units: list[list[Piece]], results: list[dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """The total of bad records, and the first ones' file and absolute line."""
    listed: list[dict[str, Any]] = []
    total = 0
    lines_before: dict[str, int] = {}  # per file: lines in its pieces seen so far
    for unit, result in zip(units, results):
        offsets = []
        for piece, n in zip(unit, result["piece_newlines"]):
            offsets.append(lines_before.get(piece.path, 0))
            lines_before[piece.path] = offsets[-1] + n
        total += result["bad_record_count"]
        for pi, line, reason in result["bad_records"]:
            if len(listed) < shards.MAX_BAD_RECORDS_LISTED:
                listed.append({"file": unit[pi].path, "line": offsets[pi] + line, "reason": reason})
    return total, listed


def _metadata(
    options: shards.Options,
    tok: Tokenizer,
    inputs: Sequence[str],
    input_files: list[str],
    units: list[list[Piece]],
    names: list[str],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """What metadata.json holds: the format, the tokenizer, the totals and the shards."""
    bad_total, bad_list = _bad_record_locations(units, results)
    pretrain = options.format == "pretrain"
    return {
        "format": options.format,
        "seq_len": options.seq_len if pretrain else None,
        "record_dtype": "<i4",
        "record_layout": (
            "seq_len tokens, documents joined with eos"
            if pretrain
            else "[prompt_len, *prompt_ids, *response_ids]"
        ),
        "tokenizer": {"path": options.tokenizer_path, "fingerprint": tok.fingerprint},
        "vocab_size": tok.vocab_size,
        "special_ids": {
            "pad": tok.pad_id,
            "eos": tok.eos_id,
            "mask": tok.mask_id,
            "eot": tok.eot_id,
        },
        "chat_format": None if pretrain else {"role_headers": chat.ROLE_HEADERS, "turn_end": "eot"},
        "text_field": options.text_field,
        "doc_separator": options.doc_separator,
        "split": options.split,
        "validation_fraction": options.validation_fraction,
        "num_documents": sum(r["num_documents"] for r in results),
        "num_tokens": sum(r["num_tokens"] for r in results),
        "num_records": sum(r["num_records"] for r in results),
        "dropped_tail_tokens": sum(r["dropped_tail_tokens"] for r in results),
        "bad_records": bad_total,
        "bad_record_locations": bad_list,
        # What a training run checks each shard against when it first reads it.
        "shards": [
            {"path": n, "num_records": r["num_records"], "shard_bytes": r["shard_bytes"]}
            for n, r in zip(names, results)
        ],
        "inputs": [os.path.abspath(p) for p in inputs if p],
        "num_input_files": len(input_files),
        "created_by": CREATED_BY,
    }


def _no_records(inputs: Sequence[str], options: shards.Options, meta: dict[str, Any]) -> str:
    """One line: which inputs gave no record, what they held, what a record needs and the fix."""
    what = f"input {','.join(p for p in inputs if p)}"
    held = [f"documents: {meta['num_documents']}"]
    if options.format == "sft":
        need = "a record is an assistant reply of a JSONL dialogue (prompt/response or messages)"
        fixes = ["dialogues with replies"]
    else:
        held.append(f"tokens: {meta['num_tokens'] + meta['dropped_tail_tokens']}")
        need = f"a record is --seq_len={options.seq_len} tokens (documents with EOS) of one shard"
        fixes = ["more text", "a smaller --seq_len"]
    if options.split != "all":
        what = f"the {options.split} split of {what}"
        direction = "larger" if options.split == "validation" else "smaller"
        fixes.append(f"a {direction} --validation_fraction (now {options.validation_fraction})")
    held.append(f"bad records: {meta['bad_records']}")
    if meta["bad_record_locations"]:
        first = meta["bad_record_locations"][0]
        held[-1] += f", the first {first['file']}:{first['line']}: {first['reason']}"
    fix = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"
    return f"{what} gave 0 records ({', '.join(held)}); {need}: give {fix}"


def _log_summary(
    log: Callable[[str], Any],
    meta: dict[str, Any],
    written: int,
    skipped: int,
    rate: float,
    meta_path: str,
) -> None:
    log(
        f"{meta['format']}: {meta['num_records']} records, {meta['num_tokens']} tokens, "
        f"{meta['num_documents']} documents in {len(meta['shards'])} shards ({written} written, "
        f"{skipped} skipped); {meta['dropped_tail_tokens']} tail tokens dropped; "
        f"{rate:,.0f} tokens/s"
    )
    bad_total, bad_list = meta["bad_records"], meta["bad_record_locations"]
    if bad_total:
        log(f"{bad_total} bad records (skipped):")
        for b in bad_list[:BAD_RECORDS_PRINTED]:
            log(f"  {b['file']}:{b['line']}: {b['reason']}")
        if bad_total > BAD_RECORDS_PRINTED:
            log(
                f"  ... ({bad_total - BAD_RECORDS_PRINTED} more; up to "
                f"{shards.MAX_BAD_RECORDS_LISTED} listed in {meta_path})"
            )


def load_metadata(output_dir: str) -> dict[str, Any]:
    """Reads `output_dir/metadata.json`.

    Raises FileNotFoundError, with a message saying how to make it, when it is missing, and
    ValueError for a gs:// directory without the gcs extra installed.
    """
    files.check_uri(output_dir)
    path = files.join(output_dir, METADATA_FILE)
    if not files.isfile(path):
        raise FileNotFoundError(
            f"no {METADATA_FILE} in {output_dir}: prepare the data with "
            "tools/prepare_data.py (an interrupted run leaves none; rerun it)"
        )
    return json.loads(files.read_text(path))

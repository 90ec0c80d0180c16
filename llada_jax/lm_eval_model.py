"""The lm-evaluation-harness model `llada_jax`: a workdir's checkpoint behind lm-eval's LM API.

  python tools/lm_eval_harness.py run --model llada_jax --model_args workdir=DIR[,mc_num=128] \
      --tasks hellaswag [any other lm_eval flag]

Importing this module registers the model for `lm_eval.simple_evaluate(model="llada_jax",
model_args=...)`. lm-eval finds no models in other packages, so tools/lm_eval_harness.py imports
it and then runs lm-eval's own command line; tools/evaluate.py --tasks runs tasks on the
checkpoint it evaluates.

  loglikelihood          -(the Monte-Carlo NLL bound of the continuation given the context):
                         exactly l of its L tokens masked, weight L / l, l stratified over the
                         `mc_num` samples, the context never masked, optional CFG (`cfg_scale`).
                         is_greedy is not computed (False), as in the reference's default.
  loglikelihood_rolling  -(the bound of the whole text) in windows of the model's context, each
                         new chunk scored given the tokens before it; the text opens with EOS.
  generate_until         the sampler (every key of a config's sample section), cut at EOS and the
                         stop strings.

Scoring draws each request's `mc_num` masks first and scores each distinct mask once: a
continuation of T < mc_num tokens draws some masks more than once (it has 2^T - 1 masks in all:
one for a single token), and every sample of a mask gets its value, so the estimate is the one
scoring every sample would give. One-token continuations of the same context (multiple choice
by letter: " A", " B", ...) share their model input, the context and a mask, and are scored
from one model slot (`shared_inputs`). The (request, sample) pairs left are laid out in model rows
(`layout`): with `pack` (the default) several per row, side by side in segments that attend only
within themselves (best-fit decreasing into rows of at least PACK_LENGTH positions), else one
per row; either way rows are padded to a few lengths (`bucket`) so that little is recompiled,
and the output head (with the last layer's queries and MLP) runs on each row's masked targets
only; `batch_size` model rows per call, split over the devices. The masks of a request depend
only on its tokens, its sample index and `seed` (not on the layout or the order of the
requests): the same request is scored on the same masks by every checkpoint (common random
numbers), packed or not. A block-diffusion model (diffusion.block_size > 0) is scored by its
block bound (likelihood.py), one request per row (pack is off, every sample scored); with blocks
of one token that is the exact log-likelihood, so mc_num is 1.

Model arguments: workdir (local or gs://; required unless a loaded model is passed), step,
mc_num (128), batch_size (32 model rows per call; it wins over lm-eval's --batch_size), pack
(true: several requests per model row; false: one), seed (0), max_length (0: the run's
data.seq_len), num_devices (0: all local), and the sampler's settings: every key of
`sampling.SampleSettings` (a config's sample section, e.g. temperature, threshold, kv_cache)
with its default, except that gen_length defaults to each request's max_gen_toks and steps and
block_length to gen_length. cfg_scale guides the scoring too. matmul and attention (the kernels
section) replace the checkpoint's kernels; under matmul=auto on one CPU device each jitted
function runs the kernels that were fastest on its shapes (llada_jax/kernels/autotune.py).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llada_jax import config as config_lib
from llada_jax import inference, likelihood, sampling, sections, sharding
from llada_jax import run as run_lib
from llada_jax.kernels import KernelConfig

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 32  # model rows per call
MODEL_NAME = "llada_jax"
PACK_LENGTH = 128  # the least length of a packed model row (docs/performance.md)
MASK_CALL_ROWS = 4096  # (request, sample) pairs per call drawing masks or their counts
# One-token continuations of a shared context scored from one slot's logits beside its own (C).
ALTERNATIVES = 4


def bucket(length: int) -> int:
    """`length` rounded up to one of a few sizes (at most ~12% more): one compile per size."""
    step = max(16, 2 ** max(0, math.ceil(math.log2(max(length, 1))) - 3))
    return -(-length // step) * step


@dataclasses.dataclass
class ModelRow:
    """Items (requests, or Monte-Carlo samples of them) side by side in one model row, each in
    its slot, in this order."""

    length: int  # positions, a `bucket` size
    items: list[int]  # indices of the items
    used: int = 0  # positions the items take
    scored: int = 0  # the positions of theirs that are scored (their masked targets)

    @property
    def head_positions(self) -> int:
        """Positions the output head (and the last layer's queries) run on: the row's scored
        positions, rounded up by `bucket`."""
        return min(bucket(max(self.scored, 1)), self.length)


@dataclasses.dataclass
class ScorerCall:
    """One scorer call: up to `batch_size` model rows of `length` positions and `slots` slots
    (padded to batch_size rows with copies of the first), the head on `head_positions` each."""

    length: int
    slots: int
    head_positions: int
    rows: list[ModelRow]


def layout(items: Sequence[tuple[int, int]], pack: bool) -> list[ModelRow]:
    """Model rows for items of (length, scored) positions. Unpacked: one per row, of its length's
    `bucket`. Packed: best-fit decreasing, the longest items first, each into the row with the
    least room that holds it (the first made of equals), else a new row of max(its length,
    PACK_LENGTH)'s `bucket`."""
    rows: list[ModelRow] = []
    room: list[tuple[int, int]] = []  # (positions left, row index) of the packed rows, sorted
    for i in sorted(range(len(items)), key=lambda i: -items[i][0]):
        length, scored = items[i]
        k = bisect.bisect_left(room, (length, -1))
        if k < len(room):
            left, r = room.pop(k)
        else:
            r, left = len(rows), bucket(max(length, PACK_LENGTH if pack else 1))
            rows.append(ModelRow(left, []))
        rows[r].items.append(i)
        rows[r].used += length
        rows[r].scored += scored
        if pack:
            bisect.insort(room, (left - length, r))
    return rows


def shared_inputs(rows: Sequence[tuple[list[int], int]], alternatives: int) -> dict[int, list[int]]:
    """Requests (`rows` of (ids, targets)) whose scores another's model slot gives: {index of a
    request: indices of up to `alternatives` others}. Requests of one target with the same
    tokens before it (multiple choice: " A", " B", ... after one question) have the same model
    input in every sample, the context and then a mask: the first of each group of up to
    1 + `alternatives` is scored, and the others are read from its slot's log-probabilities."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (ids, targets) in enumerate(rows):
        if targets == 1:
            groups[tuple(ids[:-1])].append(i)
    shared = {}
    for members in groups.values():
        for start in range(0, len(members), 1 + alternatives):
            first, *others = members[start : start + 1 + alternatives]
            if others:
                shared[first] = others
    return shared


def _in_calls(fn: Any, draws: Sequence[tuple[int, ...]]) -> np.ndarray:
    """`fn`'s output on the columns of `draws` (tuples of ints), stacked: MASK_CALL_ROWS draws
    per call (the last call padded with the first draw), so that it compiles once."""
    out = []
    for start in range(0, len(draws), MASK_CALL_ROWS):
        chunk = list(draws[start : start + MASK_CALL_ROWS])
        chunk += [chunk[0]] * (MASK_CALL_ROWS - len(chunk))
        out.append(np.asarray(fn(*(np.asarray(c, np.int32) for c in zip(*chunk)))))
    return np.concatenate(out)[: len(draws)]


@register_model(MODEL_NAME)
class LLaDAJaxLM(LM):
    """See the module docstring."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's --batch_size (default 1) counts requests; batch_size in model_args (model
        rows per call) wins over it."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in arg_dict:
            extra.pop("batch_size", None)
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """The model from lm-eval's `--model_args` string (`workdir=DIR,mc_num=128,...`)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(
        self,
        workdir: str = "",
        step: int | None = None,
        mc_num: int = 128,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        seed: int = 0,
        max_length: int = 0,
        num_devices: int = 0,
        model: inference.LoadedModel | None = None,
        progress: bool = True,
        pack: bool = True,
        max_batch_size: int | None = None,
        device: str | None = None,
        **section_args: Any,
    ):
        """See the module docstring; `section_args` are keys of `sampling.SampleSettings` and
        of `kernels.KernelConfig` (matmul, attention: with `workdir`)."""
        super().__init__()
        self.sample_args, kernels = split_section_args(section_args)
        del max_batch_size, device  # lm-eval's torch-side options; devices: num_devices
        if model is None:
            if not workdir:
                raise ValueError("model_args needs workdir=DIR (a workdir with checkpoints)")
            devices = jax.local_devices()[: int(num_devices) or None]
            step = None if step is None else int(step)
            model = inference.load(workdir, step, devices, kernels=kernels)
        elif kernels:
            raise ValueError(f"model_args {kernels} need workdir=DIR (a model is loaded)")
        self.model, self.tok = model, model.run.tokenizer
        self.mc_num, self.seed = int(mc_num), int(seed)
        self.cfg_scale = self.sample_args.get("cfg_scale", 0.0)
        dp = sharding.data_parallel_size(model.run.mesh)
        self.batch_size = -(-rows_per_call(batch_size) // dp) * dp
        self.max_length = int(max_length) or model.run.data_cfg.seq_len
        self.progress = progress
        if self.mc_num < 1:
            raise ValueError(f"mc_num={mc_num} is invalid; valid: a positive integer")
        # A block-diffusion model's bound takes one request per row, counted from its start;
        # with blocks of one token it is exact, one sample.
        self.block_size = model.run.diffusion_cfg.block_size
        self.pack = bool(pack) and not self.block_size
        self.mc_num = 1 if self.block_size == 1 else self.mc_num
        self._scorers: dict[int, Any] = {}  # by output-head positions per row
        key = jax.random.key(self.seed)
        self._draw_masks = jax.jit(
            functools.partial(likelihood.target_masks, key, n=self.mc_num),
            static_argnames="width",
        )
        self._mask_counts = jax.jit(
            functools.partial(likelihood.stratified_mask_counts, key, n=self.mc_num)
        )
        self._samplers: dict[sampling.SampleSettings, Any] = {}

    # ------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------
    def scorer(self, num_head_positions: int) -> Any:
        """The jitted scorer whose output head runs on `num_head_positions` positions per row,
        with ALTERNATIVES alternatives per slot (`likelihood.make_scorer`)."""
        if num_head_positions not in self._scorers:
            self._scorers[num_head_positions] = run_lib.fastest(
                self.model.run,
                f"scorer|{self.mc_num}|{self.seed}|{self.cfg_scale}|{num_head_positions}|"
                f"{self.block_size}",
                lambda graphdef: likelihood.make_scorer(
                    graphdef,
                    self.model.run.mesh,
                    mask_id=self.tok.mask_id,
                    num_samples=self.mc_num,
                    seed=self.seed,
                    cfg_scale=self.cfg_scale,
                    num_head_positions=num_head_positions,
                    block_size=self.block_size,
                    alternatives=True,
                ),
            )
        return self._scorers[num_head_positions]

    def score_rows(self, rows: Sequence[tuple[list[int], int]], desc: str) -> np.ndarray:
        """The bound (nats) of each row's last `targets` tokens given the ones before them:
        rows are (ids, targets) pairs; returns (len(rows), mc_num) samples. Each mask is scored
        once, however many of a row's samples draw it (`first_samples`), and one-token
        continuations of a shared context once per group (`shared_inputs`); the (row, sample)
        pairs are laid out by `layout` (several per model row with `pack`), `batch_size` model
        rows per call."""
        first_RxN, pairs, model_rows, shared = self.plan(rows)
        copies_RxN = np.zeros_like(first_RxN)
        np.add.at(copies_RxN, (np.arange(len(rows))[:, None], first_RxN), 1)
        out = np.zeros((len(rows), self.mc_num))
        bar = _bar(len(rows) * self.mc_num, desc, self.progress)
        for call in self.calls(model_rows):
            chunk = [[pairs[k] for k in m.items] for m in call.rows]
            padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))
            nll_BxS, alternative_BxSxC = (
                np.asarray(x)
                for x in self.scorer(call.head_positions)(
                    self.model.params, *pack_batch(rows, padded, call.length, call.slots, shared)
                )
            )
            for b, row_pairs in enumerate(chunk):
                for s, (i, j) in enumerate(row_pairs):
                    out[i, j] = nll_BxS[b, s]
                    for c, other in enumerate(shared.get(i, ())):  # one target: sample 0
                        out[other, 0] = -alternative_BxSxC[b, s, c]
            bar.update(
                sum(
                    copies_RxN[i, j] * (1 + len(shared.get(i, ())))
                    for row_pairs in chunk
                    for i, j in row_pairs
                )
            )
        bar.close()
        return np.take_along_axis(out, first_RxN, axis=1)

    def calls(self, model_rows: Sequence[ModelRow]) -> list[ScorerCall]:
        """The scorer calls that score `model_rows` (`plan`), in order: the rows of one length
        `batch_size` at a time, the most head positions first, so that a call's rows need about
        as many (one call per length is part empty, not one per (length, head positions))."""
        by_length: dict[int, list[ModelRow]] = defaultdict(list)
        for model_row in model_rows:
            by_length[model_row.length].append(model_row)
        calls = []
        for length, members in sorted(by_length.items()):
            members = sorted(members, key=lambda m: -m.head_positions)
            slots = max(len(m.items) for m in members)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                calls.append(ScorerCall(length, slots, chunk[0].head_positions, chunk))
        return calls

    def plan(
        self, rows: Sequence[tuple[list[int], int]]
    ) -> tuple[np.ndarray, list[tuple[int, int]], list[ModelRow], dict[int, list[int]]]:
        """How `score_rows` scores `rows`: `first_samples`, the (row, sample) pairs whose masks
        are scored (each sample j with first[i, j] == j, of the rows not read from another's
        slot), the model rows those pairs are laid out in (`layout`, by their lengths and
        `masked_counts`; a model row's items index the pairs), and `shared_inputs` (none for a
        block-diffusion model, whose rows hold their clean copy)."""
        shared = {} if self.block_size else shared_inputs(rows, ALTERNATIVES)
        first_RxN = self.first_samples(rows)
        scored_RxN = first_RxN == np.arange(self.mc_num)
        scored_RxN[[i for others in shared.values() for i in others]] = False
        pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(scored_RxN))]
        masked_RxN = self.masked_counts(rows)
        return (
            first_RxN,
            pairs,
            layout([(len(rows[i][0]), int(masked_RxN[i, j])) for i, j in pairs], self.pack),
            shared,
        )

    def masked_counts(self, rows: Sequence[tuple[list[int], int]]) -> np.ndarray:
        """(len(rows), mc_num) int: the targets each sample masks, those the scorer scores (l of
        `likelihood.stratified_mask_counts`); a block-diffusion row's every target."""
        n = self.mc_num
        if not rows:
            return np.zeros((0, n), int)
        if self.block_size:
            return np.repeat([[t] for _, t in rows], n, axis=1)
        requests = [(request_id(*row), row[1]) for row in rows]
        draws = [(r, j, t) for r, t in requests for j in range(n)]  # (id, sample, targets)
        return _in_calls(self._mask_counts, draws).reshape(len(rows), n)

    def first_samples(self, rows: Sequence[tuple[list[int], int]]) -> np.ndarray:
        """(len(rows), mc_num) int: for sample j of each row, the first of its samples that
        draws the same mask (j itself when none before it does). Only rows with fewer targets
        than samples can draw a mask twice (T >= mc_num targets give mc_num different counts l,
        `likelihood.stratified_mask_counts`); a one-token continuation draws one mask in all
        mc_num samples. The masks are drawn as the scorer draws them
        (`likelihood.target_masks`); block-diffusion rows are not compared."""
        n = self.mc_num
        first_RxN = np.tile(np.arange(n), (len(rows), 1))
        short = [i for i, (_, t) in enumerate(rows) if 0 < t < n]
        if self.block_size or not short:
            return first_RxN
        requests = [(len(rows[i][0]) - rows[i][1], rows[i][1], request_id(*rows[i])) for i in short]
        draws = [(*r, j) for r in requests for j in range(n)]  # (prompt, targets, id, sample)
        width = bucket(max(rows[i][1] for i in short))
        masks_PxW = _in_calls(functools.partial(self._draw_masks, width=width), draws)
        for k, i in enumerate(short):
            first_RxN[i] = likelihood.first_equal_rows(masks_PxW[k * n : (k + 1) * n])
        return first_RxN

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; spaces that end the context move to the continuation
        (tokenizers attach them to the next word), and the context is cut from the left so that
        both fit in max_length."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx, cont = self.tok.encode(context), self.tok.encode(continuation)
        cont = cont[-self.max_length :]
        return ctx[max(0, len(ctx) + len(cont) - self.max_length) :], cont

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(-bound of the continuation given the context in nats, False) per (context,
        continuation) request."""
        rows = []
        for context, continuation in (r.args for r in requests):
            ctx, cont = self.encode_pair(context, continuation)
            rows.append((ctx + cont, len(cont)))
        samples = self.score_rows(rows, "loglikelihood")
        return [(-float(s.mean()), False) for s in samples]

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """-bound of each request's whole text in nats, summed over windows of max_length."""
        rows, owner = [], []
        context = self.max_length // 4  # the least context a later window keeps
        for k, (text,) in enumerate(r.args for r in requests):
            ids = [self.tok.eos_id] + self.tok.encode(text)
            for window in likelihood.rolling_windows(ids, self.max_length, context, num_prefix=1):
                rows.append(window)
                owner.append(k)
        samples = self.score_rows(rows, "loglikelihood_rolling")
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, int), samples.mean(axis=1))
        return [-float(t) for t in totals]

    # ------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------
    def settings_for(self, max_gen_toks: int) -> sampling.SampleSettings:
        """The sampler's settings for a request of `max_gen_toks` tokens: the model args', with
        gen_length (a multiple of block_length) defaulting to `max_gen_toks` and steps and
        block_length to gen_length; a block-diffusion model's block_length is its block size."""
        given = self.sample_args
        block = given.get("block_length") or given.get("gen_length") or max_gen_toks
        block = self.block_size or block
        gen_length = -(-(given.get("gen_length") or max_gen_toks) // block) * block
        steps = given.get("steps") or gen_length
        try:
            return sampling.SampleSettings(
                **{**given, "gen_length": gen_length, "steps": steps, "block_length": block}
            )
        except sections.SettingError as e:
            raise ValueError(f"model_args: {e.with_prefix('')}") from None

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Each request's sampled continuation, cut at EOS, end of turn and its stop strings;
        requests of the same settings and prompt length bucket are sampled as one batch."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        prompts, stops = [], []
        for i, (context, kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            settings = self.settings_for(int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))
            ids = self.tok.encode(context)[-max(1, self.max_length - settings.gen_length) :]
            prompts.append(ids)
            stops.append(until)
            groups[(settings, bucket(len(ids)))].append(i)
        out = [""] * len(requests)
        bar = _bar(len(requests), "generate_until", self.progress)
        for (settings, width), members in sorted(groups.items(), key=lambda g: g[0][1]):
            sampler = self._samplers.get(settings)
            if sampler is None:
                sampler = self._samplers[settings] = inference.make_sampler(
                    self.model.run, settings
                )
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                batch = [prompts[i] for i in chunk]
                batch += [batch[0]] * (self.batch_size - len(batch))
                ids, valid = inference.left_pad(batch, self.tok.pad_id)
                ids = np.pad(
                    ids, ((0, 0), (width - ids.shape[1], 0)), constant_values=self.tok.pad_id
                )
                valid = np.pad(valid, ((0, 0), (width - valid.shape[1], 0)))
                key = jax.random.key(self.seed)
                canvas, _ = sampler(self.model.params, ids, valid, key)
                canvas = np.asarray(canvas)[:, width:]
                for b, i in enumerate(chunk):
                    out[i] = cut(self.tok.decode(stop_at_eos(canvas[b], self.tok)), stops[i])
                bar.update(len(chunk))
        bar.close()
        return out


def pack_batch(
    requests: Sequence[tuple[list[int], int]],
    model_rows: Sequence[Sequence[tuple[int, int]]],
    length: int,
    slots: int,
    shared: dict[int, list[int]],
) -> tuple[np.ndarray, ...]:
    """The scorer's inputs for model rows of (request, sample) pairs (`requests`: (ids,
    targets) pairs), rows of `length` positions and `slots` slots: tokens (B, L) int32,
    target (B, L) bool, segment (B, L) int32 (slot s of a row is segment s + 1, its pairs side
    by side from position 0; 0 pads), row_id (B, S) int32 (`request_id`; 0 for an empty slot),
    sample (B, S) int32 and alternatives (B, S, ALTERNATIVES) int32: the last tokens of the
    requests `shared` reads from each slot (`shared_inputs`), 0 where none."""
    batch = len(model_rows)
    tokens_BxL = np.zeros((batch, length), np.int32)
    target_BxL = np.zeros((batch, length), bool)
    segment_BxL = np.zeros((batch, length), np.int32)
    row_id_BxS = np.zeros((batch, slots), np.int32)
    sample_BxS = np.zeros((batch, slots), np.int32)
    alternative_BxSxC = np.zeros((batch, slots, ALTERNATIVES), np.int32)
    for b, row_pairs in enumerate(model_rows):
        offset = 0
        for s, (i, j) in enumerate(row_pairs):
            ids, n = requests[i]
            end = offset + len(ids)
            tokens_BxL[b, offset:end] = ids
            segment_BxL[b, offset:end] = s + 1
            target_BxL[b, end - n : end] = True
            row_id_BxS[b, s], sample_BxS[b, s] = request_id(ids, n), j
            for c, other in enumerate(shared.get(i, ())):
                alternative_BxSxC[b, s, c] = requests[other][0][-1]
            offset = end
    return tokens_BxL, target_BxL, segment_BxL, row_id_BxS, sample_BxS, alternative_BxSxC


def rows_per_call(batch_size: int | str) -> int:
    """The model rows per call a batch_size argument asks for: a positive integer as given,
    anything else (lm-eval's "auto", "auto:N") the default 32. The model rounds it up to a
    multiple of its data-parallel devices."""
    return max(int(batch_size), 1) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE


def set_cli_batch_size(args: argparse.Namespace) -> None:
    """Parsed lm-eval command-line `args` with --batch_size set to the rows per call that the
    llada_jax model scores (model_args' batch_size, else --batch_size, else 32; see
    `rows_per_call`), so that lm-eval's results config and its summary header report those
    rather than its own default 1. Other models' args are left as they are."""
    if getattr(args, "model", None) == MODEL_NAME:
        given = getattr(args, "batch_size", DEFAULT_BATCH_SIZE)
        args.batch_size = rows_per_call((args.model_args or {}).get("batch_size", given))


def request_id(ids: Sequence[int], targets: int) -> int:
    """A request's row id for its masks: a hash of its tokens and target count, so the same
    request draws the same masks in any batch, run or checkpoint."""
    return zlib.crc32(np.asarray(ids, np.int32).tobytes() + bytes([targets % 256])) & 0x7FFFFFFF


def split_section_args(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model args naming keys of `sampling.SampleSettings` and of `kernels.KernelConfig`, each
    as the type of its default, apart: (sampler's, kernels'). Raises ValueError for any other
    key or a value of the wrong type."""
    fields = {
        f.name: (f, cls)
        for cls in (sampling.SampleSettings, KernelConfig)
        for f in sections.keys(cls)
    }
    out: dict[type, dict[str, Any]] = {sampling.SampleSettings: {}, KernelConfig: {}}
    for name, value in given.items():
        if name not in fields:
            valid = "workdir, step, mc_num, batch_size, pack, seed, max_length, num_devices"
            raise ValueError(
                f"model_args {name}={value!r} is not a model argument; valid: {valid} and "
                f"{', '.join(fields)}"
            )
        field, cls = fields[name]
        try:
            out[cls][name] = config_lib.coerce(name, field.default, value)
        except config_lib.ConfigError as e:
            raise ValueError(f"model_args: {e}") from None
    try:
        KernelConfig(**out[KernelConfig])
    except sections.SettingError as e:
        raise ValueError(f"model_args: {e.with_prefix('')}") from None
    return out[sampling.SampleSettings], out[KernelConfig]


def stop_at_eos(tokens: np.ndarray, tok: Any) -> list[int]:
    """The generated ids before the first EOS or end-of-turn."""
    ends = [k for k, t in enumerate(tokens.tolist()) if t in (tok.eos_id, tok.eot_id)]
    return tokens[: ends[0]].tolist() if ends else tokens.tolist()


def cut(text: str, stops: Iterable[str]) -> str:
    """`text` up to the first of the stop strings."""
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)

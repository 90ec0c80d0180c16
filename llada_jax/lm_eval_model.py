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

Requests are batched (`batch_size` model rows per call, Monte-Carlo samples and requests
together, padded to a few lengths so that little is recompiled) and split over the devices.
The masks of a request depend only on its tokens and `seed`: the same request is scored on the
same masks by every checkpoint (common random numbers).

Model arguments: workdir (local or gs://; required unless a loaded model is passed), step,
mc_num (128), batch_size (32), seed (0), max_length (0: the run's data.seq_len), num_devices (0:
all local), and the sampler's settings: every key of `sampling.SampleSettings` (a config's
sample section, e.g. temperature, threshold, kv_cache) with its default, except that gen_length
defaults to each request's max_gen_toks and steps and block_length to gen_length. cfg_scale
guides the scoring too. matmul and attention (the kernels section) replace the checkpoint's
kernels; under matmul=auto on one CPU device each jitted function runs the kernels that were
fastest on its shapes (llada_jax/kernels/autotune.py).
"""

from __future__ import annotations

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


def bucket(length: int) -> int:
    """`length` rounded up to one of a few sizes (at most ~12% more): one compile per size."""
    step = max(16, 2 ** max(0, math.ceil(math.log2(max(length, 1))) - 3))
    return -(-length // step) * step


@register_model("llada_jax")
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
        batch_size: int | str = 32,
        seed: int = 0,
        max_length: int = 0,
        num_devices: int = 0,
        model: inference.LoadedModel | None = None,
        progress: bool = True,
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
        rows = int(batch_size) if str(batch_size).isdigit() else 32  # "auto": the default
        self.batch_size = -(-max(rows, 1) // dp) * dp
        self.max_length = int(max_length) or model.run.data_cfg.seq_len
        self.progress = progress
        if self.mc_num < 1:
            raise ValueError(f"mc_num={mc_num} is invalid; valid: a positive integer")
        self._scorers: dict[int, Any] = {}  # by head window (0: every position)
        self._samplers: dict[sampling.SampleSettings, Any] = {}

    # ------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------
    def scorer(self, window: int) -> Any:
        """The jitted scorer whose output head runs on `window` positions per row (0: all)."""
        if window not in self._scorers:
            self._scorers[window] = run_lib.fastest(
                self.model.run,
                f"scorer|{self.mc_num}|{self.seed}|{self.cfg_scale}|{window}",
                lambda graphdef: likelihood.make_scorer(
                    graphdef,
                    self.model.run.mesh,
                    mask_id=self.tok.mask_id,
                    num_samples=self.mc_num,
                    seed=self.seed,
                    cfg_scale=self.cfg_scale,
                    window=window,
                ),
            )
        return self._scorers[window]

    def score_rows(self, rows: Sequence[tuple[list[int], int]], desc: str) -> np.ndarray:
        """The bound (nats) of each row's last `targets` tokens given the ones before them:
        rows are (ids, targets) pairs; returns (len(rows), mc_num) samples. Rows are padded to
        a few lengths, and the output head runs on a window of a few widths holding the
        targets (the whole row when that is not shorter)."""
        out = np.zeros((len(rows), self.mc_num))
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (ids, n) in enumerate(rows):
            length = bucket(len(ids))
            window = bucket(n)
            by_shape[(length, window if window < length else 0)].append(i)
        total = sum(len(v) for v in by_shape.values()) * self.mc_num
        bar = _bar(total, desc, self.progress)
        for (length, window), members in sorted(by_shape.items()):
            scorer = self.scorer(window)
            pairs = [(i, j) for i in members for j in range(self.mc_num)]
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start : start + self.batch_size]
                padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))
                tokens, target, valid = (
                    np.zeros((self.batch_size, length), t) for t in (np.int32, bool, bool)
                )
                row_id = np.zeros(self.batch_size, np.int32)
                sample = np.array([j for _, j in padded], np.int32)
                for b, (i, _) in enumerate(padded):
                    ids, n = rows[i]
                    tokens[b, : len(ids)] = ids
                    valid[b, : len(ids)] = True
                    target[b, len(ids) - n : len(ids)] = True
                    row_id[b] = request_id(ids, n)
                nll = np.asarray(scorer(self.model.params, tokens, target, valid, row_id, sample))
                for b, (i, j) in enumerate(chunk):
                    out[i, j] = nll[b]
                bar.update(len(chunk))
        bar.close()
        return out

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
        block_length to gen_length."""
        given = self.sample_args
        block = given.get("block_length") or given.get("gen_length") or max_gen_toks
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
            valid = "workdir, step, mc_num, batch_size, seed, max_length, num_devices"
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

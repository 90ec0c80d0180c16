"""Sample from a trained (or converted) checkpoint with the LLaDA reverse process.

  python tools/sample.py --workdir=DIR (--prompt="text" | --prompt_ids=1,2,3 | --prompts_file=F)
      [--gen_length=64 --steps=64 --block_length=64 --remasking=low_confidence|random
       --temperature=0 --cfg_scale=0 --threshold=0.9 --ban_eos --eos_zero_confidence
       --kv_cache=none|prefix|dual ... every key of a config's sample section]
      [--chat] [--step=N] [--seed=0] [--json] [--output=out.jsonl]

A sampler setting not given on the command line is the run's own (its config's sample section,
what its samples during training used; a converted checkpoint's are the section's defaults).

--prompt and --prompt_ids may be given several times; --prompts_file is JSON lines with a
"prompt" (text) or "prompt_ids" (list of ids) field. --chat wraps each text prompt as one user
turn of the tokenizer's chat template (a Hugging Face tokenizer_config.json's, the way
LLaDA-8B-Instruct's chat script builds its prompts) or, without one, of the SFT chat format. All
prompts are sampled as one left-padded batch, split over --num_devices devices (weights
replicated, or sharded with --fsdp). A prompt may hold the tokenizer's mask token (e.g.
<|mdm_mask|>) anywhere: those positions are filled in too (infilling), and the result then has
filled_prompt(_ids). The model, tokenizer and special ids come from the config saved in the
checkpoint. Without --json, prints each prompt and its completion; with --json, one JSON object
per prompt: prompt, prompt_ids, tokens (the generated ids), text, nfe (model calls run) and
seconds (wall time of the batched generation, compilation excluded). --output writes the same
objects as JSON lines. Bad flags or a workdir without parameters: one error line, exit 2.

--cfg_scale=W guides each step by the canvas with its prompt masked (one doubled batch per
step). --threshold=C decodes by confidence instead of --steps: each step commits the block's
most confident masked token and every other one at least C confident, until the block is done;
nfe then counts the model calls actually run. --ban_eos never proposes EOS; --eos_zero_confidence
commits proposed end-of-turn tokens (and at temperature 0 EOS ones) last. --kv_cache=prefix|dual
reuses the keys and values of each block's first (full) pass in its later steps, recomputing only
the generated region or only the block (Fast-dLLM; approximate for models of several layers).
The special ids are the checkpoint's (its model config's, else its tokenizer's).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import cli, inference, sampling, sharding  # noqa: E402
from llada_jax.data import chat  # noqa: E402
from llada_jax.host import memory as host_memory  # noqa: E402
from llada_jax.host import xla_flags  # noqa: E402
from llada_jax.kernels import KernelConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir holding a checkpoint (trained or converted).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
flags.DEFINE_multi_string("prompt", [], "A text prompt (repeatable).")
flags.DEFINE_multi_string("prompt_ids", [], "A prompt as comma-separated token ids (repeatable).")
flags.DEFINE_string("prompts_file", None, 'JSON lines with "prompt" or "prompt_ids".')
flags.DEFINE_bool(
    "chat",
    False,
    "Wrap each text prompt as a user turn of the tokenizer's chat template (HF "
    "tokenizer_config.json), else of the SFT chat format.",
)
cli.define_section_flags(sampling.SampleSettings)  # --gen_length, --steps, ... --kv_cache
cli.define_section_flags(KernelConfig)  # --matmul, --attention
flags.DEFINE_integer("num_devices", 1, "Sample on the first N local devices (0: all).")
flags.DEFINE_bool(
    "fsdp", False, "Shard the weights over the devices as FSDP training does (else replicate)."
)
flags.DEFINE_integer(
    "max_length", 0, "Longest canvas (prompt + gen_length) allowed (0: the run's data.seq_len)."
)
flags.DEFINE_integer("seed", 0, "PRNG seed (temperature > 0, random remasking).")
flags.DEFINE_bool("json", False, "Print one JSON object per prompt.")
flags.DEFINE_string("output", None, "Also write the JSON objects to this JSONL file.")


def encode(tokenizer, text: str) -> list[int]:
    return chat.chat_prompt(tokenizer, text) if FLAGS.chat else tokenizer.encode(text)


def read_prompts(tokenizer, vocab_size: int) -> list[tuple[str | None, list[int]]]:
    """(text or None, ids) for every prompt the flags name, in order."""
    prompts = [(text, encode(tokenizer, text)) for text in FLAGS.prompt]
    for spec in FLAGS.prompt_ids:
        prompts.append((None, parse_ids(spec, "--prompt_ids")))
    if FLAGS.prompts_file:
        if not os.path.isfile(FLAGS.prompts_file):
            raise ValueError(f"--prompts_file={FLAGS.prompts_file!r} does not exist")
        with open(FLAGS.prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    prompts.append(prompt_of_line(line, n, tokenizer))
    if not prompts:
        raise ValueError("give a prompt: --prompt=TEXT, --prompt_ids=1,2,3 or --prompts_file=F")
    for text, ids in prompts:
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            where = "" if text is None else f" (of {text!r}: the tokenizer does not fit the model)"
            raise ValueError(
                f"prompt token id {bad[0]}{where} is out of range; valid: 0 .. {vocab_size - 1}"
            )
    return prompts


def check_length(longest_prompt: int, gen_length: int, seq_len: int) -> None:
    """The canvas fits the model's context: the run's data.seq_len, or --max_length."""
    limit = FLAGS.max_length or seq_len
    if longest_prompt + gen_length > limit:
        raise ValueError(
            f"a prompt of {longest_prompt} tokens + --gen_length={gen_length} is longer "
            f"than the model's context of {limit} tokens (data.seq_len; --max_length=N allows "
            "more): shorten the prompt or the generation"
        )


def parse_ids(spec: str, where: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{where}={spec!r} is invalid; valid: comma-separated integers") from None


def prompt_of_line(line: str, n: int, tokenizer) -> tuple[str | None, list[int]]:
    where = f"--prompts_file={FLAGS.prompts_file!r} line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return obj["prompt"], encode(tokenizer, obj["prompt"])
    ids = obj.get("prompt_ids") if isinstance(obj, dict) else None
    if isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None, ids
    raise ValueError(
        f'{where}: expected an object with "prompt" (text) or "prompt_ids" (a list of ids)'
    )


def sample(argv: list[str]) -> list[dict]:
    """Parses flags, samples, prints; returns the result objects."""
    cli.parse(argv, __doc__)
    if not FLAGS.workdir:
        raise ValueError("--workdir=DIR is required")
    kernels = cli.overrides_from_flags(KernelConfig)
    devices = jax.local_devices()[: FLAGS.num_devices or None]
    if not 0 <= FLAGS.num_devices <= len(jax.local_devices()):
        raise ValueError(
            f"--num_devices={FLAGS.num_devices} is invalid; valid: 0 (all) .. "
            f"{len(jax.local_devices())} (the local devices)"
        )
    model = inference.load(FLAGS.workdir, FLAGS.step, devices, FLAGS.fsdp, kernels)
    # A block-diffusion model samples blocks of its own size, whatever --block_length says.
    block = (
        {"block_length": model.run.diffusion_cfg.block_size}
        if model.run.diffusion_cfg.block_size
        else {}
    )
    settings = cli.section_with_flags(model.run.sample_settings, **block)
    tok, mesh = model.run.tokenizer, model.run.mesh
    prompts = read_prompts(tok, model.run.model_cfg.vocab_size)
    check_length(max(len(p) for _, p in prompts), settings.gen_length, model.run.data_cfg.seq_len)
    ids, valid = inference.left_pad([p for _, p in prompts], tok.pad_id)
    ids, valid, rows = inference.pad_batch(ids, valid, sharding.data_parallel_size(mesh))
    key = jax.random.key(FLAGS.seed)
    t = time.perf_counter()
    compiled = (
        inference.make_sampler(model.run, settings).lower(model.params, ids, valid, key).compile()
    )
    compile_sec = time.perf_counter() - t
    t = time.perf_counter()
    canvas, nfe = jax.block_until_ready(compiled(model.params, ids, valid, key))
    seconds = time.perf_counter() - t
    print(
        f"step {model.step} of {FLAGS.workdir}: {rows} prompts on {mesh.size} device(s), "
        f"compiled in {compile_sec:.1f}s, sampled in {seconds:.2f}s",
        file=sys.stderr,
    )
    results = []
    for (text, prompt_ids), row in zip(prompts, np.asarray(canvas)[:rows].tolist()):
        tokens = row[ids.shape[1] :]
        result = dict(
            prompt=text,
            prompt_ids=prompt_ids,
            tokens=tokens,
            text=tok.decode(tokens),
            nfe=int(nfe),
            seconds=seconds,
        )
        if tok.mask_id in prompt_ids:  # an infilling template: its masks were filled too
            filled = row[ids.shape[1] - len(prompt_ids) : ids.shape[1]]
            result.update(filled_prompt_ids=filled, filled_prompt=tok.decode(filled))
        results.append(result)
    for r in results:
        if FLAGS.json:
            print(json.dumps(r), flush=True)
        else:
            shown = r.get("filled_prompt") or r["prompt"] or tok.decode(r["prompt_ids"])
            print(f"--- {shown!r} ->\n{shown}{r['text']}", flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return results


def main(argv: list[str]) -> int:
    xla_flags.apply_defaults()
    host_memory.keep_freed_memory()  # before JAX starts its backend
    try:
        sample(argv)
    except (ValueError, FileNotFoundError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Hugging Face checkpoints <-> workdirs (see llada_jax/convert/hf.py).

  python tools/convert_hf.py --hf_dir=HF_DIR --workdir=DIR [--source=auto|llada|llama|qwen2|qwen3]
                             [--dtype=float32|bfloat16]
      HF LLaDA (or LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM) safetensors ->
      DIR/config.json + DIR/checkpoints/0, which train (--config.train.init_from=DIR), sample
      and evaluate start from. An AR model is imported with model.causal=False, to be trained
      into a diffusion model (see the README's "Block diffusion").
  python tools/convert_hf.py --workdir=DIR --hf_dir=OUT --export [--dtype=bfloat16|float32]
                             [--max_shard_size=5GB] [--step=N] [--hf_code=CODE_DIR]
      DIR's latest (or step N) checkpoint -> OUT in the HF LLaDA layout (a model with Qwen3's
      per-head query/key norms, which that layout lacks: the Qwen3 layout) (config.json,
      model.safetensors or shards + model.safetensors.index.json), with the run's tokenizer
      (tokenizer.json, tokenizer_config.json, special_tokens_map.json; a sentencepiece model
      is converted to the same ids) and the modeling code, so that transformers loads OUT as it
      is: AutoConfig / AutoModel.from_pretrained(OUT, trust_remote_code=True), AutoTokenizer.

The modeling code written is CODE_DIR's .py files, else those of the HF directory the model
was imported from (an import keeps them in DIR/hf_code/, and a run started from DIR with
train.init_from finds them there). A model with neither gets a config.json whose auto_map names
the public LLaDA repository's code (GSAI-ML/LLaDA-8B-Base--modeling_llada.LLaDAModelLM, ...),
which transformers downloads on first load. Offline, copy configuration_llada.py and
modeling_llada.py from a local copy of any LLaDA checkpoint with --hf_code=THAT_DIR (or into
OUT, then set auto_map to "configuration_llada.LLaDAConfig" / "modeling_llada.LLaDAModelLM").

DIR may be on Google Cloud Storage (gs://..., the gcs extra): an import builds the workdir in a
local temporary directory ($TMPDIR: room for about twice the model) and uploads it, the step's
commit file last; a rerun after an interrupted upload removes that upload and starts again, any
other non-empty DIR is refused. An export reads a gs:// DIR; OUT and an import's HF_DIR are local.

Errors are one line `error: ...` on stderr with exit status 2; nothing is left half-written.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import cli, inference  # noqa: E402
from llada_jax.checkpoint import DamagedCheckpoint  # noqa: E402
from llada_jax.convert import hf  # noqa: E402
from llada_jax.convert.safetensors_io import ConvertError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (input; output with --export)")
flags.DEFINE_string("workdir", None, "Workdir (output; input with --export)")
flags.DEFINE_bool("export", False, "Write the workdir's checkpoint to --hf_dir in the HF layout")
flags.DEFINE_string(
    "source", "auto", "Import layout: auto (from config.json), llada, llama, qwen2 or qwen3"
)
flags.DEFINE_string(
    "dtype",
    "",
    "Import: parameter dtype (default float32). Export: tensor dtype "
    "(default: the imported HF checkpoint's, else the parameters')",
)
flags.DEFINE_string("max_shard_size", "5GB", "Export: largest safetensors shard")
flags.DEFINE_integer("step", None, "Export: checkpoint step (default: the latest)")
flags.DEFINE_string(
    "hf_code",
    "",
    "Export: a directory whose .py files (configuration_llada.py, modeling_llada.py) are written "
    "as the modeling code (default: those kept at import, else auto_map names the public code)",
)


def return_freed_memory_to_the_os() -> None:
    """Makes glibc unmap large freed buffers at once and keep at most 2 arenas.

    By default it keeps tensorstore's freed write buffers in per-thread arenas, and an import's
    peak memory then grows with the model instead of staying near one parameter.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its own allocator policy applies
        return
    m_mmap_threshold, m_arena_max = -3, -8  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_arena_max, 2)


def main(argv: list[str]) -> int:
    return_freed_memory_to_the_os()
    try:
        cli.parse(argv, __doc__)
        if not FLAGS.hf_dir or not FLAGS.workdir:
            raise ConvertError("both --hf_dir=DIR and --workdir=DIR are required")
        t = time.perf_counter()
        if FLAGS.export:
            try:
                names = hf.export_hf(
                    FLAGS.workdir,
                    FLAGS.hf_dir,
                    FLAGS.dtype,
                    FLAGS.max_shard_size,
                    FLAGS.step,
                    FLAGS.hf_code,
                )
            except DamagedCheckpoint as e:  # named with the step to export instead
                raise inference.refusal(e, FLAGS.workdir) from None
            others = sorted(set(os.listdir(FLAGS.hf_dir)) - set(names))
            print(
                f"exported {FLAGS.workdir} -> {FLAGS.hf_dir} ({len(names)} safetensors file(s), "
                f"{', '.join(others)}) in {time.perf_counter() - t:.1f}s"
            )
        else:
            cfg = hf.import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.source, FLAGS.dtype or "float32")
            m = cfg["model"]
            print(
                f"imported {FLAGS.hf_dir} -> {FLAGS.workdir}/checkpoints/0 ({m['n_layers']} layers,"
                f" d_model {m['d_model']}, vocab {m['vocab_size']}, {m['param_dtype']}) in "
                f"{time.perf_counter() - t:.1f}s"
            )
    except (ConvertError, DamagedCheckpoint, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

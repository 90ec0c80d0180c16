"""lm-evaluation-harness's command line with the `llada_jax` model registered.

  python tools/lm_eval_harness.py run --model llada_jax \
      --model_args workdir=DIR[,step=N,mc_num=128,batch_size=32,cfg_scale=0,...] \
      --tasks hellaswag,arc_challenge [--include_path=MY_TASKS] [--limit=N] [--output_path=OUT]

Every lm_eval flag works as with the `lm_eval` command (which cannot find models of other
packages). The model arguments are listed in llada_jax/lm_eval_model.py. For the llada_jax
model, --batch_size counts model rows per call: batch_size in --model_args wins over it, and the
results' config and the summary header report the rows per call used (default 32, also for
"auto"), not lm-eval's default 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm_eval._cli import HarnessCLI  # noqa: E402
from lm_eval.utils import setup_logging  # noqa: E402

from llada_jax import lm_eval_model  # noqa: E402  (registers llada_jax)
from llada_jax.host import memory as host_memory  # noqa: E402
from llada_jax.host import xla_flags  # noqa: E402


def main() -> None:
    """lm-eval's `cli_evaluate`, with --batch_size set to the llada_jax model's rows per call
    (`lm_eval_model.set_cli_batch_size`), which its summary header prints. Like the other tools,
    it sets the project's XLA flags and, on CPU, keeps freed memory in the process for the next
    scoring call (llada_jax/host/memory.py)."""
    xla_flags.apply_defaults()
    host_memory.keep_freed_memory()  # before JAX starts its backend
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    lm_eval_model.set_cli_batch_size(args)
    parser.execute(args)


if __name__ == "__main__":
    main()

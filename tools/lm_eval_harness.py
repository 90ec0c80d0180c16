"""lm-evaluation-harness's command line with the `llada_jax` model registered.

  python tools/lm_eval_harness.py run --model llada_jax \
      --model_args workdir=DIR[,step=N,mc_num=128,batch_size=32,cfg_scale=0,...] \
      --tasks hellaswag,arc_challenge [--include_path=MY_TASKS] [--limit=N] [--output_path=OUT]

Every lm_eval flag works as with the `lm_eval` command (which cannot find models of other
packages). The model arguments are listed in llada_jax/lm_eval_model.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm_eval.__main__ import cli_evaluate  # noqa: E402

import llada_jax.lm_eval_model  # noqa: E402, F401  (registers llada_jax)

if __name__ == "__main__":
    cli_evaluate()

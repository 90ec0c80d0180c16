"""Block-size ablation on the 14M model (demo.py:14m): block size x 2 seeds.

  python launch/sweep.py --config=configs/ablations/block_size.py --sweep_dir=sweeps/block
  python launch/sweep.py status sweeps/block

Each run is that model trained for 40 steps on the shipped corpus (configs/demo.py:ablation),
saving and evaluating every 20 steps on the same held-out tokens and masks, each with the bound
of its own model family: the block NELBO for block sizes 4, 16 and 64 (conditioned on the clean
earlier blocks), LLaDA's bound for the full-sequence model. A block model trains on its rows
and their clean copies (2L positions), so its steps cost more than the full model's. One run
alone: --config=configs/ablations/block_size.py:b16-seed1.
"""

import os

from llada_jax.config import load_config_file
from llada_jax.sweep import Sweep

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo.py")

SWEEP = Sweep(
    base=lambda: load_config_file(_DEMO + ":ablation"),
    axes={
        "block_size": {
            "b4": {"diffusion.block_size": 4},
            "b16": {"diffusion.block_size": 16},
            "b64": {"diffusion.block_size": 64},
            "full": {"diffusion.block_size": 0},
        },
    },
    seeds=(0, 1),
)


def get_config(variant: str = ""):
    """The run `variant` of the grid (launch/sweep.py lists them)."""
    return SWEEP.run_config(variant)

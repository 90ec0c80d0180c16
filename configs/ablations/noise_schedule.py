"""Noise-schedule ablation on the 14M model (demo.py:14m): schedule x t-sampling x 2 seeds.

  python launch/sweep.py --config=configs/ablations/noise_schedule.py --sweep_dir=sweeps/noise
  python launch/sweep.py status sweeps/noise

Each run is that model trained for 40 steps on the shipped corpus (configs/demo.py:ablation,
about 3 minutes on 2 CPU cores with its evaluation), saving and evaluating every 20 steps on the
same held-out tokens and masks. One run alone:
--config=configs/ablations/noise_schedule.py:cosine-stratified-seed1.
"""

import os

from llada_jax.config import load_config_file
from llada_jax.sweep import Sweep

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo.py")

SWEEP = Sweep(
    base=lambda: load_config_file(_DEMO + ":ablation"),
    axes={
        "schedule": {
            "linear": {"diffusion.schedule": "linear"},
            "cosine": {"diffusion.schedule": "cosine"},
            "poly2": {"diffusion.schedule": "polynomial", "diffusion.power": 2.0},
            "poly3": {"diffusion.schedule": "polynomial", "diffusion.power": 3.0},
        },
        "t_sampling": {
            "iid": {"diffusion.t_sampling": "iid"},
            "stratified": {"diffusion.t_sampling": "stratified"},
        },
    },
    seeds=(0, 1),
)


def get_config(variant: str = ""):
    """The run `variant` of the grid (launch/sweep.py lists them)."""
    return SWEEP.run_config(variant)

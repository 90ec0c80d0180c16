"""Noise-schedule ablation on the demo model: schedule x t-sampling x 2 seeds, 12 runs.

  python launch/sweep.py --config=configs/ablations/noise_schedule.py --sweep_dir=sweeps/noise
  python launch/sweep.py status sweeps/noise

Each run is the demo model trained for 40 steps on the shipped corpus (about 2 minutes on 2 CPU
cores with its evaluation), saving and evaluating every 20 steps on the same held-out tokens and
masks. One run
alone: --config=configs/ablations/noise_schedule.py:cosine-stratified-seed1.
"""

import importlib.util
import os

from llada_jax.sweep import Sweep

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo.py")


def base():
    spec = importlib.util.spec_from_file_location("demo_config", _DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config()
    c.train.steps = 40
    c.optim.update(warmup_steps=5, decay_steps=15)
    c.checkpoint.update(save_every=20, max_to_keep=10)
    c.sample.num_samples = 0
    # The spread of each run's own loss estimator and gradient norm, 8 draws on 8 rows.
    c.eval.update(objective_draws=8, objective_rows=8)
    return c


SWEEP = Sweep(
    base=base,
    axes={
        "schedule": {
            "linear": {"diffusion.schedule": "linear"},
            "cosine": {"diffusion.schedule": "cosine"},
            "poly2": {"diffusion.schedule": "polynomial", "diffusion.power": 2.0},
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

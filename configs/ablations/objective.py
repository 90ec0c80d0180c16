"""Objective ablation on the 14M model (demo.py:14m): one change at a time to the estimator.

  python launch/sweep.py --config=configs/ablations/objective.py --sweep_dir=sweeps/objective
  python tools/compare_runs.py sweeps/objective --baseline=elbo

Every run trains the 40-step demo cell of configs/ablations/noise_schedule.py (linear schedule,
iid t) with one thing changed:

  elbo           LLaDA's estimator (the baseline)
  bell           t ~ Beta(2, 2) with the importance weight 1 / q(t): the same ELBO
  eps0.05        the eps floor raised from 1e-3 to 0.05 (mask rates below it never trained)
  clip0.1_0.9    BD3-LM's clipped mask rates [0.1, 0.9]: the loss is not a bound
  unweighted     the mean masked cross-entropy, without the ELBO weight: not a bound
  paired         8 distinct rows per step, each twice with independent masks
  complementary  the same 8 rows, the second copy masking what the first leaves visible

paired and complementary see half the distinct tokens of the others at the same compute; the
comparison between them is the point. The held-out bound of the evaluation job is the same for
all of them, so their eval columns compare; compare_runs marks the training losses that are not
bounds.
"""

import os

from llada_jax.config import load_config_file
from llada_jax.sweep import Sweep

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo.py")

SWEEP = Sweep(
    base=lambda: load_config_file(_DEMO + ":ablation"),
    axes={
        "objective": {
            "elbo": {},
            "bell": {"diffusion.t_density": "bell"},
            "eps0.05": {"diffusion.eps": 0.05},
            "clip0.1_0.9": {"diffusion.eps": 0.1, "diffusion.t_max": 0.9},
            "unweighted": {"diffusion.loss_weight": "none"},
            "paired": {"diffusion.masking": "paired"},
            "complementary": {"diffusion.masking": "complementary"},
        },
    },
    seeds=(0, 1),
)


def get_config(variant: str = ""):
    """The run `variant` of the grid (launch/sweep.py lists them)."""
    return SWEEP.run_config(variant)

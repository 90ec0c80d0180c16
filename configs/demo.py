"""Demo: a small LLaDA learns the shipped KJV corpus in about three minutes on a 2-core CPU.

  python -m llada_jax.train --config=configs/demo.py --workdir=demo_run   (:quick for 30 steps)

d_model 128, 2 layers, rows of 64 tokens, batch 32, 2000 steps (4M tokens, about 4 passes
over the corpus). The masked cross-entropy falls from ~8.3 (log of the 4096-token vocabulary)
through the unigram plateau (~6.0, where a masked-diffusion model knows word frequencies but not
yet where to look) to ~5.0; the samples at the end are corpus phrases in KJV order ("the
children of Israel", "Jesus answered them, and said"), still circling. The end prints the word
figures of the samples and the held-out NLL bound, each beside the untrained model's. docs/demo.md
has three runs' figures and samples, and :long.

:long trains 6000 steps (about 11 minutes; held-out bound 4.75 against 5.22). :14m is the
14M-parameter model of docs/performance.md (d_model 384, 6 layers, rows of 256); :ablation is
the 40-step run of that model each cell of configs/ablations/ trains.

  python tools/evaluate.py --workdir=demo_run --watch     (beside it: each checkpoint's bound)
"""

from llada_jax.config import ConfigDict, apply_variant, base_config

# The model of docs/performance.md and docs/ablations.md.
_14M = {
    "model.d_model": 384,
    "model.n_layers": 6,
    "model.n_heads": 6,
    "model.n_kv_heads": 6,
    "model.mlp_hidden": 1024,
    "model.scan_unroll": 6,
    "model.init_std": 0.02,
    "data.seq_len": 256,
    "data.batch_size": 16,
    "diffusion.loss_weight": "elbo",
    "optim.lr": 2e-3,
    "optim.warmup_steps": 10,
    "optim.decay_steps": 30,
    "optim.final_lr": 2e-4,
    "train.steps": 120,
    "train.log_every": 10,
    "sample.gen_length": 48,
    "sample.steps": 48,
}

VARIANTS = {
    "quick": {"train.steps": 30, "optim.warmup_steps": 5, "optim.decay_steps": 15},
    "long": {"train.steps": 6000, "optim.decay_steps": 1200, "checkpoint.save_every": 1000},
    "14m": _14M,
    # The runs of the ablations (configs/ablations/): 40 steps, saved and evaluated every 20,
    # with the spread of the run's own loss estimator and gradient norm (8 draws on 8 rows).
    "ablation": {
        **_14M,
        "train.steps": 40,
        "optim.warmup_steps": 5,
        "optim.decay_steps": 15,
        "checkpoint.save_every": 20,
        "checkpoint.max_to_keep": 10,
        "sample.num_samples": 0,
        "train.final_bound": False,
        "train.compare_untrained": False,
        "eval.generate": False,
        "eval.objective_draws": 8,
        "eval.objective_rows": 8,
    },
}


def get_config(variant: str = "") -> ConfigDict:
    c = base_config()
    # A larger initialization than LLaDA's 0.02: attention starts from less uniform scores and
    # the model leaves the unigram plateau in a few hundred steps rather than thousands.
    c.model.update(d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=384)
    c.model.update(scan_unroll=2, init_std=0.08)
    c.data.update(seq_len=64, batch_size=32)
    # The mean masked cross-entropy (not the ELBO's 1/t weight): lower-variance gradients, and a
    # better held-out bound at this budget in the objective ablation (docs/ablations.md).
    c.diffusion.loss_weight = "none"
    c.optim.update(lr=3e-3, warmup_steps=20, decay_steps=400, final_lr=3e-4, weight_decay=0.01)
    c.train.update(steps=2000, log_every=100, final_bound=True, compare_untrained=True)
    c.checkpoint.save_every = 500
    # Sampled with temperature and blocks of 8: greedy decoding of a model this young circles
    # through its likeliest phrase ("the children of the children of").
    c.sample.update(num_samples=4, gen_length=32, steps=32, block_length=8, temperature=0.8)
    # tools/evaluate.py and the bound printed at the end: 4096 held-out tokens, 4 masks per row.
    c.eval.update(num_tokens=4096, num_samples=4)
    return apply_variant(c, variant, VARIANTS)

"""Demo: a 14M-parameter LLaDA trained on the shipped KJV corpus in a few minutes on a CPU.

  python -m llada_jax.train --config=configs/demo.py --workdir=demo_run   (:quick for 30 steps)

(:ablation is the 40-step run each cell of configs/ablations/ trains.)

d_model 384, 6 layers, 6 heads, sequences of 256, batch 16 (the model of the issue's MFU
comparison): in 120 steps the loss falls from ~8.3 (log of the 4096-token vocabulary) to ~6.0,
the word statistics of the corpus; the samples at the end show its vocabulary (LORD, fathers,
holy, ...) without phrasing yet; longer runs: --config.train.steps=N.

  python tools/evaluate.py --workdir=demo_run --watch     (beside it: each checkpoint's bound)
"""

from llada_jax.config import ConfigDict, apply_variant, base_config

VARIANTS = {
    "quick": {"train.steps": 30, "optim.warmup_steps": 5, "optim.decay_steps": 15},
    # The runs of the ablations (configs/ablations/): 40 steps, saved and evaluated every 20,
    # with the spread of the run's own loss estimator and gradient norm (8 draws on 8 rows).
    "ablation": {
        "train.steps": 40,
        "optim.warmup_steps": 5,
        "optim.decay_steps": 15,
        "checkpoint.save_every": 20,
        "checkpoint.max_to_keep": 10,
        "sample.num_samples": 0,
        "eval.generate": False,
        "eval.objective_draws": 8,
        "eval.objective_rows": 8,
    },
}


def get_config(variant: str = "") -> ConfigDict:
    c = base_config()
    c.model.update(d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, mlp_hidden=1024, scan_unroll=6)
    c.data.update(seq_len=256, batch_size=16)
    c.optim.update(lr=2e-3, warmup_steps=10, decay_steps=30, final_lr=2e-4, weight_decay=0.01)
    c.train.update(steps=120, log_every=10)
    # Sampled with temperature: a model this young is confident mostly about punctuation, and
    # greedy low-confidence decoding would print commas; Gumbel sampling shows what it learned.
    c.sample.update(num_samples=4, gen_length=48, steps=48, block_length=8, temperature=0.8)
    c.sample.compare_untrained = True  # the word figures of an untrained model's samples beside
    # tools/evaluate.py: 4096 held-out tokens, 4 masks per row, about 10 s per checkpoint.
    c.eval.update(num_tokens=4096, num_samples=4)
    return apply_variant(c, variant, VARIANTS)

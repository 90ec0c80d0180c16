"""Tiny: a 2-layer GQA model for tests and smoke runs.

  python -m llada_jax.train --config=configs/tiny.py --workdir=runs/tiny

Expected: 6 steps in seconds on a CPU (most of it compilation), the loss near log(4096) = 8.3
(the model is far too small and short-lived to learn), two short samples printed at the end.
"""

from llada_jax.config import ConfigDict, apply_variant, base_config

VARIANTS = {"untied": {"model.tie_embeddings": False}}


def get_config(variant: str = "") -> ConfigDict:
    c = base_config()
    c.model.update(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=128,
        tie_embeddings=True,
        scan_unroll=2,
    )
    c.data.update(seq_len=64, batch_size=8)
    c.optim.update(lr=1e-3, warmup_steps=2, decay_steps=2)
    c.train.update(steps=6, log_every=2)
    c.sample.update(num_samples=2, gen_length=16, steps=4, block_length=16)
    return apply_variant(c, variant, VARIANTS)

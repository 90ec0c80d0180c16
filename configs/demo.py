"""Demo: a 16M-parameter LLaDA trained on the shipped KJV corpus in a few minutes on a CPU.

d_model 384, 6 layers, 6 heads, sequences of 256, batch 16: the loss falls from ~8.3 (log of
the 4096-token vocabulary) and the samples at the end show learned words and phrasing.
"""
from llada_jax.config import ConfigDict, apply_variant, base_config

VARIANTS = {"quick": {"train.steps": 30}}


def get_config(variant: str = "") -> ConfigDict:
    c = base_config()
    c.model.update(d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, mlp_hidden=1024,
                   scan_unroll=6)
    c.data.update(seq_len=256, batch_size=16)
    c.optim.update(lr=2e-3, warmup_steps=10, decay_steps=30, final_lr=2e-4, weight_decay=0.01)
    c.train.update(steps=120, log_every=10)
    c.sample.update(num_samples=4, gen_length=48, steps=48, block_length=48)
    return apply_variant(c, variant, VARIANTS)

"""AR to block diffusion: an autoregressive model trained on with a block-size schedule.

  python -m llada_jax.train --config=configs/block_conversion.py --workdir=conv \
      --config.train.init_from=AR_WORKDIR
  python tools/evaluate.py --workdir=conv --watch --idle_timeout=60

AR_WORKDIR is an autoregressive checkpoint of the demo model's shape imported with
tools/convert_hf.py (tests/fixtures/make_hf_llama_ar.py trains one with transformers); without
init_from the same schedule trains from scratch, the comparison of docs/performance.md ("AR to
diffusion"). The schedule is warmup-stable-decay over the block size, as LLaDA 2.0 converts its
AR checkpoints:
- warmup: blocks of 2, 8 and 32 tokens (50 steps each), from next-token prediction's neighbour
  toward the full sequence, so the causal model's knowledge carries over while its attention
  widens;
- stable: the full 64-token sequence (LLaDA's model) for 200 steps;
- decay: blocks of 32 and 16 (50 steps each), then the target block size 8 (diffusion.block_size)
  for the last 50 steps.
A checkpoint ends each phase; the evaluation job scores each with the block-8 bound (the run's
own family), on the same held-out tokens and masks.
"""

from llada_jax.config import ConfigDict, load_config_file


def get_config(variant: str = "") -> ConfigDict:
    c = load_config_file(__file__.replace("block_conversion.py", "demo.py"))
    c.diffusion.update(block_size=8, loss_weight="elbo")
    c.train.update(
        steps=500,
        log_every=50,
        block_size_schedule=((2, 50), (8, 100), (32, 150), (0, 350), (32, 400), (16, 450)),
        final_bound=False,
        compare_untrained=False,
    )
    c.optim.update(lr=2e-3, warmup_steps=20, decay_steps=100, final_lr=2e-4)
    c.checkpoint.update(save_every=50, max_to_keep=None)
    c.sample.num_samples = 0
    c.eval.generate = False
    return c

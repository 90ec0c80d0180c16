"""LLaDA 8B: the paper's architecture and pretraining optimizer.

  python launch/tpu_pod.py run --name=NAME --zone=ZONE --config=configs/llada_8b.py \
      --workdir=RUN_DIR   (a pod slice made with `create` and `install`)
  python tools/aot_compile.py --config=configs/llada_8b.py --tpu=v5p-128   (memory and step
      time, from a CPU machine with the `tpu` extra)

32 layers, d_model 4096, 32 heads (MHA), SwiGLU 12288, vocab 126464, untied head, RoPE theta 5e5.
2.3T tokens at sequence length 4096 and global batch 1280 (5,242,880 tokens per step):
AdamW (weight decay 0.1), LR 0 -> 4e-4 over 2000 steps, held; 1e-4 after 1.2T tokens; linear
1e-4 -> 1e-5 over the last 0.3T tokens.

Target: TPU v5p-128 (64 chips, topology v5p:4x4x4), mesh (data 1, fsdp 64, tensor 1): params,
gradients and Adam moments (float32) sharded 64 ways, bfloat16 compute, the Pallas splash-attention
kernel (kernels.attention="splash": the (B, H, L, L) maps never reach HBM), no remat, and 10
micro-batches of 128 x 4096 (2 sequences per chip) per step. AOT report (tools/aot_compile.py
--config=configs/llada_8b.py --tpu=v5p-128, libtpu 0.0.42, no TPU attached): per chip, arguments
1.40 GiB (params + optimizer state), temporaries 79.2 GiB, peak 80.6 GiB of 95 GiB HBM (14 GiB
headroom); estimated step time 13.8 s = XLA's cost model for its ops, 11.1 s, + the attention
kernels' 616 TFLOP per chip at an assumed 50% of peak, 2.7 s (XLA's model cannot see inside the
kernels) -> 5,930 tokens/s/chip and an estimated MFU of 66.5% (model FLOPs with full L x L
attention). Below 45% of peak for the kernels, the estimate falls under 65%.
Alternatives measured the same way: the einsum attention with full remat and 4 micro-batches,
44.1% (36.1 GiB); splash with remat="dots_attn" and 5 micro-batches, 64.6% (78.1 GiB).
On GPUs use kernels.attention="cudnn" instead.
"""

from llada_jax.config import ConfigDict, apply_variant, base_config

TOKENS_PER_STEP = 4096 * 1280
VARIANTS: dict = {}


def steps_for(tokens: float) -> int:
    """Optimizer steps that consume `tokens` tokens."""
    return round(tokens / TOKENS_PER_STEP)


def get_config(variant: str = "") -> ConfigDict:
    c = base_config()
    c.model.update(
        vocab_size=126464,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        mlp_hidden=12288,
        rope_theta=500_000.0,
        dtype="bfloat16",
        remat="none",
    )
    c.kernels.update(attention="splash")
    c.data.update(seq_len=4096, batch_size=1280)
    c.optim.update(
        lr=4e-4,
        schedule="wsd",
        warmup_steps=2000,
        weight_decay=0.1,
        lr_drops=((steps_for(1.2e12), 1e-4),),
        decay_steps=steps_for(0.3e12),
        final_lr=1e-5,
        grad_accum=10,
    )
    c.train.update(steps=steps_for(2.3e12), log_every=10)
    c.mesh.update(shape=(1, -1, 1))
    # A save every 30 min beside every 500 steps: a preemption loses at most 30 min of work
    # (the save on SIGTERM may not fit in the notice); docs/performance.md has the arithmetic.
    c.checkpoint.update(save_every_sec=1800.0)
    return apply_variant(c, variant, VARIANTS)

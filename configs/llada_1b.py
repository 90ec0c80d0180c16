"""LLaDA 1B (the paper's 1B ablation architecture, Table 5): 22 layers, d_model 2048, 32 heads
with 4 KV heads (GQA), SwiGLU 5634, vocab 126464; 1.49B parameters (0.97B non-embedding).

  python launch/tpu_pod.py run --name=NAME --zone=ZONE --config=configs/llada_1b.py \
      --workdir=RUN_DIR   (a pod slice made with `create` and `install`)
  python tools/aot_compile.py --config=configs/llada_1b.py --tpu=v5p-32   (memory and step time,
      from a CPU machine with the `tpu` extra)

Optimizer as for 8B (AdamW, weight decay 0.1, warmup-stable-decay to 4e-4); our choice of run
length: 100k steps of 512 x 4096 tokens (210B tokens), decaying linearly over the last 10%.

Target: TPU v5p-32 (16 chips, topology v5p:2x2x4), mesh (data 1, fsdp 16, tensor 1), bfloat16
compute, the splash-attention kernel, no remat, 8 micro-batches of 64 x 4096 (4 sequences per
chip) per step. AOT report (tools/aot_compile.py --config=configs/llada_1b.py --tpu=v5p-32,
libtpu 0.0.42, no TPU attached): per chip, arguments 1.04 GiB, temporaries 66.6 GiB, peak
67.7 GiB of 95 GiB HBM (27 GiB headroom); estimated step time 4.61 s = XLA's cost model, 3.13 s,
+ the attention kernels' 339 TFLOP per chip at an assumed 50% of peak, 1.48 s -> 28,400
tokens/s/chip, estimated MFU 59%. Attention is a quarter of this model's FLOPs (head_dim 64, L
4096), so the kernels' real speed matters more here than for 8B. Splash with remat="dots_attn"
and 4 micro-batches: 54% (79.3 GiB).
One NVIDIA GPU: the `gpu` variant (cuDNN attention, layers unrolled, 64 micro-batches of 8 x 4096).
Measured on one H200 (tools/benchmark.py, bfloat16, two machines): 48,600-49,500 tokens/s, MFU
47-48%, 82 GiB peak GPU memory at micro-batches of 8. An 80 GB H100 needs micro-batches of 4
(grad_accum=128): 45,500 tokens/s, MFU 44.1%, 53 GiB.
"""

from llada_jax.config import ConfigDict, apply_variant, base_config

VARIANTS: dict = {
    # One NVIDIA GPU: cuDNN flash attention, layers unrolled, micro-batches of 8 x 4096.
    "gpu": {"kernels.attention": "cudnn", "model.scan_layers": False, "optim.grad_accum": 64},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base_config()
    c.model.update(
        vocab_size=126464,
        d_model=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        mlp_hidden=5634,
        rope_theta=500_000.0,
        dtype="bfloat16",
        remat="none",
    )
    c.kernels.update(attention="splash")
    c.data.update(seq_len=4096, batch_size=512)
    c.optim.update(
        lr=4e-4,
        schedule="wsd",
        warmup_steps=2000,
        weight_decay=0.1,
        decay_steps=10_000,
        final_lr=4e-5,
        grad_accum=8,
    )
    c.train.update(steps=100_000, log_every=10)
    c.mesh.update(shape=(1, -1, 1))
    # A save every 30 min beside every 500 steps: a preemption loses at most 30 min of work
    # (the save on SIGTERM may not fit in the notice); docs/performance.md has the arithmetic.
    c.checkpoint.update(save_every_sec=1800.0)
    return apply_variant(c, variant, VARIANTS)

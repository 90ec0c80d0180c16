"""Fused (flash) attention on TPU: the Pallas splash-attention kernel that ships with JAX.

The einsum attention (llada_jax/kernels/attention.py) writes each layer's (B, H, L, L) score and
probability maps to HBM; at long sequences that traffic costs more time than all of the layer's
matmuls. The kernel keeps
them in VMEM, block by block, and never materializes them, forward or backward.

Masks become segment ids: a query sees the keys whose id equals its own. Key padding gives
padded positions id -1, so real tokens never see them (padded queries see only padding, whose
outputs nothing reads). A block-diffusion pattern is a static mask inside the kernel, which
skips the tiles in which no query sees any key. With a mesh, the kernel runs per shard under
shard_map (batch over the data-parallel axes, heads over `tensor`): the caller maps the logical
axes to mesh axes and passes the partition specs, so the kernels need not know the runner's
rules. On backends other than TPU it runs in Pallas's interpreter (for tests; slow).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

BLOCKS = (512, 256, 128)  # tile sizes tried, largest first: the first that divides L is used
# Name of the kernel's residuals (its output and log-sum-exp), which a remat policy may save
# (model.REMAT_POLICIES["dots_attn"]) so that the backward pass does not rerun the kernel.
RESIDUALS = "splash_residuals"


def segment_ids(valid: jax.Array, segments: jax.Array | None) -> jax.Array:
    """(B, L) int32 ids for the kernel: the packed-document id, -1 on key padding."""
    ids = jnp.zeros(valid.shape, jnp.int32) if segments is None else segments.astype(jnp.int32)
    return jnp.where(valid, ids, -1)


def tiles(length: int) -> bool:
    """Whether the kernel can run at this sequence length."""
    return length % BLOCKS[-1] == 0


def block_size(length: int) -> int:
    """The kernel's tile size at this sequence length: the largest of BLOCKS dividing it; raises
    ValueError if none does."""
    for block in BLOCKS:
        if length % block == 0:
            return block
    raise ValueError(
        f"kernels.attention='splash' needs a sequence length (data.seq_len) divisible "
        f"by {BLOCKS[-1]}, got {length}"
    )


def computed_pairs(visible: np.ndarray) -> int:
    """(query, key) pairs the kernel computes under the mask `visible` (L, L) bool: every pair
    of each tile (of `block_size(L)` squared) holding a visible one; the others are skipped."""
    tile = block_size(visible.shape[0])
    n = visible.shape[0] // tile
    any_visible = visible.reshape(n, tile, n, tile).any(axis=(1, 3))
    return int(any_visible.sum()) * tile * tile


def _kernel(
    heads: int, length: int, causal: bool, interpret: bool, visible: np.ndarray | None
) -> sa.SplashAttentionKernel:
    """The kernel for `heads` heads at `length`, its mask causal or full, or `visible` (a
    block-diffusion pattern, (length, length) bool, causal too if `causal`): the kernel skips
    the tiles a mask leaves empty."""
    if visible is not None:
        mask = sa.NumpyMask(visible & np.tril(np.ones_like(visible)) if causal else visible)
    elif causal:
        mask = sa.CausalMask((length, length))
    else:
        mask = sa.FullMask((length, length))
    b = block_size(length)
    blocks = sa.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        use_fused_bwd_kernel=True,
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([mask] * heads),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=blocks,
        residual_checkpoint_name=RESIDUALS,
        interpret=interpret,
    )


def _local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ids: jax.Array,
    causal: bool,
    interpret: bool,
    visible: np.ndarray | None,
) -> jax.Array:
    kernel = _kernel(q.shape[1], q.shape[2], causal, interpret, visible)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
        q, k, v, ids
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ids: jax.Array,
    causal: bool,
    interpret: bool,
    specs: tuple[P, P, P] | None = None,
    visible: np.ndarray | None = None,
) -> jax.Array:
    """softmax(q k^T) v within equal ids: q (B, H, L, D) already scaled, k, v (B, K, L, D) with K
    dividing H (query head h uses kv head h // (H / K)), ids (B, L) from `segment_ids`
    -> (B, H, L, D). interpret: run in Pallas's interpreter (not on a TPU). specs: the
    shard_map's partition specs of q and the output, of k and v, and of ids, i.e. the logical
    axes ("batch", "heads", None, None), ("batch", "kv_heads", None, None) and ("batch", None)
    under the caller's rules; needed on a mesh of more than one device, unread otherwise.
    visible: (L, L) bool, which keys each query may see besides the ids (block diffusion,
    `attention.Blocks.visible`); None: all (or the causal ones)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _local(q, k, v, ids, causal, interpret, visible)
    if specs is None:
        raise ValueError("splash attention on a multi-device mesh needs the partition specs")
    heads, kv_heads, batch = specs
    return jax.shard_map(
        lambda q, k, v, ids: _local(q, k, v, ids, causal, interpret, visible),
        in_specs=(heads, kv_heads, kv_heads, batch),
        out_specs=heads,
        check_vma=False,
    )(q, k, v, ids)

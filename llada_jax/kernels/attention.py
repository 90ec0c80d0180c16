"""Every attention implementation behind one function: softmax(q k^T + mask) v.

`mask` builds what the chosen implementation takes from the key-padding mask and packed segment
ids, once per forward pass; `attention` computes one layer's attention with it.
`window_attention` is the sampler's K/V cache: the queries of a window of the sequence over
the window's fresh keys and values and an earlier pass's everywhere else. Which
implementation runs is `Kernels.attention`, chosen when the model is built
(llada_jax/kernels/choice.py):
- "xla": einsums, differentiated by autodiff (any backend);
- "mkl": oneMKL kernels on a CPU (llada_jax/kernels/mkl.py), forward and backward;
- "cudnn": jax.nn.dot_product_attention, cuDNN's fused kernel on NVIDIA GPUs (elsewhere its XLA
  implementation);
- "splash": the Pallas splash kernel on TPU (llada_jax/kernels/splash.py); at a length it cannot
  tile (a sampling canvas) the einsums run.

Letters in names: B batch, L length, N query heads, K kv heads (K divides N; query head n uses kv
head n // G), G = N / K, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.kernels import mkl, splash
from llada_jax.kernels.choice import Kernels

NEG_INF = -1e30  # additive mask bias: finite, so a row with no visible key is uniform, not NaN
# Names of residuals a remat policy may keep so that the backward pass does not rerun the
# forward kernel (the splash kernel's output and log-sum-exp).
SAVED_RESIDUALS = splash.RESIDUALS


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The attention pattern of a block-diffusion model over sequences of blocks of `size` tokens.

    Without `clean_copy`, block-causal: a query sees the keys of its own block and of earlier
    blocks (a sequence of clean blocks, or clean blocks and a last one being denoised). With
    `clean_copy` the sequence is [x_t | x_0], a noised row followed by its clean copy (positions
    repeating): a noisy query sees the noisy keys of its own block and the clean keys of earlier
    blocks; a clean query sees the clean keys of its own and earlier blocks, never a noisy one.
    """

    size: int
    clean_copy: bool = False

    def visible(self, length: int) -> np.ndarray:
        """(length, length) bool: whether query i may see key j. Static (numpy), so it enters
        the program as a constant and splash can skip the blocks it never sees."""
        if not self.clean_copy:
            block_L = np.arange(length) // self.size
            return block_L[None, :] <= block_L[:, None]
        half = length // 2
        block_L = np.tile(np.arange(half) // self.size, 2)
        clean_L = np.arange(length) >= half
        same_half = clean_L[:, None] == clean_L[None, :]
        noisy_q, clean_k = ~clean_L[:, None], clean_L[None, :]
        same_block = block_L[:, None] == block_L[None, :]
        earlier_k = block_L[None, :] < block_L[:, None]
        return (
            (noisy_q & ~clean_k & same_block)
            | (clean_k & earlier_k)
            | (~noisy_q & same_half & same_block)
        )


def bias(
    valid_BxL: jax.Array,
    segment_ids_BxL: jax.Array | None,
    causal: bool,
    blocks: Blocks | None = None,
    query_positions_BxQ: jax.Array | None = None,
) -> jax.Array:
    """Additive float32 bias over the scores, 0 where a query may see a key, NEG_INF elsewhere.

    valid: key-padding mask (False = padding, never attended to); segment_ids: packed
    documents, attention stays within equal ids; blocks: a block-diffusion pattern;
    query_positions: (B, Q) the positions of the queries whose rows are wanted (default: every
    position, Q = L). Shape (B, 1, 1, L) for key padding alone, else (B, 1, Q, L); shared by
    every layer and head.
    """
    length = valid_BxL.shape[1]
    mask = valid_BxL[:, None, :]
    # Static (numpy) query positions when they are all of them: the patterns enter the program
    # as constants.
    at_BxQ = np.arange(length)[None] if query_positions_BxQ is None else query_positions_BxQ
    if segment_ids_BxL is not None:
        query_segment_BxQ = (
            segment_ids_BxL
            if query_positions_BxQ is None
            else jnp.take_along_axis(segment_ids_BxL, query_positions_BxQ, axis=1)
        )
        mask = mask & (query_segment_BxQ[:, :, None] == segment_ids_BxL[:, None, :])
    if causal:
        mask = mask & (at_BxQ[:, :, None] >= np.arange(length))
    if blocks is not None:
        visible_LxL = blocks.visible(length)
        mask = mask & (
            visible_LxL if query_positions_BxQ is None else jnp.asarray(visible_LxL)[at_BxQ]
        )
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def mask(
    valid_BxL: jax.Array,
    segment_ids_BxL: jax.Array | None,
    kernels: Kernels,
    causal: bool,
    valid_prefix: bool = False,
    blocks: Blocks | None = None,
) -> jax.Array:
    """What `attention` takes: segment ids (B, L) for splash (-1 on padding; the block pattern
    goes into the kernel itself); for cuDNN, when each row's valid positions are a prefix
    (`valid_prefix`) and nothing is packed or blocked, the (B,) int32 key lengths, which spare
    cuDNN reading a bias per head; else `bias`."""
    if kernels.attention == "splash":
        return splash.segment_ids(valid_BxL, segment_ids_BxL)
    if blocks is not None:
        return bias(valid_BxL, segment_ids_BxL, causal, blocks)
    if kernels.attention == "cudnn" and valid_prefix and segment_ids_BxL is None:
        # At least one key, so that a filler row (no valid position) stays finite, as with the
        # bias: its NaNs would reach the weight gradients through 0 * NaN.
        return jnp.maximum(jnp.sum(valid_BxL, axis=-1, dtype=jnp.int32), 1)
    return bias(valid_BxL, segment_ids_BxL, causal)


def attention(
    q_BxLxNxH: jax.Array,
    k_BxLxKxH: jax.Array,
    v_BxLxKxH: jax.Array,
    mask: jax.Array,
    kernels: Kernels,
    causal: bool,
    splash_specs: tuple[jax.sharding.PartitionSpec, ...] | None = None,
    blocks: Blocks | None = None,
) -> jax.Array:
    """softmax(q k^T + mask) v -> (B, L, N, H), q already scaled by 1 / sqrt(H); scores and
    softmax in float32. `mask` from `mask` with the same kernels and `blocks`. splash_specs:
    the splash kernel's partition specs on a mesh (`splash.splash_attention`'s `specs`); other
    implementations do not read them. `blocks` is read by splash only (the others have it in
    their bias)."""
    impl = kernels.attention
    length = q_BxLxNxH.shape[1]
    if impl == "splash" and splash.tiles(length):
        to_heads_first = lambda x: x.transpose(0, 2, 1, 3)
        out_BxNxLxH = splash.splash_attention(
            to_heads_first(q_BxLxNxH),
            to_heads_first(k_BxLxKxH),
            to_heads_first(v_BxLxKxH),
            mask,
            causal,
            interpret=kernels.platform != "tpu",
            specs=splash_specs,
            visible=None if blocks is None else blocks.visible(length),
        )
        return out_BxNxLxH.transpose(0, 2, 1, 3)
    if impl == "splash":  # a length the kernel cannot tile: `mask` holds segment ids
        mask = bias(mask >= 0, mask, causal, blocks)
    if impl == "cudnn":
        return _dot_product_attention(
            q_BxLxNxH,
            k_BxLxKxH,
            v_BxLxKxH,
            mask,
            causal,
            "cudnn" if kernels.platform == "gpu" else "xla",
        )
    if impl == "mkl":
        return mkl.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask[:, 0])
    return _grouped_einsums(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask)


def window_attention(
    q_BxWxNxH: jax.Array,
    k_BxWxKxH: jax.Array,
    v_BxWxKxH: jax.Array,
    k_cache_BxLxKxH: jax.Array,
    v_cache_BxLxKxH: jax.Array,
    start: jax.Array,
    bias_Bx1x1xL: jax.Array,
) -> jax.Array:
    """The queries of a window of positions [start, start + W) over every key of the sequence:
    the window's own keys and values there, the cached ones (an earlier full pass's) elsewhere.
    -> (B, W, N, H); q scaled as for `attention`; bias from `bias` (key padding). Einsums on any
    backend: W differs from L, and the fused kernels take equal lengths."""
    k_BxLxKxH = jax.lax.dynamic_update_slice_in_dim(k_cache_BxLxKxH, k_BxWxKxH, start, axis=1)
    v_BxLxKxH = jax.lax.dynamic_update_slice_in_dim(v_cache_BxLxKxH, v_BxWxKxH, start, axis=1)
    return _grouped_einsums(q_BxWxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1x1xL)


def query_attention(
    q_BxKxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, bias_Bx1xKxL: jax.Array
) -> jax.Array:
    """The attention of K queries (some of a sequence's positions) over all L of its keys ->
    (B, K, N, H); q scaled as for `attention`, bias from `bias` at the queries' positions.
    Einsums on any backend:
    the fused kernels take as many queries as keys."""
    return _grouped_einsums(q_BxKxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xKxL)


def _grouped_einsums(
    q_BxQxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, bias_Bx1xQxL: jax.Array
) -> jax.Array:
    """The einsum attention of Q queries over L keys. Heads go before the sequence, and the G
    query heads sharing a kv head are stacked along the query axis, so each kv head is one
    (G*Q, H) x (H, L) matmul and k, v are never repeated. Differentiated by autodiff: its
    residuals are q, k, v and the probabilities, as a hand-written FlashAttention-style
    backward's would be, and on XLA:CPU it runs faster than one."""
    b, lq, n, h = q_BxQxNxH.shape
    lk, kv = k_BxLxKxH.shape[1], k_BxLxKxH.shape[2]
    q_BxKxGQxH = q_BxQxNxH.reshape(b, lq, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    q_BxKxGQxH = q_BxKxGQxH.reshape(b, kv, n // kv * lq, h)
    k_BxKxLxH = k_BxLxKxH.transpose(0, 2, 1, 3)
    v_BxKxLxH = v_BxLxKxH.transpose(0, 2, 1, 3)
    s_BxKxGQxL = jnp.einsum(
        "bkqh,bksh->bkqs", q_BxKxGQxH, k_BxKxLxH, preferred_element_type=jnp.float32
    )
    s_BxKxGQxL = (s_BxKxGQxL.reshape(b, kv, n // kv, lq, lk) + bias_Bx1xQxL[:, :, None]).reshape(
        s_BxKxGQxL.shape
    )
    p_BxKxGQxL = jax.nn.softmax(s_BxKxGQxL, axis=-1).astype(v_BxKxLxH.dtype)
    out_BxKxGQxH = jnp.einsum("bkqs,bksh->bkqh", p_BxKxGQxL, v_BxKxLxH)
    out_BxKxGxQxH = out_BxKxGQxH.reshape(b, kv, n // kv, lq, h)
    return out_BxKxGxQxH.transpose(0, 3, 1, 2, 4).reshape(b, lq, n, h)


def _dot_product_attention(
    q_BxLxNxH: jax.Array,
    k_BxLxKxH: jax.Array,
    v_BxLxKxH: jax.Array,
    mask: jax.Array,
    causal: bool,
    implementation: str,
) -> jax.Array:
    """jax.nn.dot_product_attention. mask: (B,) key lengths (each row's valid keys are its first
    `mask[b]`), or a `bias` (packed segments, left padding), broadcast to the full (B, 1, L, L)
    that cuDNN expects."""
    if mask.ndim == 1:
        return jax.nn.dot_product_attention(
            q_BxLxNxH,
            k_BxLxKxH,
            v_BxLxKxH,
            scale=1.0,
            is_causal=causal,
            key_value_seq_lengths=mask,
            implementation=implementation,
        )
    b, length = q_BxLxNxH.shape[:2]
    bias_Bx1xLxL = jnp.broadcast_to(mask, (b, 1, length, length)).astype(q_BxLxNxH.dtype)
    return jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias=bias_Bx1xLxL, scale=1.0, implementation=implementation
    )

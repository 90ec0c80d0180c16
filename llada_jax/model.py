"""The LLaDA / LLaMA-style transformer (REFERENCES §5), bidirectional by default.

Pre-norm blocks: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)). RMSNorm is computed in
float32, RoPE is rotate-half (NeoX) style on positions 0..L-1, no biases anywhere. Multi-head and
grouped-query attention (n_kv_heads divides n_heads). Attention is full (every query sees every
valid key) unless `causal` is set, for autoregressive baselines and imported AR weights.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, layers);
`llada_jax.sharding` maps them to mesh axes. Parameters are stored in `param_dtype` and cast to the
compute `dtype` at use.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import mkl, sharding, splash

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # dots_no_batch plus the splash kernel's output and log-sum-exp: only the projections' inputs
    # (norms, RoPE) are recomputed, not the attention.
    "dots_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(splash.RESIDUALS)),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
MATMUL_IMPLS = ("auto", "xla", "mkl")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of the transformer (the `model` section of a config)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    head_dim: int = 0  # 0: d_model // n_heads
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    causal: bool = False
    scan_layers: bool = True
    # Layers per scan iteration. CPU configs unroll fully: XLA:CPU does not update a rolled
    # scan's stacked per-layer residuals in place (it zero-fills and copies them, ~15% of a demo
    # step); on accelerators 1 keeps compile time independent of depth.
    scan_unroll: int = 1
    # "xla": the einsum attention below (any backend); "cudnn": jax.nn.dot_product_attention's
    # fused (flash) kernel on NVIDIA GPUs, which never materializes the L x L map (elsewhere
    # jax's XLA implementation of the same call runs); "splash":
    # JAX's Pallas splash-attention kernel on TPU (llada_jax/splash.py), likewise fused; at a
    # length it cannot tile (not a multiple of 128, e.g. a sampling canvas) the einsum one runs.
    attention: str = "xla"
    # Who computes float32 matmuls and the "xla" attention on a single CPU device: "mkl" (Intel
    # oneMKL kernels, llada_jax/mkl.py, the `mkl` extra), "xla", or "auto" (MKL where it is
    # installed). Elsewhere (accelerators, several devices, bfloat16) XLA always does.
    matmul: str = "auto"
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden",
                     "scan_unroll"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        if self.matmul not in MATMUL_IMPLS:
            raise ValueError(f"model.matmul={self.matmul!r} is not one of {MATMUL_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {sorted(DTYPES)}")

    @classmethod
    def from_config(cls, c: Any) -> "ModelConfig":
        """Builds from a ConfigDict (or mapping) holding exactly these field names."""
        return cls(**dict(c))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]


def _init(std: float, names: tuple[str | None, ...]) -> nnx.Initializer:
    """Normal(std) initializer annotated with logical axis names."""
    return nnx.with_partitioning(nnx.initializers.normal(std), names)


class Dense(nnx.Module):
    """A bias-free projection: x (..., *in_shape) -> (..., *out_shape), kernel (*in_shape, *out_shape).

    Computed as one 2-D matmul (leading dims and in_shape flattened): with several contracting or
    batch-like dims, XLA:CPU canonicalizes the backward weight-gradient dots by materializing large
    transposes of the activations, which cost about as much as the matmuls themselves.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 names: tuple[str, ...], cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.in_shape, self.out_shape = in_shape, out_shape
        self.dtype = cfg.compute_dtype
        self.matmul = cfg.matmul
        self.kernel = nnx.Param(_init(cfg.init_std, names)(
            rngs.params(), (*in_shape, *out_shape), cfg.weight_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:x.ndim - len(self.in_shape)]
        x = x.astype(self.dtype).reshape(-1, math.prod(self.in_shape))
        kernel = self.kernel[...].astype(self.dtype).reshape(x.shape[1], -1)
        y = mkl.matmul(x, kernel) if mkl.enabled(self.matmul, self.dtype) else x @ kernel
        return y.reshape(*lead, *self.out_shape)


def project(x: jax.Array, *denses: Dense) -> tuple[jax.Array, ...]:
    """Each of `denses` (sharing in_shape) applied to x. Where MKL computes the matmuls (one
    device) this is one matmul against the kernels concatenated along their output axis: wider
    products run faster, and the backward's input gradient becomes one matmul instead of a sum of
    several. Elsewhere concatenating kernels sharded over `tensor` would move them, so each
    projection is its own matmul."""
    first = denses[0]
    if not mkl.enabled(first.matmul, first.dtype):
        return tuple(d(x) for d in denses)
    lead = x.shape[:x.ndim - len(first.in_shape)]
    x = x.astype(first.dtype).reshape(-1, math.prod(first.in_shape))
    kernels = [d.kernel[...].astype(first.dtype).reshape(x.shape[1], -1) for d in denses]
    y = mkl.matmul(x, jnp.concatenate(kernels, axis=1))
    splits = np.cumsum([k.shape[1] for k in kernels])[:-1]
    return tuple(part.reshape(*lead, *d.out_shape)
                 for part, d in zip(jnp.split(y, splits, axis=1), denses))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, the statistics in float32 whatever the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.scale = nnx.Param(
            nnx.with_partitioning(nnx.initializers.ones, ("embed",))(
                rngs.params(), (cfg.d_model,), cfg.weight_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (length, head_dim) in float32 for rotate-half RoPE.

    Computed on the host, so they enter the program as constants: traced, XLA fuses the cos/sin
    into every layer's RoPE and evaluates them per batch row and head (~10% of a CPU demo step).
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x (B, L, heads, head_dim) by position; computed in float32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


NEG_INF = -1e30  # additive mask bias: finite, so a row with no visible key is uniform, not NaN


def attention_bias(valid: jax.Array, segment_ids: jax.Array | None, causal: bool) -> jax.Array:
    """Additive float32 bias over the scores, 0 where a query may see a key, NEG_INF elsewhere.

    valid (B, L): key-padding mask (False = padding, never attended to).
    segment_ids (B, L): packed documents; attention stays within equal ids.
    Shape (B, 1, 1, L_k) for key padding alone, else (B, 1, L_q, L_k); computed once per forward
    and shared by every layer and head.
    """
    mask = valid[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if causal:
        length = valid.shape[1]
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None]
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def attention_mask(valid: jax.Array, segment_ids: jax.Array | None, cfg: ModelConfig,
                   valid_prefix: bool = False) -> jax.Array:
    """The mask every layer's attention takes: `splash.segment_ids` for the splash kernel; for
    cuDNN, when each row's valid positions are a prefix (`valid_prefix`) and nothing is packed,
    the (B,) int32 key lengths (see `fused_attention`); else `attention_bias`."""
    if cfg.attention == "splash":
        return splash.segment_ids(valid, segment_ids)
    if cfg.attention == "cudnn" and valid_prefix and segment_ids is None:
        # At least one key, so that a filler row (no valid position) stays finite, as with the
        # bias: its NaNs would reach the weight gradients through 0 * NaN.
        return jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.int32), 1)
    return attention_bias(valid, segment_ids, cfg.causal)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                    causal: bool) -> jax.Array:
    """jax.nn.dot_product_attention for q (B, L, H, D), k, v (B, L, K, D) -> (B, L, H, D): cuDNN's
    flash kernel on NVIDIA GPUs, jax's XLA implementation elsewhere.

    mask: (B,) key lengths (each row's valid keys are its first `mask[b]`), or an
    `attention_bias` (packed segments, left padding). Lengths let cuDNN skip the (B, 1, L, L)
    bias, which every head's kernel would read from HBM.
    """
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if mask.ndim == 1:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            key_value_seq_lengths=mask, implementation=impl)
    b, length = q.shape[:2]
    bias = jnp.broadcast_to(mask, (b, 1, length, length)).astype(q.dtype)  # cuDNN: full L_q
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=impl)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v for q (B, K, G*L, D) (already scaled), k, v (B, K, L, D), bias
    (B, 1, 1 or L, L) -> (B, K, G*L, D). K kv heads, each shared by G query heads; scores and
    softmax in float32.

    Differentiated by autodiff: its residuals are q, k, v and the probabilities, as a hand-written
    FlashAttention-style backward's would be, and on XLA:CPU it runs faster than one (demo
    shapes: 60 vs 69 ms per layer, forward + backward).
    """
    b, kv, gl, d = q.shape
    length = k.shape[2]
    s = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    s = (s.reshape(b, kv, gl // length, length, length) + bias[:, :, None]).reshape(s.shape)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkqs,bksd->bkqd", p, v)


class Attention(nnx.Module):
    """Multi-head / grouped-query attention with rotary embeddings and no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), cfg, rngs=rngs)
        self.k = Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), cfg, rngs=rngs)
        self.v = Dense((d,), (k, hd), ("embed", "kv_heads", "head_dim"), cfg, rngs=rngs)
        self.o = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), cfg, rngs=rngs)
        self.groups = h // k
        self.scale = hd ** -0.5
        self.impl = cfg.attention
        self.matmul = cfg.matmul
        self.causal = cfg.causal

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        """x (B, L, d_model), mask from `attention_mask` -> (B, L, d_model)."""
        b, length, _ = x.shape
        cos, sin = rope
        if self.impl == "splash" and splash.tiles(length):
            q, k, v = project(x, self.q, self.k, self.v)
            q = apply_rope(q, cos * self.scale, sin * self.scale).transpose(0, 2, 1, 3)
            k = apply_rope(k, cos, sin).transpose(0, 2, 1, 3)
            out = splash.splash_attention(q, k, v.transpose(0, 2, 1, 3), mask, self.causal)
            return self.o(out.transpose(0, 2, 1, 3))
        if self.impl == "splash":  # a length the kernel cannot tile, e.g. a sampling canvas
            mask = attention_bias(mask >= 0, mask, self.causal)
        if self.impl == "cudnn":
            q, k, v = project(x, self.q, self.k, self.v)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return self.o(fused_attention(q, k, v, mask, self.scale, self.causal))
        # Heads before sequence; the query heads sharing a kv head are stacked along the query
        # axis, so each kv head is one (G*L, D) x (D, L) matmul and k, v are never repeated.
        q, k, v = project(x, self.q, self.k, self.v)
        q = apply_rope(q, cos * self.scale, sin * self.scale)
        k = apply_rope(k, cos, sin)
        if mkl.enabled(self.matmul, q.dtype):
            return self.o(mkl.attention(q, k, v, mask[:, 0]))
        kv, hd = k.shape[2], k.shape[3]
        q = q.reshape(b, length, kv, self.groups, hd).transpose(0, 2, 3, 1, 4)
        q = q.reshape(b, kv, self.groups * length, hd)
        out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        out = out.reshape(b, kv, self.groups, length, hd).transpose(0, 3, 1, 2, 4)
        return self.o(out.reshape(b, length, kv * self.groups, hd))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_hidden
        self.gate = Dense((d,), (f,), ("embed", "mlp"), cfg, rngs=rngs)
        self.up = Dense((d,), (f,), ("embed", "mlp"), cfg, rngs=rngs)
        self.down = Dense((f,), (d,), ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = project(x, self.gate, self.up)
        return self.down(jax.nn.silu(gate) * up)


class Block(nnx.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        h = x + self.attn(self.attn_norm(x), rope, mask)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nnx.Module):
    """Token ids (B, L) -> logits (B, L, vocab) in the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            embedding_init=_init(cfg.init_std, ("vocab", "embed")), rngs=rngs)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg,
                                 rngs=rngs)

    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, valid_prefix: bool = False) -> jax.Array:
        """tokens (B, L) int; valid (B, L) bool key-padding mask; segment_ids (B, L) int.

        valid_prefix promises that each row's valid positions come first (padding trailing, as
        in every training batch): the cuDNN attention then takes key lengths instead of a bias.
        """
        cfg = self.cfg
        if valid is None:
            valid, valid_prefix = jnp.ones(tokens.shape, bool), True
        mask = attention_mask(valid, segment_ids, cfg, valid_prefix)
        rope = rope_tables(tokens.shape[1], cfg.head_dim, cfg.rope_theta)
        # Activations are constrained to the batch sharding (a no-op without a mesh context): the
        # embedding's output would otherwise follow the FSDP-sharded table (embed dim split).
        x = sharding.constrain(self.embed(tokens), ("batch", None, None))
        # Layers run as pure functions of their state (jax.lax.scan / jax.checkpoint rather than
        # the nnx transforms), so the model also works inside other traced loops (the sampler).
        def layer(x: jax.Array, block_state: nnx.State) -> tuple[jax.Array, None]:
            x = nnx.merge(block_def, block_state)(x, rope, mask)
            return sharding.constrain(x, ("batch", None, None)), None

        unroll = min(cfg.scan_unroll, cfg.n_layers)
        if cfg.remat != "none":
            # A rolled loop already keeps XLA from CSE-ing the recomputation away.
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat],
                                   prevent_cse=not cfg.scan_layers or unroll > 1)
        if cfg.scan_layers:
            block_def, states = nnx.split(self.blocks)
            x, _ = jax.lax.scan(layer, x, states, unroll=unroll)
        else:
            for block in self.blocks:
                block_def, state = nnx.split(block)
                x, _ = layer(x, state)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if cfg.tie_embeddings else self.lm_head(x)
        return sharding.constrain(logits, ("batch", None, "vocab"))

"""The LLaDA / LLaMA-style transformer, bidirectional by default.

Pre-norm blocks: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)). RMSNorm is computed in
float32, RoPE is rotate-half (NeoX) style on positions 0..L-1. Multi-head and grouped-query
attention (n_kv_heads divides n_heads). No biases, except on the q/k/v projections with
`qkv_bias` (Qwen2's layout); `qk_norm` adds an RMSNorm over each head's queries and keys before
RoPE (Qwen3's layout). Attention is full (every query sees every
valid key) unless `causal` is set, for autoregressive baselines and imported AR weights.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, layers);
`llada_jax.sharding` maps them to mesh axes. Parameters are stored in `param_dtype` and cast to the
compute `dtype` at use. Which kernels compute the matmuls and the attention is chosen once, when
the model is built (`llada_jax.kernels.select`); this file only calls them.

Letters in names: B batch, L length, D d_model, N query heads, K kv heads, H head dim, F MLP
hidden size, V vocabulary, M rows of a 2-D matmul.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import kernels as kernels_lib
from llada_jax import sharding
from llada_jax.kernels import attention as attention_lib
from llada_jax.kernels import matmul as matmul_lib
from llada_jax.kernels.choice import Kernels
from llada_jax.sections import SettingError, check_choices, keys, setting

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # dots_no_batch plus the splash kernel's output and log-sum-exp: only the projections' inputs
    # (norms, RoPE) are recomputed, not the attention.
    "dots_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(attention_lib.SAVED_RESIDUALS),
    ),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of the transformer (the `model` section of a config). Which
    kernels compute it is the `kernels` section; the token ids it is fed, the `tokens` section."""

    SECTION: ClassVar[str] = "model"

    vocab_size: int = setting(
        4096, "embedding rows; at least the tokenizer's vocabulary", shape=True
    )
    d_model: int = setting(256, "width of the residual stream", shape=True)
    n_layers: int = setting(4, "transformer blocks", shape=True)
    n_heads: int = setting(4, "query heads", shape=True)
    n_kv_heads: int = setting(4, "key/value heads (grouped-query attention when fewer)", shape=True)
    mlp_hidden: int = setting(688, "SwiGLU hidden width", shape=True)
    head_dim: int = setting(0, "per head; 0: d_model // n_heads", shape=True)
    rope_theta: float = setting(500_000.0, "RoPE base frequency")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = setting(
        False, "logits from the embedding table (no lm_head)", shape=True
    )
    qkv_bias: bool = setting(False, "biases on the q, k and v projections (Qwen2)", shape=True)
    qk_norm: bool = setting(
        False, "RMSNorm over each head's queries and keys before RoPE (Qwen3)", shape=True
    )
    causal: bool = setting(False, "causal attention (AR baselines); LLaDA is bidirectional")
    scan_layers: bool = setting(True, "layers as one lax.scan over stacked parameters", shape=True)
    # CPU configs unroll fully: XLA:CPU does not update a rolled scan's stacked per-layer
    # residuals in place (it zero-fills and copies them every step); on accelerators 1 keeps
    # compile time independent of depth.
    scan_unroll: int = setting(1, "layers per scan iteration")
    remat: str = setting("none", "what the backward recomputes", tuple(REMAT_POLICIES))
    dtype: str = setting("float32", "compute dtype", tuple(DTYPES))
    param_dtype: str = setting(
        "float32", "storage dtype of the parameters", tuple(DTYPES), shape=True
    )
    init_std: float = setting(0.02, "std of the normal initialization")

    def __post_init__(self):
        check_choices(self)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "mlp_hidden",
            "scan_unroll",
        ):
            if getattr(self, name) <= 0:
                self._refuse(
                    f"{{p}}{name}={getattr(self, name)!r} is invalid; valid: a positive integer"
                )
        if self.n_heads % self.n_kv_heads:
            self._refuse(
                f"{{p}}n_heads={self.n_heads} is invalid; valid: a multiple of "
                f"{{p}}n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            self._refuse(
                f"{{p}}head_dim={self.head_dim} is invalid; valid: an even number (rotary "
                "embeddings rotate pairs)"
            )

    def _refuse(self, template: str) -> None:
        raise SettingError(self.SECTION, template)

    @classmethod
    def shape_keys(cls) -> tuple[str, ...]:
        """The keys that fix the parameters' shapes (a resumed run may not change them)."""
        return tuple(f.name for f in keys(cls) if f.metadata.get("shape"))

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype of activations and matmul inputs (`dtype`)."""
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> jnp.dtype:
        """The dtype parameters are stored in (`param_dtype`)."""
        return DTYPES[self.param_dtype]


def _init(std: float, names: tuple[str | None, ...]) -> nnx.Initializer:
    """Normal(std) initializer annotated with logical axis names."""
    return nnx.with_partitioning(nnx.initializers.normal(std), names)


class Dense(nnx.Module):
    """A projection: x (..., *in_shape) -> (..., *out_shape), with a kernel of shape
    (*in_shape, *out_shape) and, with `bias`, a bias of shape out_shape (initialized to 0)."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        names: tuple[str, ...],
        cfg: ModelConfig,
        kernels: Kernels,
        *,
        rngs: nnx.Rngs,
        bias: bool = False,
    ):
        self.in_shape, self.out_shape = in_shape, out_shape
        self.dtype = cfg.compute_dtype
        self.matmul = kernels.matmul
        self.kernel = nnx.Param(
            _init(cfg.init_std, names)(rngs.params(), (*in_shape, *out_shape), cfg.weight_dtype)
        )
        init_bias = nnx.with_partitioning(nnx.initializers.zeros, names[len(in_shape) :])
        self.bias = (
            nnx.Param(init_bias(rngs.params(), out_shape, cfg.weight_dtype)) if bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return project(x, self)[0]


def project(x: jax.Array, *denses: Dense) -> tuple[jax.Array, ...]:
    """Each of `denses` (sharing in_shape and kernels) applied to x.

    Computed as 2-D matmuls (leading dims and in_shape flattened): with several contracting or
    batch-like dims, XLA:CPU canonicalizes the backward weight-gradient dots by materializing
    large transposes of the activations.
    """
    first = denses[0]
    lead = x.shape[: x.ndim - len(first.in_shape)]
    x_MxK = x.astype(first.dtype).reshape(-1, math.prod(first.in_shape))
    w_KxN = [d.kernel[...].astype(first.dtype).reshape(x_MxK.shape[1], -1) for d in denses]
    y_MxN = matmul_lib.matmuls(x_MxK, w_KxN, first.matmul)
    ys = [y.reshape(*lead, *d.out_shape) for y, d in zip(y_MxN, denses)]
    return tuple(
        y if d.bias is None else y + d.bias[...].astype(first.dtype) for y, d in zip(ys, denses)
    )


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis (d_model, or `axis` of another size, e.g. a head's
    head_dim), the statistics in float32 whatever the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, axis: tuple[str, int] | None = None):
        name, size = axis or ("embed", cfg.d_model)
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.scale = nnx.Param(
            nnx.with_partitioning(nnx.initializers.ones, (name,))(
                rngs.params(), (size,), cfg.weight_dtype
            )
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (length, head_dim) in float32 for rotate-half RoPE.

    Computed on the host, so that they enter the program as constants: traced, XLA fuses the
    cos/sin into every layer's RoPE and evaluates them per batch row and head.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x_BxLxNxH: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array) -> jax.Array:
    """Rotate-half RoPE: x (B, L, N, H) rotated by position with the (L, H) `rope_tables`, or
    with (B, L, H) tables (each row's own positions); computed in float32, returned in x.dtype."""
    x32 = x_BxLxNxH.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos_LxH[..., None, :] + rotated * sin_LxH[..., None, :]
    return out.astype(x_BxLxNxH.dtype)


def take_positions(x_BxLx_: jax.Array, positions_BxK: jax.Array) -> jax.Array:
    """x's entries (B, K, ...) at each row's `positions_BxK` along axis 1."""
    index = positions_BxK.reshape(positions_BxK.shape + (1,) * (x_BxLx_.ndim - 2))
    return jnp.take_along_axis(x_BxLx_, index, axis=1)


def _splash_specs() -> tuple[jax.sharding.PartitionSpec, ...]:
    """The splash kernel's shard_map partition specs under the active logical rules: queries and
    output (B, N, L, H), keys and values (B, K, L, H), segment ids (B, L)."""
    return (
        sharding.logical_spec(("batch", "heads", None, None)),
        sharding.logical_spec(("batch", "kv_heads", None, None)),
        sharding.logical_spec(("batch", None)),
    )


class Attention(nnx.Module):
    """Multi-head / grouped-query attention with rotary embeddings; q/k/v biases with
    `qkv_bias`, per-head query and key norms with `qk_norm`."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = dict(rngs=rngs, bias=cfg.qkv_bias)
        self.q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), cfg, kernels, **qkv)
        self.k = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, kernels, **qkv)
        self.v = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, kernels, **qkv)
        self.o = Dense((n, h), (d,), ("heads", "head_dim", "embed"), cfg, kernels, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg, rngs=rngs, axis=("head_dim", h))
            self.k_norm = RMSNorm(cfg, rngs=rngs, axis=("head_dim", h))
        else:
            self.q_norm = self.k_norm = None
        self.scale = h**-0.5
        self.kernels = kernels
        self.causal = cfg.causal

    def __call__(
        self,
        x_BxLxD: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        start: jax.Array | None = None,
        blocks: attention_lib.Blocks | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x -> ((B, L, D), (k, v)): the output and this call's rotated keys and values
        (B, L, K, H). rope: (cos, sin) (L, H) tables; mask from `attention_lib.mask` (with
        `blocks`, a block-diffusion pattern, which the splash kernel also takes itself).

        With `cache` (this layer's keys and values of the whole sequence, (B, S, K, H)), x is the
        window [start, start + L) of the sequence, attending to its own keys there and the
        cache's elsewhere; mask is then the (B, 1, 1, S) key-padding `attention_lib.bias`.
        """
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = project(x_BxLxD, self.q, self.k, self.v)
        q_BxLxNxH = self._rotated_queries(q_BxLxNxH, *rope)
        k_BxLxKxH = self._rotated_keys(k_BxLxKxH, *rope)
        if cache is None:
            out_BxLxNxH = attention_lib.attention(
                q_BxLxNxH,
                k_BxLxKxH,
                v_BxLxKxH,
                mask,
                self.kernels,
                self.causal,
                splash_specs=_splash_specs() if self.kernels.attention == "splash" else None,
                blocks=blocks,
            )
        else:
            out_BxLxNxH = attention_lib.window_attention(
                q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, *cache, start, mask
            )
        return self.o(out_BxLxNxH), (k_BxLxKxH, v_BxLxKxH)

    def at_positions(
        self,
        x_BxLxD: jax.Array,
        positions_BxK: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        bias_Bx1xKxL: jax.Array,
    ) -> jax.Array:
        """The output (B, K, D) at each row's `positions_BxK` alone: the queries of those
        positions over the keys and values of every position. rope: the (L, H) tables; bias:
        `attention_lib.bias` at the queries' positions."""
        (q_BxKxNxH,) = project(take_positions(x_BxLxD, positions_BxK), self.q)
        k_BxLxKxH, v_BxLxKxH = project(x_BxLxD, self.k, self.v)
        rope_at = tuple(take_positions(t[None], positions_BxK) for t in rope)
        q_BxKxNxH = self._rotated_queries(q_BxKxNxH, *rope_at)
        k_BxLxKxH = self._rotated_keys(k_BxLxKxH, *rope)
        out_BxKxNxH = attention_lib.query_attention(q_BxKxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xKxL)
        return self.o(out_BxKxNxH)

    def _rotated_queries(self, q_BxLxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Queries normed (qk_norm) and rotated, with the 1/sqrt(H) scale of the scores folded
        into the rotation."""
        if self.q_norm is not None:
            q_BxLxNxH = self.q_norm(q_BxLxNxH)
        return apply_rope(q_BxLxNxH, cos * self.scale, sin * self.scale)

    def _rotated_keys(self, k_BxLxKxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Keys normed (qk_norm) and rotated."""
        if self.k_norm is not None:
            k_BxLxKxH = self.k_norm(k_BxLxKxH)
        return apply_rope(k_BxLxKxH, cos, sin)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), x (B, L, D) -> (B, L, D) through (B, L, mlp_hidden)."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_hidden
        self.gate = Dense((d,), (f,), ("embed", "mlp"), cfg, kernels, rngs=rngs)
        self.up = Dense((d,), (f,), ("embed", "mlp"), cfg, kernels, rngs=rngs)
        self.down = Dense((f,), (d,), ("mlp", "embed"), cfg, kernels, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        gate_BxLxF, up_BxLxF = project(x_BxLxD, self.gate, self.up)
        return self.down(jax.nn.silu(gate_BxLxF) * up_BxLxF)


class Block(nnx.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, kernels, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, kernels, rngs=rngs)

    def __call__(
        self,
        x_BxLxD: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        start: jax.Array | None = None,
        blocks: attention_lib.Blocks | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x -> ((B, L, D), (k, v)); see `Attention` for the cache and the blocks."""
        attn_BxLxD, kv = self.attn(self.attn_norm(x_BxLxD), rope, mask, cache, start, blocks)
        h_BxLxD = x_BxLxD + attn_BxLxD
        return h_BxLxD + self.mlp(self.mlp_norm(h_BxLxD)), kv

    def at_positions(
        self,
        x_BxLxD: jax.Array,
        positions_BxK: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        bias_Bx1xKxL: jax.Array,
    ) -> jax.Array:
        """The output (B, K, D) at `positions_BxK` alone (see `Attention.at_positions`): the
        MLP runs on those positions only."""
        attn_BxKxD = self.attn.at_positions(
            self.attn_norm(x_BxLxD), positions_BxK, rope, bias_Bx1xKxL
        )
        h_BxKxD = take_positions(x_BxLxD, positions_BxK) + attn_BxKxD
        return h_BxKxD + self.mlp(self.mlp_norm(h_BxKxD))


class Transformer(nnx.Module):
    """Token ids (B, L) -> logits (B, L, V) in the compute dtype: `head(hidden(tokens))`, the two
    halves apart so that a caller can run the output head on the positions it needs only.

    kernels: what computes the matmuls and attention; default `kernels.select` for the mesh in
    context (else this process's default backend).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels | None = None):
        self.cfg = cfg
        if kernels is None:
            kernels = kernels_lib.select(kernels_lib.KernelConfig(), cfg.compute_dtype)
        self.kernels = kernels
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            embedding_init=_init(cfg.init_std, ("vocab", "embed")),
            rngs=rngs,
        )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                """n_layers Blocks made at once (one rng split each), their parameters stacked on a
                leading "layers" axis."""
                return Block(cfg, kernels, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, kernels, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(
                (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg, kernels, rngs=rngs
            )

    def __call__(
        self,
        tokens: jax.Array,
        valid: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        valid_prefix: bool = False,
        blocks: attention_lib.Blocks | None = None,
    ) -> jax.Array:
        """tokens (B, L) int; valid (B, L) bool key-padding mask; segment_ids (B, L) int.

        valid_prefix promises that each row's valid positions come first (padding trailing, as
        in every training batch): the cuDNN attention then takes key lengths instead of a bias.
        blocks: a block-diffusion model's attention pattern (`attention_lib.Blocks`); with
        `clean_copy` the row is [x_t | x_0] and its positions repeat (RoPE's 0..L/2-1 twice).
        """
        hidden, _ = self.hidden(
            tokens, valid, segment_ids, valid_prefix=valid_prefix, blocks=blocks
        )
        return self.head(hidden)

    def hidden(
        self,
        tokens: jax.Array,
        valid: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        valid_prefix: bool = False,
        return_cache: bool = False,
        blocks: attention_lib.Blocks | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The last layer's output (B, L, D), before the final norm and the output head, and
        with return_cache every layer's keys and values (else None), for `window`; the other
        arguments as `__call__`. `head` turns any positions of it into logits.

        positions: (B, K) int32, the only positions whose output is wanted: the output is then
        (B, K, D), and the last layer runs its queries, attention and MLP on those positions
        alone (its keys and values on every position, which the earlier layers compute in
        full). Not with return_cache."""
        cfg = self.cfg
        if positions is not None and return_cache:
            raise ValueError("hidden: positions and return_cache exclude each other")
        if valid is None:
            valid, valid_prefix = jnp.ones(tokens.shape, bool), True
        mask = attention_lib.mask(
            valid, segment_ids, self.kernels, cfg.causal, valid_prefix, blocks
        )
        length = tokens.shape[1]
        if blocks is not None and blocks.clean_copy:
            rope = tuple(
                np.tile(t, (2, 1)) for t in rope_tables(length // 2, cfg.head_dim, cfg.rope_theta)
            )
        else:
            rope = rope_tables(length, cfg.head_dim, cfg.rope_theta)

        # Layers run as pure functions of their state (jax.lax.scan / jax.checkpoint rather than
        # the nnx transforms), so the model also works inside other traced loops (the sampler).
        def layer(x: jax.Array, block_state: nnx.State) -> tuple[jax.Array, Any]:
            """One block on x (B, L, D) -> (x (B, L, D), its keys and values with return_cache, else
            None)."""
            x, kv = nnx.merge(block_def, block_state)(x, rope, mask, blocks=blocks)
            return sharding.constrain(x, ("batch", None, None)), kv if return_cache else None

        unroll = min(cfg.scan_unroll, cfg.n_layers)
        if cfg.remat != "none":
            # A rolled loop already keeps XLA from CSE-ing the recomputation away.
            layer = jax.checkpoint(
                layer,
                policy=REMAT_POLICIES[cfg.remat],
                prevent_cse=not cfg.scan_layers or unroll > 1,
            )
        block_def, states = self._block_states()
        x = self._embed(tokens)
        if positions is None:
            x, kv = self._run_layers(layer, x, states, unroll)
            return x, KVCache(*kv) if return_cache else None
        if cfg.n_layers > 1:
            earlier = cfg.n_layers - 1
            x, _ = self._run_layers(layer, x, states, min(unroll, earlier), num_layers=earlier)
        bias_Bx1xKxL = attention_lib.bias(valid, segment_ids, cfg.causal, blocks, positions)
        last = self._last_state(states)
        x_BxKxD = nnx.merge(block_def, last).at_positions(x, positions, rope, bias_Bx1xKxL)
        return sharding.constrain(x_BxKxD, ("batch", None, None)), None

    def window(
        self,
        tokens_BxW: jax.Array,
        valid_BxL: jax.Array,
        cache: KVCache,
        start: jax.Array,
        *,
        return_kv: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """`hidden` (B, W, D) of the window [start, start + W) of a sequence of length L whose
        tokens elsewhere are those of the pass that made `cache`: the window's queries attend to
        its own keys and values and to the cache's at the other valid keys (`valid_BxL`). With
        return_kv also the window's own keys and values (n_layers, B, W, K, H).

        Exact when no cached key depends on the window's tokens: in a block-diffusion model
        whose cache holds the clean earlier blocks and whose later keys are not valid (the
        block sampler). In a bidirectional model every layer's keys past the first depend on
        every token, so the sampler's prefix and dual caches there are approximations."""
        cfg = self.cfg
        if cfg.causal:
            raise ValueError("the K/V window pass is for bidirectional models (model.causal)")
        width = tokens_BxW.shape[1]
        bias = attention_lib.bias(valid_BxL, None, causal=False)
        cos_LxH, sin_LxH = rope_tables(valid_BxL.shape[1], cfg.head_dim, cfg.rope_theta)
        rope = tuple(jax.lax.dynamic_slice_in_dim(t, start, width) for t in (cos_LxH, sin_LxH))

        def layer(x: jax.Array, xs: tuple[nnx.State, jax.Array, jax.Array]):
            """One block on the window's x (B, W, D), its queries attending also to the layer's
            cached keys and values -> (x (B, W, D), the window's keys and values or None)."""
            block_state, k_cache, v_cache = xs
            x, kv = nnx.merge(block_def, block_state)(x, rope, bias, (k_cache, v_cache), start)
            return sharding.constrain(x, ("batch", None, None)), kv if return_kv else None

        block_def, states = self._block_states()
        unroll = min(cfg.scan_unroll, cfg.n_layers)
        x, kv = self._run_layers(layer, self._embed(tokens_BxW), states, unroll, cache)
        return (x, KVCache(*kv)) if return_kv else x

    def _embed(self, tokens: jax.Array) -> jax.Array:
        # Activations are constrained to the batch sharding (a no-op without a mesh context): the
        # embedding's output would otherwise follow the FSDP-sharded table (embed dim split).
        return sharding.constrain(self.embed(tokens), ("batch", None, None))

    def _block_states(self) -> tuple[nnx.GraphDef, Any]:
        """The blocks' graph and state: stacked (one state) when scanned, else one per block."""
        if self.cfg.scan_layers:
            return nnx.split(self.blocks)
        pairs = [nnx.split(block) for block in self.blocks]
        return pairs[0][0], [state for _, state in pairs]

    def _last_state(self, states: Any) -> Any:
        """The last layer's state of `_block_states`'s states."""
        if self.cfg.scan_layers:
            return jax.tree.map(lambda a: a[-1], states)
        return states[-1]

    def _run_layers(
        self,
        layer,
        x,
        states,
        unroll: int,
        cache: KVCache | None = None,
        num_layers: int | None = None,
    ):
        """x through every layer, or the first `num_layers` (without `cache`): `layer(x, xs) ->
        (x, out)` with xs the layer's state (and its slice of `cache`); returns x and the layers'
        outputs stacked (n_layers, ...)."""
        if self.cfg.scan_layers and num_layers is not None:
            # The loop indexes the stacked states: a slice of the stack would be copied whole.
            def first_layers(x: jax.Array, i: jax.Array) -> tuple[jax.Array, Any]:
                return layer(x, jax.tree.map(lambda a: a[i], states))

            return jax.lax.scan(first_layers, x, jnp.arange(num_layers), unroll=unroll)
        if self.cfg.scan_layers:
            xs = states if cache is None else (states, cache.k, cache.v)
            return jax.lax.scan(layer, x, xs, unroll=unroll)
        outs = []
        for i, state in enumerate(states[:num_layers]):
            x, out = layer(x, state if cache is None else (state, cache.k[i], cache.v[i]))
            outs.append(out)
        stacked = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, stacked

    def head(self, x: jax.Array) -> jax.Array:
        """Logits (B, L, V) of `hidden`'s output (B, L, D), position by position."""
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return sharding.constrain(logits, ("batch", None, "vocab"))


class KVCache(NamedTuple):
    """Every layer's rotated keys and values of a full pass: (n_layers, B, L, K, H) each."""

    k: jax.Array
    v: jax.Array

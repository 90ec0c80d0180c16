"""Tensor-by-tensor mappings between Hugging Face layouts and this package's parameter tree.

Each `Entry` names one parameter of ours (its path in the pure-dict tree) and the HF tensor(s) it
corresponds to: per layer (`{i}` in the key) or once. HF linear weights are stored
(out_features, in_features); our kernels are (*in_shape, *out_shape) with heads split out, e.g.
q (d_model, heads, head_dim) and o (heads, head_dim, d_model). `n_in` is the number of our leading
(input) axes; 0 means the tensor is the same array in both layouts (embeddings, norm scales).
Both directions are a transpose and a reshape, so a round trip is exact.

Layouts:
- `llada` (the public LLaDA checkpoints): LLaDAModelLM, block_type llama, keys under
  `model.transformer.`.
- `llama`: LlamaForCausalLM (GQA, optional tied embeddings). HF Llama stores q/k already in the
  rotate-half (NeoX) order our RoPE uses, so no permutation is needed.
- `qwen2`, `qwen3`: Qwen2ForCausalLM and Qwen3ForCausalLM, the Llama keys plus q/k/v biases
  (`self_attn.q_proj.bias`, ...; Qwen2) and per-head query/key norm scales
  (`self_attn.q_norm.weight`, `self_attn.k_norm.weight`; Qwen3), present when the model config
  has `qkv_bias` / `qk_norm`. The LLaDA layout holds q/k/v biases (`q_proj.bias`, ...) but has no
  per-head query/key norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from llada_jax.convert.safetensors_io import ConvertError
from llada_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter's place on both sides: our path and shape, the HF key, and how a linear
    kernel is laid out."""

    path: tuple[str, ...]  # our parameter path, e.g. ("blocks", "attn", "q", "kernel")
    key: str  # HF key; "{i}" is the layer index for per-layer entries
    shape: tuple[int, ...]  # our shape (one layer's, for per-layer entries)
    n_in: int  # leading input axes of a linear kernel; 0: stored as is
    per_layer: bool
    flat: bool = False  # stored as one axis in HF (a bias of shape (heads, head_dim))

    def hf_key(self, layer: int | None = None) -> str:
        """The HF key, of `layer` for a per-layer entry."""
        return self.key.format(i=layer) if self.per_layer else self.key

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The HF tensor's shape: ours, or for a linear kernel (out, in), with our n_in leading
        input axes flattened into in and the rest into out."""
        if self.flat:
            return (math.prod(self.shape),)
        if not self.n_in:
            return self.shape
        return (math.prod(self.shape[self.n_in :]), math.prod(self.shape[: self.n_in]))

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        """HF tensor -> our (one layer's) array; a view where possible."""
        return w.T.reshape(self.shape) if self.n_in else w.reshape(self.shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        """Our (one layer's) array -> the HF tensor."""
        if not self.n_in:
            return w.reshape(self.hf_shape)
        return w.reshape(math.prod(self.shape[: self.n_in]), -1).T


# (our path under a block, HF name, n_in) in HF's per-layer order.
_LAYER = (
    (("attn_norm", "scale"), 0),
    (("attn", "q", "kernel"), 1),
    (("attn", "k", "kernel"), 1),
    (("attn", "v", "kernel"), 1),
    (("attn", "o", "kernel"), 2),
    (("mlp_norm", "scale"), 0),
    (("mlp", "gate", "kernel"), 1),
    (("mlp", "up", "kernel"), 1),
    (("mlp", "down", "kernel"), 1),
)
KEYS = {
    "llada": dict(
        prefix="model.transformer.",
        layer="model.transformer.blocks.{i}.",
        embed="model.transformer.wte.weight",
        final_norm="model.transformer.ln_f.weight",
        lm_head="model.transformer.ff_out.weight",
        names=(
            "attn_norm",
            "q_proj",
            "k_proj",
            "v_proj",
            "attn_out",
            "ff_norm",
            "ff_proj",
            "up_proj",
            "ff_out",
        ),
        qkv_bias=("q_proj", "k_proj", "v_proj"),
        qk_norm=None,
    ),
    "llama": dict(
        prefix="model.",
        layer="model.layers.{i}.",
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="lm_head.weight",
        names=(
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ),
        qkv_bias=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
    ),
}
KEYS["qwen2"] = KEYS["qwen3"] = KEYS["llama"]
# Tensors that hold no parameters (old Llama checkpoints store RoPE's inverse frequencies).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden
    return {
        ("attn_norm", "scale"): (d,),
        ("attn", "q", "kernel"): (d, h, hd),
        ("attn", "k", "kernel"): (d, k, hd),
        ("attn", "v", "kernel"): (d, k, hd),
        ("attn", "o", "kernel"): (h, hd, d),
        ("mlp_norm", "scale"): (d,),
        ("mlp", "gate", "kernel"): (d, f),
        ("mlp", "up", "kernel"): (d, f),
        ("mlp", "down", "kernel"): (f, d),
    }


def _optional_layer_entries(cfg: ModelConfig, layout: str) -> list[Entry]:
    """The per-layer entries of q/k/v biases (`qkv_bias`) and query/key norms (`qk_norm`);
    ConvertError if the layout has no place for them."""
    keys, out = KEYS[layout], []
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads, "v": cfg.n_kv_heads}
    if cfg.qkv_bias:
        for name, hf in zip("qkv", keys["qkv_bias"]):
            shape = (heads[name], cfg.head_dim)
            key = keys["layer"] + hf + ".bias"
            out.append(Entry(("blocks", "attn", name, "bias"), key, shape, 0, True, flat=True))
    if cfg.qk_norm:
        if keys["qk_norm"] is None:
            raise ConvertError(
                f"model.qk_norm=True: the {layout} layout has no per-head query/key norm"
            )
        for name, hf in zip(("q_norm", "k_norm"), keys["qk_norm"]):
            key = keys["layer"] + hf + ".weight"
            out.append(Entry(("blocks", "attn", name, "scale"), key, (cfg.head_dim,), 0, True))
    return out


def entries(cfg: ModelConfig, layout: str) -> list[Entry]:
    """Every parameter of a model with this config, in HF file order (embedding, layers, rest)."""
    keys = KEYS[layout]
    shapes = _layer_shapes(cfg)
    out = [Entry(("embed", "embedding"), keys["embed"], (cfg.vocab_size, cfg.d_model), 0, False)]
    for (path, n_in), name in zip(_LAYER, keys["names"]):
        out.append(
            Entry(("blocks", *path), keys["layer"] + name + ".weight", shapes[path], n_in, True)
        )
    out += _optional_layer_entries(cfg, layout)
    out.append(Entry(("final_norm", "scale"), keys["final_norm"], (cfg.d_model,), 0, False))
    if not cfg.tie_embeddings:
        out.append(
            Entry(("lm_head", "kernel"), keys["lm_head"], (cfg.d_model, cfg.vocab_size), 1, False)
        )
    return out


def hf_tensor_list(cfg: ModelConfig, layout: str) -> list[tuple[Entry, int | None]]:
    """(entry, layer) for every HF tensor, in save_pretrained's order (layer by layer)."""
    es = entries(cfg, layout)
    per_layer = [e for e in es if e.per_layer]
    out = [(es[0], None)]
    for i in range(cfg.n_layers):
        out += [(e, i) for e in per_layer]
    out += [(e, None) for e in es[1:] if not e.per_layer]
    return out


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    """tree[path[0]][path[1]]..."""
    for p in path:
        tree = tree[p]
    return tree


def params_from_tensors(t: Mapping[str, np.ndarray], cfg: ModelConfig, layout: str) -> dict:
    """In-memory conversion (small models, tests): a pure dict shaped like
    `nnx.to_pure_dict(nnx.state(Transformer(cfg), nnx.Param))`."""
    params: dict = {}
    for e in entries(cfg, layout):
        if not e.per_layer:
            set_path(params, e.path, np.asarray(e.to_ours(np.asarray(t[e.hf_key()]))))
            continue
        layers = [e.to_ours(np.asarray(t[e.hf_key(i)])) for i in range(cfg.n_layers)]
        if cfg.scan_layers:
            set_path(params, e.path, np.stack(layers))
        else:
            for i, w in enumerate(layers):
                set_path(params, (e.path[0], i, *e.path[1:]), np.ascontiguousarray(w))
    return params

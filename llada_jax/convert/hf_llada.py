"""Hugging Face LLaDA layout (REFERENCES §5) -> this package's parameter tree.

HF linear weights are stored (out_features, in_features) under `model.transformer.`; ours are
einsum kernels (in, ...out) with heads split out, and layers stacked on a leading axis when the
model scans its layers.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from llada_jax.model import ModelConfig

PREFIX = "model.transformer."


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from an HF LLaDA config.json dict (architecture fields only)."""
    fields = dict(
        vocab_size=hf["embedding_size"] or hf["vocab_size"], d_model=hf["d_model"],
        n_layers=hf["n_layers"], n_heads=hf["n_heads"],
        n_kv_heads=hf.get("n_kv_heads") or hf["n_heads"], mlp_hidden=hf["mlp_hidden_size"],
        rope_theta=float(hf["rope_theta"]), norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf["weight_tying"]))
    fields.update(overrides)
    return ModelConfig(**fields)


def _layer(t: Mapping[str, np.ndarray], i: int, cfg: ModelConfig) -> dict:
    """Parameters of block i as a pure dict of numpy arrays."""
    d, hd = cfg.d_model, cfg.head_dim

    def w(name: str) -> np.ndarray:
        return np.asarray(t[f"{PREFIX}blocks.{i}.{name}.weight"])

    return {
        "attn_norm": {"scale": w("attn_norm")},
        "attn": {
            "q": {"kernel": w("q_proj").T.reshape(d, cfg.n_heads, hd)},
            "k": {"kernel": w("k_proj").T.reshape(d, cfg.n_kv_heads, hd)},
            "v": {"kernel": w("v_proj").T.reshape(d, cfg.n_kv_heads, hd)},
            "o": {"kernel": w("attn_out").T.reshape(cfg.n_heads, hd, d)},
        },
        "mlp_norm": {"scale": w("ff_norm")},
        "mlp": {
            "gate": {"kernel": w("ff_proj").T},
            "up": {"kernel": w("up_proj").T},
            "down": {"kernel": w("ff_out").T},
        },
    }


def params_from_hf(t: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Pure dict shaped like `nnx.to_pure_dict(nnx.state(Transformer(cfg), nnx.Param))`."""
    layers = [_layer(t, i, cfg) for i in range(cfg.n_layers)]
    if cfg.scan_layers:
        blocks = _stack(layers)
    else:
        blocks = dict(enumerate(layers))
    params = {
        "embed": {"embedding": np.asarray(t[PREFIX + "wte.weight"])},
        "blocks": blocks,
        "final_norm": {"scale": np.asarray(t[PREFIX + "ln_f.weight"])},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": np.asarray(t[PREFIX + "ff_out.weight"]).T}
    return params


def _stack(trees: list[dict]) -> dict:
    """Stacks equally-shaped nested dicts of arrays along a new leading axis."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack([tr[k] for tr in trees]) for k in first}
    return np.stack(trees)

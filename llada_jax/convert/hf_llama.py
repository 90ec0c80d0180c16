"""Hugging Face LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM configs <-> ModelConfig.

The three share Llama's keys (see `layouts`): Qwen2 adds biases on the q/k/v projections
(`model.qkv_bias`), Qwen3 an RMSNorm over each head's queries and keys before RoPE
(`model.qk_norm`) and often a head_dim other than hidden_size / heads.

An autoregressive checkpoint is a starting point for diffusion training: the imported config keeps
`causal=False` (training adapts the weights to bidirectional or block attention, as DiffuLLaMA,
Dream and Fast-dLLM v2 do); set `model.causal=True` to run the imported model as the causal LM it
was trained as.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np

from llada_jax.convert.layouts import params_from_tensors
from llada_jax.convert.safetensors_io import ConvertError
from llada_jax.model import ModelConfig

NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ARCHITECTURES = {name: f"{title}ForCausalLM" for name, title in NAMES.items()}


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE's base: `rope_theta`, or (transformers 5) `rope_parameters.rope_theta`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None
    )
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if scaling:
        print(
            f"warning: rope scaling {scaling} is ignored (plain RoPE with theta {theta})",
            file=sys.stderr,
        )
    return theta


def _check_supported(hf: Mapping[str, Any], source: str) -> None:
    """ConvertError (one line) for config fields whose values this model does not implement."""
    name = NAMES[source]
    refused = [("mlp_bias", True), ("use_sliding_window", True)]
    # Llama's and Qwen3's attention_bias also puts a bias on the output projection.
    if source != "qwen2":
        refused.append(("attention_bias", True))
    for key, value in refused:
        if hf.get(key) == value:
            raise ConvertError(f"HF {name} config has {key}={value!r}; it is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(
            f"HF {name} config has hidden_act={hf['hidden_act']!r}; only 'silu' is supported"
        )


def model_config_from_llama(
    hf: Mapping[str, Any], source: str = "llama", **overrides: Any
) -> ModelConfig:
    """ModelConfig from a config.json dict of `source` ('llama', 'qwen2' or 'qwen3';
    architecture fields only)."""
    _check_supported(hf, source)
    try:
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or d_model // n_heads)
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            mlp_hidden=int(hf["intermediate_size"]),
            head_dim=0 if head_dim == d_model // n_heads else head_dim,
            rope_theta=_rope_theta(hf),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=source == "qwen2",
            qk_norm=source == "qwen3",
        )
    except KeyError as e:
        raise ConvertError(f"HF {NAMES[source]} config.json lacks {e.args[0]!r}") from None
    fields.update(overrides)
    return ModelConfig(**fields)


def qwen3_config_from_model(
    cfg: ModelConfig,
    template: Mapping[str, Any] | None,
    dtype: str,
    special_ids: Mapping[str, int] | None = None,
    max_position_embeddings: int | None = None,
) -> dict:
    """The config.json of a Qwen3ForCausalLM checkpoint holding this model (one with query/key
    norms, which the LLaDA layout cannot hold): `template`'s fields (the imported Qwen3 config,
    if any) with the architecture's overwritten."""
    if cfg.qkv_bias:
        raise ConvertError(
            "model.qkv_bias=True with model.qk_norm=True: no Hugging Face layout holds both"
        )
    out = dict(template or {})
    rope = dict(out.get("rope_parameters") or {}, rope_theta=cfg.rope_theta)
    rope.setdefault("rope_type", "default")
    out.update(
        architectures=[ARCHITECTURES["qwen3"]],
        model_type="qwen3",
        hidden_act="silu",
        attention_bias=False,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings,
        use_sliding_window=False,
        dtype=dtype,
    )
    if template is None:
        out.update(special_ids or {})
        if max_position_embeddings:
            out["max_position_embeddings"] = max_position_embeddings
    return out


def params_from_llama(t: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "llama") -> dict:
    """Pure dict shaped like `nnx.to_pure_dict(nnx.state(Transformer(cfg), nnx.Param))`."""
    return params_from_tensors(t, cfg, source)

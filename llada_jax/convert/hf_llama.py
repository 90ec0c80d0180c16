"""Hugging Face LlamaForCausalLM configs (GQA, optionally tied embeddings) -> ModelConfig.

An autoregressive checkpoint is a starting point for diffusion training: the imported config keeps
`causal=False` (training adapts the weights to bidirectional attention, as DiffuLLaMA and Dream do);
set `model.causal=True` to run the imported model as the causal LM it was trained as.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np

from llada_jax.convert.layouts import params_from_tensors
from llada_jax.convert.safetensors_io import ConvertError
from llada_jax.model import ModelConfig


def model_config_from_llama(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json dict (architecture fields only)."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConvertError(f"HF Llama config has {key}=true; biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(
            f"HF Llama config has hidden_act={hf['hidden_act']!r}; only 'silu' is supported"
        )
    if hf.get("rope_scaling"):
        print(
            f"warning: rope_scaling={hf['rope_scaling']} is ignored (plain RoPE with theta "
            f"{hf.get('rope_theta')})",
            file=sys.stderr,
        )
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
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConvertError(f"HF Llama config.json lacks {e.args[0]!r}") from None
    fields.update(overrides)
    return ModelConfig(**fields)


def params_from_llama(t: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Pure dict shaped like `nnx.to_pure_dict(nnx.state(Transformer(cfg), nnx.Param))`."""
    return params_from_tensors(t, cfg, "llama")

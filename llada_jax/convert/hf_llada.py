"""Hugging Face LLaDA (LLaDAModelLM, block_type llama) configs and weights.

HF linear weights are stored (out_features, in_features) under `model.transformer.`; ours are
kernels (in, ...out) with heads split out, and layers stacked on a leading axis when the model
scans its layers (see `layouts`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from llada_jax.convert.layouts import params_from_tensors
from llada_jax.convert.safetensors_io import ConvertError
from llada_jax.model import ModelConfig
from llada_jax.special_ids import SpecialIds

PREFIX = "model.transformer."

# Fields of the HF LLaDA config that change the architecture, with the only values we implement.
_REQUIRED = {
    "block_type": ("llama",),
    "alibi": (False,),
    "rope": (True,),
    "include_bias": (False,),
    "layer_norm_type": ("rms",),
    "activation_type": ("silu", "swiglu"),
    "attention_layer_norm": (False,),
    "scale_logits": (False,),
    "input_emb_norm": (False,),
    "block_group_size": (1,),
}

# The modules and classes of the HF LLaDA code (configuration_llada.py, modeling_llada.py), and
# the public repository that holds them, which an export names when it has no copy of its own.
AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
PUBLIC_CODE_REPO = "GSAI-ML/LLaDA-8B-Base"


def remote_auto_map(repo: str = PUBLIC_CODE_REPO) -> dict[str, str]:
    """AUTO_MAP with each class named in `repo` ("REPO--module.Class"), so that transformers
    fetches the code from there (trust_remote_code=True)."""
    return {kind: f"{repo}--{ref}" for kind, ref in AUTO_MAP.items()}


# A config.json for LLaDAModelLM with LLaDA-8B's values; export overwrites the
# architecture fields. Used when the checkpoint was not imported from an HF LLaDA config.
TEMPLATE: dict[str, Any] = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from an HF LLaDA config.json dict (architecture fields only)."""
    for key, allowed in _REQUIRED.items():
        if key in hf and hf[key] not in allowed:
            raise ConvertError(
                f"HF LLaDA config has {key}={hf[key]!r}; only {allowed[0]!r} is supported"
            )
    try:
        d_model, n_heads = int(hf["d_model"]), int(hf["n_heads"])
        n_kv = hf.get("n_kv_heads") or (1 if hf.get("multi_query_attention") else n_heads)
        mlp = hf.get("mlp_hidden_size") or hf["mlp_ratio"] * d_model
        fields = dict(
            vocab_size=int(hf.get("embedding_size") or hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            mlp_hidden=int(mlp),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("weight_tying", False)),
            qkv_bias=bool(hf.get("include_qkv_bias")),
        )
    except KeyError as e:
        raise ConvertError(f"HF LLaDA config.json lacks {e.args[0]!r}") from None
    fields.update(overrides)
    return ModelConfig(**fields)


def special_ids_from_hf(hf: Mapping[str, Any]) -> SpecialIds:
    """The mask and EOS ids an HF config.json names (-1 where it names none)."""
    return SpecialIds(mask_id=_token_id(hf, "mask_token_id"), eos_id=_token_id(hf, "eos_token_id"))


def _token_id(hf: Mapping[str, Any], key: str) -> int:
    """config.json's `key` (an int, or a list whose first entry counts), else -1."""
    value = hf.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else -1


def hf_config_from_model(
    cfg: ModelConfig,
    template: Mapping[str, Any] | None,
    dtype: str,
    special_ids: Mapping[str, int] | None = None,
    max_sequence_length: int | None = None,
) -> dict:
    """The config.json of an HF LLaDA checkpoint holding a model with this config."""
    if cfg.qk_norm:
        raise ConvertError("model.qk_norm=True: the HF LLaDA layout has no per-head query/key norm")
    if cfg.head_dim != cfg.d_model // cfg.n_heads:
        raise ConvertError(
            f"model.head_dim={cfg.head_dim} is not d_model // n_heads; the HF LLaDA "
            f"layout cannot express it"
        )
    out = dict(TEMPLATE if template is None else template)
    out.update(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        n_layers=cfg.n_layers,
        mlp_hidden_size=cfg.mlp_hidden,
        embedding_size=cfg.vocab_size,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        weight_tying=cfg.tie_embeddings,
        include_qkv_bias=cfg.qkv_bias,
    )
    out["multi_query_attention"] = None
    if template is None or not 0 < int(template.get("vocab_size", 0)) <= cfg.vocab_size:
        out["vocab_size"] = cfg.vocab_size
    if template is None:
        out.update(special_ids or {})
        if max_sequence_length:
            out["max_sequence_length"] = max_sequence_length
    out["torch_dtype" if "torch_dtype" in out or "dtype" not in out else "dtype"] = dtype
    return out


def params_from_hf(t: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Pure dict shaped like `nnx.to_pure_dict(nnx.state(Transformer(cfg), nnx.Param))`."""
    return params_from_tensors(t, cfg, "llada")

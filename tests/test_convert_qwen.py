"""Qwen2 / Qwen3 import (q/k/v biases, per-head query/key norms): the logits transformers'
Qwen2ForCausalLM / Qwen3ForCausalLM compute on tests/fixtures/hf_qwen{2,3}_tiny, and an export
that re-imports to the same parameters."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from test_convert import restore_model

from llada_jax.convert import hf
from llada_jax.convert.safetensors_io import ConvertError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = {
    name: os.path.join(ROOT, "tests", "fixtures", f"hf_{name}_tiny") for name in ("qwen2", "qwen3")
}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def imported(request, tmp_path_factory):
    """(source name, its fixture directory, the workdir it was imported to)."""
    workdir = str(tmp_path_factory.mktemp(request.param) / "w")
    hf.import_hf(FIXTURES[request.param], workdir)
    return request.param, FIXTURES[request.param], workdir


def params_of(workdir):
    """The workdir's latest parameters as a pure dict of numpy arrays."""
    return nnx.to_pure_dict(nnx.state(restore_model(workdir), nnx.Param))


def test_imported_config_has_the_qwen_features(imported):
    name, _, workdir = imported
    model = json.load(open(os.path.join(workdir, "config.json")))["model"]
    assert model["causal"] is False  # to be trained into a diffusion model
    assert model["qkv_bias"] is (name == "qwen2") and model["qk_norm"] is (name == "qwen3")
    assert model["rope_theta"] == 50000.0  # read from transformers 5's rope_parameters
    assert model["head_dim"] == (32 if name == "qwen3" else 0)
    assert model["tie_embeddings"] is (name == "qwen2")


def test_causal_logits_match_transformers(imported):
    """Run as the causal LM it was trained as, the import gives transformers' logits (1e-4),
    with and without a left-padded row."""
    _, fixture, workdir = imported
    model = restore_model(workdir, causal=True)
    ref = np.load(os.path.join(fixture, "reference_logits.npz"))
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    logits = jax.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=1e-4)
    valid = np.asarray(ref["attention_mask"], bool)
    masked = np.asarray(jax.jit(lambda m, x, v: m(x, v))(model, ids, jnp.asarray(valid)))
    # Padded queries attend to nothing in either implementation; only real tokens count.
    np.testing.assert_allclose(
        masked[valid], ref["logits_with_attention_mask"][valid], atol=1e-4, rtol=1e-4
    )
    # Each feature matters: without the biases / norms the logits are far off.
    bare = restore_model(workdir, causal=True)
    attn = bare.blocks.attn
    if attn.q.bias is not None:
        attn.q.bias[...] = jnp.zeros_like(attn.q.bias[...])
    else:
        attn.q_norm.scale[...] = jnp.ones_like(attn.q_norm.scale[...])
    off = np.asarray(jax.jit(lambda m, x: m(x))(bare, ids))
    assert np.abs(off - ref["logits"]).max() > 1e-2


def test_export_reimports_unchanged(imported, tmp_path):
    """Qwen2 goes to the LLaDA layout (include_qkv_bias), Qwen3 to its own layout (LLaDA's has
    no per-head query/key norm); importing the export gives identical parameters."""
    name, fixture, workdir = imported
    out = str(tmp_path / "hf")
    hf.export_hf(workdir, out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    if name == "qwen2":
        assert cfg["model_type"] == "llada" and cfg["include_qkv_bias"] is True
        assert "model.transformer.blocks.1.v_proj.bias" in keys
    else:
        assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == 32
        assert "auto_map" not in cfg  # transformers has the Qwen3 classes built in
        with safe_open(os.path.join(fixture, "model.safetensors"), framework="numpy") as f:
            assert keys == set(f.keys())
    again = str(tmp_path / "again")
    hf.import_hf(out, again)
    jax.tree.map(np.testing.assert_array_equal, params_of(workdir), params_of(again))


def test_qwen3_export_loads_as_a_qwen3_config(imported, tmp_path):
    """transformers (no torch needed) reads the Qwen3 export's config.json as Qwen3's; LLaDA
    modeling code given with --hf_code is refused there, before anything is written."""
    name, _, workdir = imported
    if name != "qwen3":
        pytest.skip("the Qwen2 export is the LLaDA layout (test_convert.py loads that)")
    out = str(tmp_path / "hf")
    code_dir = tmp_path / "llada_code"
    code_dir.mkdir()
    (code_dir / "modeling_llada.py").write_text("# LLaDA's modeling code\n")
    with pytest.raises(ConvertError, match=r"--hf_code=.*llada_code.* Qwen3 layout"):
        hf.export_hf(workdir, out, hf_code=str(code_dir))
    assert not os.path.exists(out)
    hf.export_hf(workdir, out)
    code = (
        "import sys; from transformers import AutoConfig; c = AutoConfig.from_pretrained("
        "sys.argv[1]); print(type(c).__name__, c.head_dim, c.num_key_value_heads)"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "-c", code, out], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Qwen3Config", "32", "2"]


def test_refused_qwen_settings_give_one_line(tmp_path):
    config = json.load(open(os.path.join(FIXTURES["qwen3"], "config.json")))
    for key, value, words in [
        ("attention_bias", True, "attention_bias=True"),
        ("use_sliding_window", True, "use_sliding_window=True"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
    ]:
        broken = tmp_path / key
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConvertError, match=words):
            hf.import_hf(str(broken), str(tmp_path / f"w_{key}"))

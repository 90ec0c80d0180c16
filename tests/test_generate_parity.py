"""Token-for-token parity with LLaDA's generate() on a checkpoint written by the Hugging Face
LLaDA code: an independent numpy port of that model's forward pass (checked against the logits
the HF code computed) and of generate(), against tools/convert_hf.py + our sampler."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from llada_jax import inference, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf_llada_tiny")


def np_llada_forward(t, c, ids, attention_mask=None):
    """LLaDAModelLM (block_type llama) in float64: RMSNorm, rotate-half RoPE on slot indices,
    bidirectional attention with a key-padding mask, SwiGLU, untied head."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    d, h = c["d_model"], c["n_heads"]
    hd, eps, theta = d // h, c["rms_norm_eps"], c["rope_theta"]
    b, n = ids.shape
    keys = np.ones((b, n), bool) if attention_mask is None else attention_mask.astype(bool)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos[None, :, None] + rot * sin[None, :, None]

    p = "model.transformer."
    x = t[p + "wte.weight"][ids]
    for i in range(c["n_layers"]):
        w = lambda name: t[f"{p}blocks.{i}.{name}.weight"]  # noqa: E731
        y = norm(x, w("attn_norm"))
        q = rope((y @ w("q_proj").T).reshape(b, n, h, hd))
        k = rope((y @ w("k_proj").T).reshape(b, n, h, hd))
        v = (y @ w("v_proj").T).reshape(b, n, h, hd)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = np.where(keys[:, None, None, :], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(b, n, d)
        x = x + a @ w("attn_out").T
        y = norm(x, w("ff_norm"))
        g = y @ w("ff_proj").T
        x = x + (g / (1 + np.exp(-g)) * (y @ w("up_proj").T)) @ w("ff_out").T
    return norm(x, t[p + "ln_f.weight"]) @ t[p + "ff_out.weight"].T


def np_generate(forward, prompt, valid, gen_length, steps, block_length, mask_id, cfg_scale=0.0):
    """LLaDA's generate() at temperature 0 with low-confidence remasking, as its reference
    writes it: prompt (B, P) left-padded, valid its attention mask; the top-k of each step over
    every mask before the block's end, the counts per row from the block's masks."""
    b = len(prompt)
    x = np.concatenate([prompt, np.full((b, gen_length), mask_id)], axis=1)
    attention_mask = np.concatenate([valid, np.ones((b, gen_length), bool)], axis=1)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    for nb in range(num_blocks):
        start = prompt.shape[1] + nb * block_length
        end = start + block_length
        counts = (x[:, start:end] == mask_id).sum(1)
        num_transfer = [[c // spb + (i < c % spb) for i in range(spb)] for c in counts]
        for i in range(spb):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un = np.where(prompt_index, mask_id, x)
                both = forward(np.concatenate([x, un]), np.concatenate([attention_mask] * 2))
                logits, un_logits = both[:b], both[b:]
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = forward(x, attention_mask)
            x0 = logits.argmax(-1)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x0_p = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            x0_p[:, end:] = -np.inf
            x0 = np.where(mask_index, x0, x)
            confidence = np.where(mask_index, x0_p, -np.inf)
            for j in range(b):
                chosen = np.argsort(-confidence[j], kind="stable")[: num_transfer[j][i]]
                x[j, chosen] = x0[j, chosen]
    return x


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("parity") / "llada_tiny")
    cmd = [sys.executable, "tools/convert_hf.py", f"--hf_dir={FIXTURE}", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(FIXTURE, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
    return workdir, config, tensors


def test_numpy_port_reproduces_the_hf_logits(converted):
    _, config, tensors = converted
    ref = np.load(os.path.join(FIXTURE, "reference_logits.npz"))
    np.testing.assert_allclose(
        np_llada_forward(tensors, config, ref["input_ids"]), ref["logits"], atol=1e-4
    )
    np.testing.assert_allclose(
        np_llada_forward(tensors, config, ref["input_ids"], ref["attention_mask"]),
        ref["logits_with_attention_mask"],
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "gen_length, steps, block_length, cfg_scale",
    [(16, 16, 16, 0.0), (24, 12, 8, 0.0), (16, 8, 4, 1.0)],
)
def test_sampler_matches_generate_token_for_token(
    converted, gen_length, steps, block_length, cfg_scale
):
    """Two prompts of different lengths, left-padded into one batch (positions 0..T-1 over the
    pads, the pads key-masked), over one or several blocks, with and without guidance."""
    workdir, config, tensors = converted
    model = inference.load(workdir)
    mask_id = config["mask_token_id"]
    assert model.run.tokenizer.mask_id == mask_id  # the checkpoint's, not the shipped tokenizer's
    ids, valid = inference.left_pad([[5, 17, 99, 3, 42, 7], [200, 13, 8, 77]], 0)
    forward = lambda x, m: np_llada_forward(tensors, config, x, m)  # noqa: E731
    want = np_generate(forward, ids, valid, gen_length, steps, block_length, mask_id, cfg_scale)
    settings = sampling.SampleSettings(
        gen_length=gen_length, steps=steps, block_length=block_length, cfg_scale=cfg_scale
    )
    sampler = inference.make_sampler(model.run, settings)
    canvas, _ = sampler(model.params, ids, valid, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(canvas), want)

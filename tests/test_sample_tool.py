"""tools/sample.py: a trained workdir sampled from the command line, against the sampler called
directly on the checkpoint's parameters; its errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import checkpoint, sampling, sections, sharding
from llada_jax import run as run_lib
from llada_jax.data.tokenizer import default_tokenizer
from llada_jax.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = [sys.executable, "tools/sample.py"]
SETTINGS = ["--gen_length=16", "--steps=8", "--block_length=8"]


@pytest.fixture(scope="module")
def workdir(tiny_run):
    return tiny_run  # only read


def reference_tokens(workdir, prompts, gen_length, steps, block_length, whole=False, **options):
    """The sampler called directly: the model rebuilt from config.json, the checkpoint's
    parameters restored into it, the prompts left-padded by hand. Returns the generated tokens
    (with `whole`, the canvas without the left padding) and nfe."""
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = sections.from_section(ModelConfig, json.load(f)["model"])
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    with checkpoint.Checkpointer(workdir) as ckpt:
        params, _ = ckpt.restore(ckpt.latest_step(), params)
    tok = default_tokenizer()
    width = max(map(len, prompts))
    ids = np.array([[tok.pad_id] * (width - len(p)) + p for p in prompts], np.int32)
    valid = np.array([[False] * (width - len(p)) + [True] * len(p) for p in prompts])

    @jax.jit
    def run(params, ids, valid):
        logits_fn = lambda t, v: nnx.merge(graphdef, params)(t, v)
        settings = sampling.SampleSettings(
            gen_length=gen_length, steps=steps, block_length=block_length, **options
        )
        return sampling.generate(
            logits_fn, ids, valid, jax.random.key(0), settings, tok.special_ids
        )

    canvas, nfe = run(params, jnp.asarray(ids), jnp.asarray(valid))
    if whole:
        return [row[width - len(p) :] for row, p in zip(np.asarray(canvas).tolist(), prompts)], int(
            nfe
        )
    return np.asarray(canvas)[:, width:].tolist(), int(nfe)


def run_json(workdir, *args, settings=SETTINGS):
    """tools/sample.py --json on `workdir` with `settings` and `args`: (its result objects, its
    stderr)."""
    proc = subprocess.run(
        SAMPLE + [f"--workdir={workdir}", *settings, "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def test_json_output_is_the_sampler_on_the_checkpoint(workdir, tmp_path):
    out = tmp_path / "samples.jsonl"
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "Blessed are"}\n\n{"prompt_ids": [9, 10, 11, 12]}\n')
    proc = subprocess.run(
        SAMPLE
        + [
            f"--workdir={workdir}",
            "--prompt=In the beginning",
            "--prompt_ids=5,6,7",
            f"--prompts_file={prompts_file}",
            *SETTINGS,
            "--json",
            f"--output={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    tok = default_tokenizer()
    want_prompts = [
        tok.encode("In the beginning"),
        [5, 6, 7],
        tok.encode("Blessed are"),
        [9, 10, 11, 12],
    ]
    assert [r["prompt_ids"] for r in results] == want_prompts
    assert [r["prompt"] for r in results] == ["In the beginning", None, "Blessed are", None]
    tokens, nfe = reference_tokens(workdir, want_prompts, 16, 8, 8)
    assert [r["tokens"] for r in results] == tokens
    for r in results:
        assert len(r["tokens"]) == 16 and r["nfe"] == nfe == 8
        assert r["text"] == tok.decode(r["tokens"]) and r["seconds"] > 0


def test_guidance_and_threshold_decoding(workdir):
    """--cfg_scale and --threshold reach the sampler; with threshold decoding nfe is the model
    calls run (a threshold below every confidence: one per block)."""
    tok = default_tokenizer()
    for flags, options, calls in (
        (["--cfg_scale=2.0"], dict(cfg_scale=2.0), 8),
        (["--threshold=0.000001"], dict(threshold=1e-6), 2),
    ):
        (result,), _ = run_json(workdir, "--prompt=In the beginning", *flags)
        tokens, nfe = reference_tokens(
            workdir, [tok.encode("In the beginning")], 16, 8, 8, **options
        )
        assert result["tokens"] == tokens[0] and result["nfe"] == nfe == calls


@pytest.mark.slow
def test_sharded_sampling_gives_the_one_device_tokens(workdir):
    """Three prompts over 8 devices (the batch padded to 8), weights replicated or FSDP-sharded
    as trained, and with the dual K/V cache: the tokens of one device."""
    prompts = ["--prompt=In the beginning", "--prompt=Blessed are", "--prompt_ids=5,6,7"]
    one, _ = run_json(workdir, *prompts)
    for extra in ([], ["--fsdp"]):
        eight, log = run_json(workdir, *prompts, "--num_devices=8", *extra)
        assert "3 prompts on 8 device(s)" in log
        assert [r["tokens"] for r in eight] == [r["tokens"] for r in one]
    cached_one, _ = run_json(workdir, *prompts, "--kv_cache=dual")
    cached_eight, _ = run_json(workdir, *prompts, "--kv_cache=dual", "--num_devices=8")
    assert [r["tokens"] for r in cached_eight] == [r["tokens"] for r in cached_one]


def test_infilling_template_keeps_its_tokens_and_fills_its_masks(workdir):
    """Masks in the prompt compete with the generated ones (as in the reference, a mask can be
    left, or this untrained model can propose the mask id): the whole canvas is the sampler's."""
    tok = default_tokenizer()
    template = "In the <|mdm_mask|><|mdm_mask|> God created"
    (result,), _ = run_json(workdir, f"--prompt={template}")
    ids = tok.encode(template)
    assert result["prompt_ids"] == ids and ids.count(tok.mask_id) == 2
    filled = result["filled_prompt_ids"]
    assert len(filled) == len(ids) and filled != ids
    assert all(f == i for f, i in zip(filled, ids) if i != tok.mask_id)
    assert result["filled_prompt"] == tok.decode(filled)
    (canvas,), _ = reference_tokens(workdir, [ids], 16, 8, 8, whole=True)
    assert canvas == filled + result["tokens"]


def test_flags_not_given_are_the_runs_sample_section(workdir):
    """The sampler settings left off the command line are the run's (configs/tiny.py's sample
    section: 16 tokens, one block of 16), the ones given replace them."""
    (result,), _ = run_json(workdir, "--prompt=In the beginning", "--steps=8", settings=[])
    tokens, nfe = reference_tokens(
        workdir, [default_tokenizer().encode("In the beginning")], 16, 8, 16
    )
    assert [result["tokens"]] == tokens and result["nfe"] == nfe == 8


def test_text_output(workdir):
    proc = subprocess.run(
        SAMPLE + [f"--workdir={workdir}", "--prompt=In the beginning", *SETTINGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("--- 'In the beginning' ->\nIn the beginning")


def test_bad_inputs_give_one_clear_line(workdir, tmp_path):
    cases = {
        "no_checkpoint": ([f"--workdir={tmp_path}", "--prompt=a"], "holds no checkpoints/"),
        "no_step": (
            [f"--workdir={workdir}", "--prompt=a", "--step=3"],
            "complete steps: [2, 4, 6]",
        ),
        "no_prompt": ([f"--workdir={workdir}"], "give a prompt"),
        "bad_ids": ([f"--workdir={workdir}", "--prompt_ids=1,x"], "--prompt_ids='1,x' is invalid"),
        "id_range": ([f"--workdir={workdir}", "--prompt_ids=99999"], "99999 is out of range"),
        "blocks": (
            [f"--workdir={workdir}", "--prompt=a", "--gen_length=16", "--block_length=5"],
            "--block_length=5 does not divide --gen_length=16",
        ),
        "blocks_of_the_run": (
            [f"--workdir={workdir}", "--prompt=a", "--gen_length=12"],
            "--block_length=16 does not divide --gen_length=12 (--block_length: the run's "
            "sample.block_length)",
        ),
        "threshold": ([f"--workdir={workdir}", "--prompt=a", "--threshold=1.5"], "threshold=1.5"),
        "cfg": (
            [f"--workdir={workdir}", "--prompt=a", "--cfg_scale=-1"],
            "cfg_scale=-1.0 is invalid",
        ),
        "too_long": (
            [f"--workdir={workdir}", "--prompt=" + "And the LORD spake " * 20, *SETTINGS],
            "longer than the model's context of 64 tokens",
        ),
        "devices": ([f"--workdir={workdir}", "--prompt=a", "--num_devices=99"], "num_devices=99"),
    }
    procs = {
        name: subprocess.Popen(
            SAMPLE + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=600)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr[-2000:])
        assert cases[name][1] in lines[0], (name, lines[0])


def test_loading_parameters_builds_no_optimizer(workdir, monkeypatch):
    """inference.load (sampling, evaluation, lm-eval) restores the parameters alone: the
    optimizer and the learning-rate schedule are never built, and they equal the checkpoint's,
    on CPU each layer's apart from the stack the checkpoint holds."""
    from llada_jax import inference, optim

    def refuse(*args, **kwargs):
        raise AssertionError("an optimizer or LR schedule was built to load parameters")

    monkeypatch.setattr(optim, "make_optimizer", refuse)
    monkeypatch.setattr(optim, "make_lr_schedule", refuse)
    model = inference.load(workdir)
    assert model.run.optimizer is None and model.run.lr_schedule is None
    with checkpoint.Checkpointer(workdir) as ckpt:
        assert model.step == ckpt.latest_step()
        stacked, _ = ckpt.restore(model.step, run_lib.abstract_params(model.saved_run)[1])
    assert model.saved_run.model_cfg.scan_layers and not model.run.model_cfg.scan_layers
    assert not model.run.cfg.model.scan_layers
    expected = nnx.to_pure_dict(stacked)
    layers = expected.pop("blocks")
    got = nnx.to_pure_dict(model.params)
    apart = got.pop("blocks")
    assert sorted(apart) == list(range(model.run.model_cfg.n_layers))
    for i, layer in apart.items():
        for g, w in zip(jax.tree.leaves(layer), jax.tree.leaves(layers), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w)[i])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

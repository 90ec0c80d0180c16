"""Hugging Face import/export (tools/convert_hf.py): reference logits, byte-identical round trips,
an independent numpy LLaMA forward pass, training from a converted workdir, one-line errors."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from llada_jax import checkpoint, sampling, sections, sharding
from llada_jax.convert import hf
from llada_jax.data.tokenizer import load_tokenizer
from llada_jax.model import ModelConfig, Transformer
from llada_jax.special_ids import SpecialIds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf_llada_tiny")
CLI = [sys.executable, os.path.join(ROOT, "tools", "convert_hf.py")]


def convert(*args):
    return subprocess.run(CLI + list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


def read_all(directory):
    """Every tensor of an HF directory (via its index when sharded): name -> (dtype, shape,
    bytes)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (
        sorted(set(json.load(open(index))["weight_map"].values()))
        if os.path.exists(index)
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="numpy") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = (t.dtype, t.shape, t.tobytes())
    return out


def restore_model(workdir, **overrides):
    """Our model with the workdir's latest checkpoint, built from its config.json."""
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = sections.from_section(ModelConfig, {**json.load(f)["model"], **overrides})
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    ckpt = checkpoint.Checkpointer(workdir)
    params, _ = ckpt.restore(ckpt.latest_step(), nnx.state(model, nnx.Param))
    ckpt.close()
    nnx.update(model, params)
    return model


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("conv") / "llada_tiny")
    proc = convert(f"--hf_dir={FIXTURE}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_imported_fixture_reproduces_reference_logits(fixture_workdir):
    assert sorted(os.listdir(fixture_workdir)) == ["checkpoints", "config.json"]
    assert os.listdir(os.path.join(fixture_workdir, "checkpoints")) == ["0"]
    with open(os.path.join(fixture_workdir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["data"]["tokenizer"] == "" and cfg["model"]["causal"] is False
    assert cfg["model"]["vocab_size"] == 256 and cfg["model"]["head_dim"] == 0
    meta = checkpoint.Checkpointer(fixture_workdir).meta(0)
    assert meta["config"]["model"] == cfg["model"] and meta["step"] == 0
    model = restore_model(fixture_workdir)
    ref = np.load(os.path.join(FIXTURE, "reference_logits.npz"))
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    logits = jax.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=1e-4)
    valid = jnp.asarray(ref["attention_mask"], bool)
    masked = jax.jit(lambda m, x, v: m(x, v))(model, ids, valid)
    np.testing.assert_allclose(
        np.asarray(masked), ref["logits_with_attention_mask"], atol=1e-4, rtol=1e-4
    )


def test_fixture_round_trip_is_byte_identical(fixture_workdir, tmp_path):
    out = str(tmp_path / "hf")
    proc = convert(f"--workdir={fixture_workdir}", f"--hf_dir={out}", "--export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # No tokenizer: the run's (the shipped one, 4096 tokens) does not fit the 256-token model.
    assert "warning: no tokenizer written" in proc.stdout
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert read_all(out) == read_all(FIXTURE)
    with (
        open(os.path.join(out, "config.json")) as f,
        open(os.path.join(FIXTURE, "config.json")) as g,
    ):
        exported, source = json.load(f), json.load(g)
    # No modeling code was imported: auto_map names the public LLaDA repository's.
    assert exported.pop("auto_map") == {
        "AutoConfig": "GSAI-ML/LLaDA-8B-Base--configuration_llada.LLaDAConfig",
        "AutoModel": "GSAI-ML/LLaDA-8B-Base--modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "GSAI-ML/LLaDA-8B-Base--modeling_llada.LLaDAModelLM",
    }
    assert exported == source


# ----------------------------------------------------------------------------------------------
def synthetic_llada(
    directory, n_layers=3, d=32, heads=4, kv=2, f=48, vocab=64, shard_bytes=20_000, dtype="bfloat16"
):
    """An HF LLaDA checkpoint split into shards with an index file."""
    rng = np.random.default_rng(0)
    p = "model.transformer."
    shapes = {
        p + "wte.weight": (vocab, d),
        p + "ln_f.weight": (d,),
        p + "ff_out.weight": (vocab, d),
    }
    hd = d // heads
    for i in range(n_layers):
        for name, s in dict(
            attn_norm=(d,),
            q_proj=(d, d),
            k_proj=(kv * hd, d),
            v_proj=(kv * hd, d),
            attn_out=(d, d),
            ff_norm=(d,),
            ff_proj=(f, d),
            up_proj=(f, d),
            ff_out=(d, f),
        ).items():
            shapes[f"{p}blocks.{i}.{name}.weight"] = s
    os.makedirs(directory)
    weight_map, shard, n = {}, {}, 0
    items = list(shapes.items())
    for j, (k, s) in enumerate(items):
        shard[k] = rng.normal(0, 0.2, s).astype(getattr(ml_dtypes, dtype, np.dtype(dtype)))
        if sum(t.nbytes for t in shard.values()) > shard_bytes or j == len(items) - 1:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
            shard, n = {}, n + 1
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    config = dict(
        json.load(open(os.path.join(FIXTURE, "config.json"))),
        d_model=d,
        n_heads=heads,
        n_kv_heads=kv,
        n_layers=n_layers,
        mlp_hidden_size=f,
        embedding_size=vocab,
        vocab_size=vocab,
        mask_token_id=vocab - 1,
        torch_dtype=dtype,
    )
    config.pop("dtype")
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)
    return n


def test_bf16_sharded_round_trip_is_byte_identical(tmp_path):
    src = str(tmp_path / "src")
    assert synthetic_llada(src) >= 3
    workdir, out = str(tmp_path / "w"), str(tmp_path / "out")
    hf.import_hf(src, workdir)  # float32 parameters (exact for bf16 inputs)
    assert (
        json.load(open(os.path.join(workdir, "config.json")))["model"]["param_dtype"] == "float32"
    )
    files = hf.export_hf(workdir, out, max_shard_size="20KB")  # bf16: the source's torch_dtype
    assert len(files) > 2 and all(
        os.path.getsize(os.path.join(out, n)) <= 20_000 + 8192 for n in files
    )
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(files)
    got = read_all(out)
    assert got == read_all(src)
    assert all(dtype == ml_dtypes.bfloat16 for dtype, _, _ in got.values())
    # The same parameters exported in float32 are the exact upcast.
    out32 = str(tmp_path / "out32")
    hf.export_hf(workdir, out32, dtype="float32")
    f32 = read_all(out32)
    for k, (dtype, shape, data) in read_all(src).items():
        want = np.frombuffer(data, ml_dtypes.bfloat16).astype(np.float32).tobytes()
        assert f32[k][0] == np.float32 and f32[k][2] == want, k
    # bfloat16 parameters in the checkpoint round-trip too.
    w16, out16 = str(tmp_path / "w16"), str(tmp_path / "out16")
    hf.import_hf(src, w16, dtype="bfloat16")
    hf.export_hf(w16, out16)
    assert read_all(out16) == read_all(src)


# ----------------------------------------------------------------------------------------------
# Independent numpy causal forward pass of LlamaForCausalLM, from its state dict.
def np_llama_forward(t, c, ids):
    t = {k: v.astype(np.float64) for k, v in t.items()}
    d, h, kvh = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd, eps, theta = c.get("head_dim") or d // h, c["rms_norm_eps"], c["rope_theta"]
    b, n = ids.shape

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # HF rotate_half
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos[None, :, None] + rot * sin[None, :, None]

    x = t["model.embed_tokens.weight"][ids]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(c["num_hidden_layers"]):
        w = lambda name: t[f"model.layers.{i}.{name}.weight"]
        y = norm(x, w("input_layernorm"))
        q = rope((y @ w("self_attn.q_proj").T).reshape(b, n, h, hd))
        k = rope((y @ w("self_attn.k_proj").T).reshape(b, n, kvh, hd))
        v = (y @ w("self_attn.v_proj").T).reshape(b, n, kvh, hd)
        k, v = np.repeat(k, h // kvh, 2), np.repeat(v, h // kvh, 2)
        s = np.where(causal, np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(b, n, h * hd)
        x = x + a @ w("self_attn.o_proj").T
        y = norm(x, w("post_attention_layernorm"))
        g = y @ w("mlp.gate_proj").T
        x = x + (g / (1 + np.exp(-g)) * (y @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    x = norm(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if c["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    torch_dtype="float32",
)


def synthetic_llama(directory, c=LLAMA, seed=0):
    rng = np.random.default_rng(seed)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    t = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (v, d)),
        "model.norm.weight": rng.uniform(0.5, 1.5, d),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update(
            {
                p + "input_layernorm.weight": rng.uniform(0.5, 1.5, d),
                p + "post_attention_layernorm.weight": rng.uniform(0.5, 1.5, d),
                p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (q, d)),
                p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (kv, d)),
                p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (kv, d)),
                p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (d, q)),
                p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (f, d)),
                p + "mlp.up_proj.weight": rng.normal(0, 0.2, (f, d)),
                p + "mlp.down_proj.weight": rng.normal(0, 0.2, (d, f)),
            }
        )
    t = {k: a.astype(np.float32) for k, a in t.items()}
    os.makedirs(directory)
    save_file(t, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(c, fh)
    return t


@pytest.fixture(scope="module")
def llama_workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("llama")
    tensors = synthetic_llama(str(base / "hf"))
    hf.import_hf(str(base / "hf"), str(base / "w"))
    return str(base / "w"), tensors


def test_llama_import_matches_numpy_causal_forward(llama_workdir):
    workdir, tensors = llama_workdir
    cfg = json.load(open(os.path.join(workdir, "config.json")))["model"]
    assert cfg["causal"] is False and cfg["tie_embeddings"] is True and cfg["n_kv_heads"] == 2
    model = restore_model(workdir, causal=True)
    ids = np.random.default_rng(1).integers(0, LLAMA["vocab_size"], (2, 10))
    got = jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    np.testing.assert_allclose(
        np.asarray(got), np_llama_forward(tensors, LLAMA, ids), atol=2e-4, rtol=2e-4
    )


def test_training_starts_from_a_converted_workdir(llama_workdir, tmp_path):
    """configs/tiny.py has the synthetic LLaMA's shapes; with lr 0 the parameters stay the
    imported ones through 2 steps, so the run's checkpoint holds exactly the HF weights."""
    source, tensors = llama_workdir
    run = str(tmp_path / "run")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada_jax.train",
            "--config=configs/tiny.py",
            f"--workdir={run}",
            f"--config.train.init_from={source}",
            "--config.train.steps=2",
            "--config.optim.lr=0.0",
            "--config.optim.final_lr=0.0",
            "--config.optim.warmup_steps=1",
            "--config.optim.decay_steps=1",
            "--config.sample.num_samples=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = checkpoint.Checkpointer(run)
    assert ckpt.latest_step() == 2
    ckpt.close()
    model = restore_model(run)
    np.testing.assert_array_equal(
        np.asarray(model.embed.embedding[...]), tensors["model.embed_tokens.weight"]
    )
    q = np.asarray(model.blocks.attn.q.kernel[...])[1].reshape(64, -1)
    np.testing.assert_array_equal(q, tensors["model.layers.1.self_attn.q_proj.weight"].T)
    down = np.asarray(model.blocks.mlp.down.kernel[...])[0]
    np.testing.assert_array_equal(down, tensors["model.layers.0.mlp.down_proj.weight"].T)


# ----------------------------------------------------------------------------------------------
def peak_anonymous_mib(args):
    """Runs the converter; its exit code and peak anonymous (non-file) memory, sampled every
    5 ms."""
    proc = subprocess.Popen(
        CLI + list(args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(
                    [peak] + [int(line.split()[1]) for line in f if line.startswith("RssAnon")]
                )
        except OSError:  # exited between poll and open
            pass
        time.sleep(0.005)
    return proc.returncode, peak / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux /proc")
def test_import_memory_stays_near_one_parameter(tmp_path):
    """A 72 MiB float32 import whose largest parameter (a stacked MLP matrix) is 16 MiB."""
    src = tmp_path / "src"
    synthetic_llada(
        str(src),
        n_layers=16,
        d=256,
        heads=4,
        kv=4,
        f=1024,
        vocab=4096,
        shard_bytes=30_000_000,
        dtype="float32",
    )
    model_mib = sum(os.path.getsize(src / n) for n in os.listdir(src)) / 2**20
    largest_mib = 16 * 1024 * 256 * 4 / 2**20
    rc, small = peak_anonymous_mib([f"--hf_dir={FIXTURE}", f"--workdir={tmp_path / 'small'}"])
    assert rc == 0
    rc, big = peak_anonymous_mib([f"--hf_dir={src}", f"--workdir={tmp_path / 'big'}"])
    assert rc == 0
    # Orbax's stock numpy writes held ~0.9x the model at once; one array at a time holds ~1.3x
    # the largest parameter.
    assert big - small < max(2 * largest_mib, 0.45 * model_mib), (big, small, model_mib)


def _broken(tmp_path, name, edit):
    """A copy of the fixture with its tensors edited."""
    directory = tmp_path / name
    directory.mkdir()
    with safe_open(os.path.join(FIXTURE, "model.safetensors"), framework="numpy") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    edit(t)
    save_file(t, str(directory / "model.safetensors"))
    with open(os.path.join(FIXTURE, "config.json")) as f, open(directory / "config.json", "w") as g:
        g.write(f.read())
    return str(directory)


def test_bad_inputs_give_one_clear_line(tmp_path, fixture_workdir):
    missing = _broken(
        tmp_path, "missing", lambda t: t.pop("model.transformer.blocks.1.q_proj.weight")
    )
    key = "model.transformer.blocks.0.up_proj.weight"
    wrong = _broken(tmp_path, "wrong", lambda t: t.__setitem__(key, t[key][:, :10].copy()))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    cases = {
        "missing_tensor": ([f"--hf_dir={missing}"], "model.transformer.blocks.1.q_proj.weight"),
        "wrong_shape": ([f"--hf_dir={wrong}"], f"{key!r} has shape (96, 10), expected (96, 64)"),
        "missing_dir": ([f"--hf_dir={tmp_path / 'nope'}"], "does not exist"),
        "unknown_arch": ([f"--hf_dir={unknown}"], "unknown architecture"),
        "export_no_ckpt": (
            [f"--workdir={tmp_path / 'nope'}", f"--hf_dir={tmp_path / 'x'}", "--export"],
            "does not exist",
        ),
        "export_exists": (
            [f"--workdir={fixture_workdir}", f"--hf_dir={FIXTURE}", "--export"],
            "already exists",
        ),
    }
    procs = {}
    for name, (args, _) in cases.items():
        if not any(a.startswith("--workdir") for a in args):
            args = args + [f"--workdir={tmp_path / ('out_' + name)}"]
        procs[name] = subprocess.Popen(
            CLI + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert not os.path.exists(tmp_path / ("out_" + name)), name
    assert not [n for n in os.listdir(tmp_path) if "converting" in n]


def test_converted_workdir_samples_with_its_own_tokenizer(tmp_path, hf_tokenizer_dir):
    """An HF directory with tokenizer files: they are copied into DIR/tokenizer/, the config
    points at them and names the checkpoint's special ids (config.json's mask and EOS, the
    tokenizer's end of turn), and tools/sample.py samples the workdir from a text prompt,
    giving the tokens the sampler gives with those ids on the converted parameters."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(FIXTURE, hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_tokenizer_dir, name), hf_dir / name)
    workdir = str(tmp_path / "converted")
    proc = convert(f"--hf_dir={hf_dir}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "tokenizer"))) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = json.load(f)
    tok = load_tokenizer(os.path.join(hf_tokenizer_dir, "tokenizer.json"))
    assert cfg["data"]["tokenizer"] == os.path.join(workdir, "tokenizer", "tokenizer.json")
    assert (cfg["tokens"]["mask_id"], cfg["tokens"]["eos_id"]) == (255, 1)  # config.json's
    assert cfg["tokens"]["eot_id"] == tok.eot_id != tok.eos_id
    assert cfg["data"]["seq_len"] == 64  # config.json's max_sequence_length: the context

    prompt = "And the LORD"
    proc = subprocess.run(
        [sys.executable, "tools/sample.py", f"--workdir={workdir}", f"--prompt={prompt}"]
        + ["--gen_length=8", "--steps=4", "--block_length=8", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = tok.encode(prompt)
    model = restore_model(workdir)
    canvas, _ = jax.jit(
        lambda m, x: sampling.generate(
            lambda t, v: m(t, v),
            x,
            jnp.ones_like(x, bool),
            jax.random.key(0),
            sampling.SampleSettings(gen_length=8, steps=4, block_length=8),
            SpecialIds(mask_id=255),
        )
    )(model, jnp.asarray([ids], jnp.int32))
    assert result["prompt_ids"] == ids
    assert result["tokens"] == np.asarray(canvas)[0, len(ids) :].tolist()
    assert result["text"] == tok.decode(result["tokens"])


# ----------------------------------------------------------------------------------------------
# What `transformers` loads from an export (AutoConfig, AutoTokenizer), in a subprocess with no
# network and its own module cache. The configuration class stands for the public LLaDA code's:
# AutoConfig runs whatever configuration_llada.py the directory holds.
CONFIGURATION_LLADA = """from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
"""
LOAD_WITH_TRANSFORMERS = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
out, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
config = AutoConfig.from_pretrained(out, trust_remote_code=True)
print(json.dumps({
    "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
    "special": [tok.mask_token_id, tok.eos_token_id, tok.pad_token_id],
    "config": [type(config).__name__, config.d_model, config.n_layers, config.mask_token_id],
}))
"""


def load_with_transformers(out, texts, tmp_path):
    """What AutoTokenizer and AutoConfig(trust_remote_code=True) read from `out`."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_TRANSFORMERS, out, json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_loads_in_transformers_and_reimports(tiny_run, tmp_path):
    """A model trained here, exported: transformers reads its config (with the modeling code
    given by --hf_code) and its tokenizer (the shipped sentencepiece model, converted) with our
    ids; importing the export gives the same parameters, tokenizer ids and special ids, keeps
    the code, and exports again to the same bytes."""
    from llada_jax.data.corpus import read_default_corpus

    code = tmp_path / "code"
    code.mkdir()
    (code / "configuration_llada.py").write_text(CONFIGURATION_LLADA)
    out = str(tmp_path / "hf")
    proc = convert(f"--workdir={tiny_run}", f"--hf_dir={out}", "--export", f"--hf_code={code}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == [
        "config.json",
        "configuration_llada.py",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert hf_cfg["auto_map"]["AutoConfig"] == "configuration_llada.LLaDAConfig"
    run_cfg = json.load(open(os.path.join(tiny_run, "config.json")))
    ours = load_tokenizer(run_cfg["data"]["tokenizer"]).with_special_ids(
        sections.from_section(SpecialIds, run_cfg["tokens"])
    )
    texts = [line for line in read_default_corpus()[:20_000].splitlines() if line][:50]
    texts += ["  two  spaces\tand 12345 digits\n\n", "<|mdm_mask|> <|eot|>"]
    loaded = load_with_transformers(out, texts, tmp_path)
    assert loaded["ids"] == [ours.encode(t) for t in texts]
    assert loaded["special"] == [ours.mask_id, ours.eos_id, ours.pad_id]
    assert loaded["config"] == [
        "LLaDAConfig",
        run_cfg["model"]["d_model"],
        run_cfg["model"]["n_layers"],
        ours.mask_id,
    ]

    workdir = str(tmp_path / "reimported")
    proc = convert(f"--hf_dir={out}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(os.path.join(workdir, "hf_code")) == ["configuration_llada.py"]
    cfg = json.load(open(os.path.join(workdir, "config.json")))
    again = load_tokenizer(cfg["data"]["tokenizer"]).with_special_ids(
        sections.from_section(SpecialIds, cfg["tokens"])
    )
    assert [again.encode(t) for t in texts] == [ours.encode(t) for t in texts]
    assert again.vocab_size == ours.vocab_size
    assert again.special_ids == ours.special_ids
    before = nnx.to_pure_dict(nnx.state(restore_model(tiny_run), nnx.Param))
    after = nnx.to_pure_dict(nnx.state(restore_model(workdir), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, before, after)

    out2 = str(tmp_path / "hf2")  # the code kept at import is written again
    proc = convert(f"--workdir={workdir}", f"--hf_dir={out2}", "--export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out2)) == sorted(os.listdir(out))
    assert read_all(out2) == read_all(out)
    for name in ("config.json", "configuration_llada.py", "tokenizer.json"):
        assert open(os.path.join(out2, name)).read() == open(os.path.join(out, name)).read()

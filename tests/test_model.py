"""The transformer against the HF reference logits and an independent numpy forward pass."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from llada_jax import config as config_lib
from llada_jax import kernels as kernels_lib
from llada_jax import run as run_lib
from llada_jax import sharding
from llada_jax.convert.hf_llada import PREFIX, model_config_from_hf, params_from_hf
from llada_jax.kernels import KernelConfig, Kernels
from llada_jax.kernels import attention as attention_lib
from llada_jax.model import ModelConfig, Transformer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_llada_tiny")


# ----------------------------------------------------------------------------------------------
# Independent numpy reference of the HF LLaDA (llama block) forward pass, from its state dict.
def np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x, theta):
    """x (B, L, H, D), rotate-half on positions 0..L-1."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(x.shape[1])[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = np.concatenate([-x2, x1], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def np_forward(t, hf, ids, key_mask=None, segment_ids=None, causal=False):
    """HF state dict t (numpy, (out, in) linears) -> logits (B, L, V) in float64."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    h, kvh, d = hf["n_heads"], hf.get("n_kv_heads") or hf["n_heads"], hf["d_model"]
    hd, eps = d // h, hf["rms_norm_eps"]
    b, length = ids.shape
    x = t[PREFIX + "wte.weight"][ids]
    allowed = np.ones((b, length, length), bool)
    if key_mask is not None:
        allowed &= key_mask[:, None, :].astype(bool)
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        allowed &= np.tril(np.ones((length, length), bool))[None]
    for i in range(hf["n_layers"]):
        p = lambda n: t[f"{PREFIX}blocks.{i}.{n}.weight"]
        y = np_rmsnorm(x, p("attn_norm"), eps)
        q = np_rope((y @ p("q_proj").T).reshape(b, length, h, hd), hf["rope_theta"])
        k = np_rope((y @ p("k_proj").T).reshape(b, length, kvh, hd), hf["rope_theta"])
        v = (y @ p("v_proj").T).reshape(b, length, kvh, hd)
        k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = np.where(allowed[:, None], s, -1e30)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(b, length, d)
        x = x + a @ p("attn_out").T
        y = np_rmsnorm(x, p("ff_norm"), eps)
        g = y @ p("ff_proj").T
        x = x + ((g / (1 + np.exp(-g))) * (y @ p("up_proj").T)) @ p("ff_out").T
    x = np_rmsnorm(x, t[PREFIX + "ln_f.weight"], eps)
    head = t[PREFIX + "wte.weight"] if hf["weight_tying"] else t[PREFIX + "ff_out.weight"]
    return x @ head.T


# ----------------------------------------------------------------------------------------------
def chosen(cfg: ModelConfig, attention: str) -> Kernels:
    """The kernels a run with kernels.attention=`attention` builds `cfg`'s model with."""
    return kernels_lib.select(KernelConfig(attention=attention), cfg.compute_dtype)


def build(cfg: ModelConfig, tensors=None, attention: str = "xla") -> Transformer:
    """Model on a 1-device mesh with kernels.attention=`attention`, optionally loaded with HF
    tensors."""
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        model = Transformer(cfg, rngs=nnx.Rngs(0), kernels=chosen(cfg, attention))
    if tensors is not None:
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_hf(tensors, cfg)))
        nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def hf():
    with open(os.path.join(FIXTURE, "config.json")) as f:
        config = json.load(f)
    return (
        config,
        load_file(os.path.join(FIXTURE, "model.safetensors")),
        np.load(os.path.join(FIXTURE, "reference_logits.npz")),
    )


@pytest.mark.parametrize("scan_layers", [True, False])
def test_matches_hf_reference_logits(hf, scan_layers):
    config, tensors, ref = hf
    model = build(model_config_from_hf(config, scan_layers=scan_layers), tensors)
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    logits = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=1e-4)
    valid = jnp.asarray(ref["attention_mask"], bool)
    masked = np.asarray(jax.jit(lambda m, x, v: m(x, v))(model, ids, valid))
    # Padded query rows are not defined by the reference semantics beyond "keys are masked":
    # compare all rows, since the reference also computes them with the same key mask.
    np.testing.assert_allclose(masked, ref["logits_with_attention_mask"], atol=1e-4, rtol=1e-4)
    # The numpy reference agrees with the HF logits too, so it is a valid oracle below.
    np.testing.assert_allclose(
        np_forward(tensors, config, ref["input_ids"]), ref["logits"], atol=1e-4
    )


def random_hf_tensors(hf_cfg, seed=0):
    """Random weights in the HF layout for the given config dict."""
    rng = np.random.default_rng(seed)
    d, f, v = hf_cfg["d_model"], hf_cfg["mlp_hidden_size"], hf_cfg["embedding_size"]
    hd = d // hf_cfg["n_heads"]
    kv = hf_cfg["n_kv_heads"] * hd
    shapes = {"wte": (v, d), "ln_f": (d,), "ff_out": (v, d)}
    t = {PREFIX + k + ".weight": s for k, s in shapes.items()}
    for i in range(hf_cfg["n_layers"]):
        for name, s in dict(
            attn_norm=(d,),
            ff_norm=(d,),
            q_proj=(d, d),
            k_proj=(kv, d),
            v_proj=(kv, d),
            attn_out=(d, d),
            ff_proj=(f, d),
            up_proj=(f, d),
            ff_out=(d, f),
        ).items():
            t[f"{PREFIX}blocks.{i}.{name}.weight"] = s
    out = {}
    for k, s in t.items():
        out[k] = (rng.uniform(0.5, 1.5, s) if len(s) == 1 else rng.normal(0, 0.2, s)).astype(
            np.float32
        )
    return out


GQA_HF = dict(
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_hidden_size=48,
    embedding_size=64,
    vocab_size=64,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    weight_tying=False,
)


@pytest.mark.parametrize("tied,causal", [(False, False), (True, True)])
def test_gqa_tied_causal_segments_match_numpy(tied, causal):
    hf_cfg = dict(GQA_HF, weight_tying=tied)
    tensors = random_hf_tensors(hf_cfg)
    cfg = model_config_from_hf(hf_cfg, causal=causal)
    model = build(cfg, tensors)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, (2, 12))
    key_mask = np.ones((2, 12), bool)
    key_mask[1, :3] = False
    seg = np.array([[0] * 5 + [1] * 7, [0] * 12])
    got = jax.jit(lambda m, x, k, s: m(x, k, s))(
        model, jnp.asarray(ids), jnp.asarray(key_mask), jnp.asarray(seg)
    )
    want = np_forward(tensors, hf_cfg, ids, key_mask, seg, causal)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "n_layers,scan_layers,causal", [(2, True, False), (2, False, True), (1, True, False)]
)
def test_hidden_at_positions_matches_numpy(n_layers, scan_layers, causal):
    """`hidden(positions=...)` (the last layer's queries and MLP at those positions alone) gives
    the numpy forward pass's logits there: packed segments, a padded row, positions in any
    order and repeated, with one layer and with two (scanned and not)."""
    hf_cfg = dict(GQA_HF, n_layers=n_layers)
    tensors = random_hf_tensors(hf_cfg, seed=4)
    model = build(model_config_from_hf(hf_cfg, causal=causal, scan_layers=scan_layers), tensors)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 64, (2, 12))
    key_mask = np.ones((2, 12), bool)
    key_mask[1, 9:] = False
    seg = np.array([[1] * 5 + [2] * 7, [1] * 12])
    positions = np.array([[11, 0, 4, 5, 4], [8, 3, 3, 0, 1]], np.int32)
    hidden = jax.jit(lambda m, *a: m.head(m.hidden(*a[:3], positions=a[3])[0]))
    got = hidden(model, *(jnp.asarray(a) for a in (ids, key_mask, seg, positions)))
    want = np_forward(tensors, hf_cfg, ids, key_mask, seg, causal)
    want = np.take_along_axis(want, positions[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_hidden_at_positions_of_a_block_model_matches_the_full_pass():
    """With a block-diffusion pattern over a row and its clean copy (positions repeating), the
    positions' outputs equal the full pass's at those positions."""
    model = build(model_config_from_hf(GQA_HF), random_hf_tensors(GQA_HF, seed=6))
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 64, (2, 16)))
    positions = jnp.asarray([[0, 3, 5, 7], [6, 2, 1, 4]], jnp.int32)
    blocks = attention_lib.Blocks(4, clean_copy=True)
    run = jax.jit(lambda m, p: m.hidden(ids, blocks=blocks, positions=p)[0])
    full = np.asarray(jax.jit(lambda m: m.hidden(ids, blocks=blocks)[0])(model))
    want = np.take_along_axis(full, np.asarray(positions)[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(run(model, positions)), want, atol=1e-5, rtol=1e-5)


def test_hidden_at_positions_does_not_copy_the_layers():
    """The scanned layers before the last are indexed in the loop, not sliced off the stack (a
    copy of the whole model): the positions pass needs no more scratch memory than the full
    pass plus one layer's parameters."""
    cfg = ModelConfig(
        vocab_size=64, d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, mlp_hidden=768
    )
    graphdef, params = nnx.split(build(cfg), nnx.Param)
    tokens, positions = jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 4), jnp.int32)

    def scratch(**kw):
        fn = lambda p: nnx.merge(graphdef, p).hidden(tokens, **kw)[0]
        return jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes

    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) / cfg.n_layers
    assert scratch(positions=positions) < scratch() + 1.5 * layer_bytes


def test_inference_holds_each_layer_apart_on_cpu():
    """run_lib.for_inference gives a scanned CPU model's layers buffers of their own, freeing the
    stack it was given: a forward pass then copies no layer's weights out of the stack into
    scratch memory (at least one layer's worth less), and computes the same logits."""
    cfg = config_lib.load("configs/demo.py", [("model.d_model", 256), ("model.mlp_hidden", 1024)])
    run = run_lib.build_run(cfg, devices=jax.devices()[:1], data=False, optimizer=False)
    graphdef, params = run_lib.init_params(run)
    taken = jax.tree.map(jnp.copy, params)
    apart_run, apart_graphdef, apart = run_lib.for_inference(run, taken)
    assert run.model_cfg.scan_layers and not apart_run.model_cfg.scan_layers
    # The stacked arrays it was given are freed (loading holds the layers once, not twice).
    assert all(x.is_deleted() for x in jax.tree.leaves(nnx.to_pure_dict(taken)["blocks"]))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 4000, (1, 16)), jnp.int32)
    forward = jax.jit(lambda g, p: nnx.merge(g, p)(tokens), static_argnums=0)

    def scratch(g, p):
        return forward.lower(g, p).compile().memory_analysis().temp_size_in_bytes

    layers = nnx.to_pure_dict(params)["blocks"]
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(layers)) / run.model_cfg.n_layers
    assert scratch(apart_graphdef, apart) + layer_bytes <= scratch(graphdef, params)
    np.testing.assert_allclose(
        np.asarray(forward(apart_graphdef, apart)),
        np.asarray(forward(graphdef, params)),
        atol=2e-5,
        rtol=2e-5,
    )


@pytest.mark.parametrize(
    "causal,layout",
    [(False, "trailing"), (True, "trailing"), (False, "leading"), (False, "packed")],
)
def test_cudnn_config_matches_numpy(causal, layout):
    """kernels.attention=cudnn (jax.nn.dot_product_attention; its XLA implementation on CPU): key
    padding as lengths when the caller promises trailing padding, else (left padding, packed
    segments) a bias. Real positions match numpy, and a filler row (no valid key) leaves the
    gradients finite and equal to the einsum attention's."""
    hf_cfg = dict(GQA_HF)
    tensors = random_hf_tensors(hf_cfg)
    cfg = model_config_from_hf(hf_cfg, causal=causal)
    ids = np.random.default_rng(2).integers(0, 64, (3, 12))
    valid = np.arange(12)[None] < np.array([[12], [9], [0]])
    if layout == "leading":
        valid = valid[:, ::-1]
    seg = np.array([[0] * 5 + [1] * 7] * 3) if layout == "packed" else None
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(3, 12, 64)) * valid[..., None])
    args = (jnp.asarray(ids), jnp.asarray(valid), None if seg is None else jnp.asarray(seg))
    prefix = layout != "leading"
    mask = attention_lib.mask(args[1], args[2], Kernels("xla", "cudnn", "cpu"), causal, prefix)
    assert mask.ndim == (1 if layout == "trailing" else 4)  # lengths or a bias

    def run(attention):
        graphdef, params = nnx.split(build(cfg, tensors, attention), nnx.Param)
        logits = lambda p: nnx.merge(graphdef, p)(*args, valid_prefix=prefix)
        return (
            np.asarray(jax.jit(logits)(params)),
            jax.jit(jax.grad(lambda p: jnp.sum(logits(p) * weights)))(params),
        )

    logits, grads = run("cudnn")
    want = np_forward(tensors, hf_cfg, ids, valid, seg, causal)
    np.testing.assert_allclose(logits[valid], want[valid], atol=2e-4, rtol=2e-4)
    _, want_grads = run("xla")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), grads, want_grads
    )


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs an NVIDIA GPU (cuDNN); run with JAX_PLATFORMS=cuda,cpu",
)
def test_cudnn_kernel_matches_xla_attention_on_gpu():
    """cuDNN's kernel in bfloat16 with key lengths (a filler row among them) and with a bias:
    logits and gradients within bfloat16 noise of the XLA implementation, all finite."""
    cfg = ModelConfig(
        vocab_size=128,
        d_model=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=512,
        dtype="bfloat16",
    )
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 128, (3, 256)))
    valid = np.arange(256)[None] < np.array([[256], [200], [0]])
    weights = jnp.asarray(rng.normal(size=(3, 256, 128)) * valid[..., None], jnp.float32)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    for seg in (None, jnp.asarray(np.repeat([[0, 1]], 3, 0).repeat(128, 1))):

        def run(attention):
            graphdef, params = nnx.split(build(cfg, attention=attention), nnx.Param)
            f = lambda p: nnx.merge(graphdef, p)(
                ids, jnp.asarray(valid), seg, valid_prefix=True
            ).astype(jnp.float32)
            return jax.jit(f)(params), jax.jit(jax.grad(lambda p: jnp.sum(f(p) * weights)))(params)

        (logits, grads), (want, want_grads) = run("cudnn"), run("xla")
        assert rel(logits[valid], want[valid]) < 2e-2
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            assert bool(jnp.all(jnp.isfinite(g))) and rel(g, w) < 5e-2


def test_remat_and_bf16_agree_with_plain_float32():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)))

    def loss_and_grad(model_cfg):
        model = build(model_cfg)
        graphdef, params = nnx.split(model, nnx.Param)
        f = lambda p: jnp.mean(nnx.merge(graphdef, p)(ids).astype(jnp.float32) ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    base_loss, base_grad = loss_and_grad(cfg)
    for remat in ("full", "dots"):
        loss, grad = loss_and_grad(ModelConfig(**{**cfg.__dict__, "remat": remat}))
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad, base_grad
        )
    loss16, _ = loss_and_grad(ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"}))
    np.testing.assert_allclose(loss16, base_loss, rtol=5e-2)


@pytest.mark.parametrize(
    "causal,mesh_shape,remat", [(False, (2, 2, 2), "none"), (True, (1, 1, 1), "dots_attn")]
)
def test_splash_kernel_matches_einsum_attention(causal, mesh_shape, remat):
    """The Pallas splash kernel (interpreted on CPU), sharded by shard_map on a mesh: the same
    logits on real tokens and the same gradients as the einsum attention, with GQA, key padding
    and packed segments."""
    cfg = ModelConfig(
        vocab_size=64,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=48,
        causal=causal,
        remat=remat,
    )
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (4, 128)))
    valid = np.ones((4, 128), bool)
    valid[1, 100:] = False
    valid[3, 7:] = False
    seg = jnp.asarray(np.repeat([[0, 1, 2, 3]], 4, 0).repeat(32, 1))
    weights = jnp.asarray(rng.normal(size=(4, 128, 64)) * valid[..., None], jnp.float32)
    valid = jnp.asarray(valid)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])

    def run(attention):
        with sharding.use_mesh(mesh):
            model = Transformer(cfg, rngs=nnx.Rngs(0), kernels=chosen(cfg, attention))
            graphdef, params = nnx.split(model, nnx.Param)
            f = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, valid, seg) * weights)
            logits = jax.jit(lambda p: nnx.merge(graphdef, p)(ids, valid, seg))(params)
            return np.asarray(logits), jax.jit(jax.grad(f))(params)

    logits, grads = run("splash")
    want_logits, want_grads = run("xla")
    real = np.asarray(valid)
    np.testing.assert_allclose(logits[real], want_logits[real], atol=1e-4, rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), grads, want_grads
    )


def test_splash_config_falls_back_to_einsum_at_untileable_lengths():
    """A sampling canvas need not be a multiple of 128: kernels.attention=splash then runs the
    einsum attention, with the same masks."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    valid = jnp.asarray(np.arange(12)[None] >= np.array([[0], [3]]))
    seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 12])
    f = jax.jit(lambda m: m(ids, valid, seg))
    got = f(build(cfg, attention="splash"))
    want = f(build(cfg))
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


def test_dots_attn_remat_saves_the_kernel_output(capsys):
    """remat=dots_attn keeps the splash kernel's output (L, B, H, L, D) and log-sum-exp
    (L, B, H, L) for the backward pass; dots_no_batch recomputes them."""

    def saved_shapes(remat):
        cfg = ModelConfig(
            vocab_size=64,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            mlp_hidden=48,
            remat=remat,
        )
        graphdef, params = nnx.split(build(cfg, attention="splash"), nnx.Param)
        ids = jnp.zeros((2, 128), jnp.int32)
        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: jnp.sum(nnx.merge(graphdef, p)(ids)), params
        )
        return capsys.readouterr().out

    kernel_residuals = ("f32[2,2,4,128,16]", "f32[2,2,4,128]")
    saved = saved_shapes("dots_attn")
    assert all(f"{shape} output of scan" in saved for shape in kernel_residuals), saved
    saved = saved_shapes("dots_no_batch")
    assert not any(f"{shape} output of scan" in saved for shape in kernel_residuals), saved


def test_every_parameter_has_logical_axes():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48)
    state = nnx.state(build(cfg), nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(leaves) == 12
    for var in leaves:
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim and all(n is not None for n in names)
    assert nnx.get_partition_spec(state)["blocks"]["attn"]["k"]["kernel"].get_metadata()[
        "out_sharding"
    ] == ("layers", "embed", "kv_heads", "head_dim")


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("n_kv_heads", 3, "valid: a multiple of model.n_kv_heads=3"),
        ("remat", "sometimes", "'sometimes'"),
        ("dtype", "float16", "'float16'"),
        ("d_model", 0, "model.d_model=0"),
    ],
)
def test_bad_model_config_is_one_clear_error(field, value, words):
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48)
    fields[field] = value
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)

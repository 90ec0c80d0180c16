"""The sampler's K/V caches (Fast-dLLM's prefix and dual caches) on real transformers: exact
where they can be (one layer: a position's keys and values depend on its own token only),
approximate and measured where they cannot."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import sampling, sharding
from llada_jax.model import ModelConfig, Transformer
from llada_jax.special_ids import SpecialIds

VOCAB, MASK = 64, 63


def make_model(n_layers):
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=64,
        init_std=0.3,  # spread logits: confidences far apart, no near-ties to flip
    )
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def models():
    return {n: make_model(n) for n in (1, 2)}


def test_window_pass_is_exact_for_one_layer_only(models):
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, MASK)
    valid = jnp.ones((2, 12), bool).at[1, :3].set(False)
    changed = tokens.at[:, 5].set(7).at[:, 6].set(MASK)  # inside the window [4, 8)
    for n, model in models.items():
        _, cache = model.hidden(tokens, valid, return_cache=True)
        same = model.head(model.window(tokens[:, 4:8], valid, cache, jnp.int32(4)))
        np.testing.assert_allclose(same, model(tokens, valid)[:, 4:8], atol=1e-5)
        window = model.head(model.window(changed[:, 4:8], valid, cache, jnp.int32(4)))
        error = float(jnp.abs(window - model(changed, valid)[:, 4:8]).max())
        assert error < 1e-5 if n == 1 else error > 1e-3, (n, error)


@functools.lru_cache(maxsize=None)
def sampler(n_layers, kv_cache, threshold, cfg_scale):
    model = make_model(n_layers)
    fn = model
    if kv_cache != "none":
        fn = sampling.SamplerModel(
            body=lambda t, v: model.hidden(t, v, return_cache=True),
            head=model.head,
            window=model.window,
        )
    settings = sampling.SampleSettings(
        gen_length=16,
        steps=8,
        block_length=4,
        threshold=threshold or 0.0,
        cfg_scale=cfg_scale,
        kv_cache=kv_cache,
    )
    return jax.jit(
        functools.partial(sampling.generate, fn, settings=settings, ids=SpecialIds(mask_id=MASK))
    )


def prompts():
    prompt = np.array([[3, 4, 5, 6, 7, 8], [0, 0, 9, 10, 11, 12]], np.int32)
    return prompt, prompt != 0


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
@pytest.mark.parametrize("threshold, cfg_scale", [(None, 0.0), (0.3, 0.0), (None, 1.0)])
def test_cached_sampling_is_exact_on_a_one_layer_model(kv_cache, threshold, cfg_scale):
    prompt, valid = prompts()
    want, want_nfe = sampler(1, "none", threshold, cfg_scale)(prompt, valid, jax.random.key(0))
    got, nfe = sampler(1, kv_cache, threshold, cfg_scale)(prompt, valid, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(nfe) == int(want_nfe)
    assert not (np.asarray(got) == MASK).any()


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_cached_sampling_is_approximate_on_two_layers(kv_cache):
    """The agreement with exact decoding is measured (printed; tools/benchmark.py reports it on
    trained models); the cached canvas is a complete generation with the prompt kept."""
    prompt, valid = prompts()
    want, _ = sampler(2, "none", None, 0.0)(prompt, valid, jax.random.key(0))
    got, _ = sampler(2, kv_cache, None, 0.0)(prompt, valid, jax.random.key(0))
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(got[:, :6], prompt)
    assert not (got == MASK).any()
    print(f"{kv_cache}: {np.mean(got[:, 6:] == want[:, 6:]):.0%} of tokens as exact decoding")


def test_kv_cache_needs_a_window_pass():
    prompt, valid = prompts()
    with pytest.raises(ValueError, match="needs a SamplerModel with a window pass"):
        sampling.generate(
            make_model(1),
            prompt,
            valid,
            jax.random.key(0),
            sampling.SampleSettings(gen_length=16, steps=8, block_length=4, kv_cache="dual"),
            SpecialIds(mask_id=MASK),
        )

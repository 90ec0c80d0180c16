"""The ablation variants of the training objective (bell t-density, clipped ranges, paired and
complementary masking, unweighted CE) against expectations computed independently in numpy.

The central check: for a toy "model" whose per-row masked loss is k h(k / L) when k of its L
tokens are masked, the estimator's expectation is (1 / (top - eps)) * integral over the mask
rate p of E_k[k h(k / L)] / p dp, from p(eps) to p(top) (the ELBO in mask-rate form, with the
Jacobian dropped as the module does). That integral is computed here by quadrature over p and
exact binomial enumeration over k; the estimator is averaged over many rows of noise_batch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import config, train_step
from llada_jax import diffusion as D
from llada_jax import run as run_lib
from llada_jax.data import pipeline

MASK_ID = 7
L = 16
B = 8192  # rows per Monte-Carlo draw (one compile per config)
EPS = 1e-2


def h(x):
    return 1.0 + 3.0 * x**2  # the toy per-token loss, growing with the masked share


def np_mask_prob(t, schedule):
    t = np.asarray(t, np.float64)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - np.cos(np.pi * t / 2)
    return t**2


def elbo_reference(p_lo: float, p_hi: float, t_lo: float, t_hi: float) -> float:
    """(1 / (t_hi - t_lo)) * int_{p_lo}^{p_hi} E_{k ~ Bin(L, p)}[k h(k / L)] / p dp / L."""
    k = np.arange(L + 1)
    p = np.linspace(p_lo, p_hi, 20001)
    comb = np.array([math.comb(L, int(i)) for i in k], np.float64)
    pmf = comb[None, :] * p[:, None] ** k[None, :] * (1 - p[:, None]) ** (L - k[None, :])
    integrand = (pmf * (k * h(k / L))[None, :]).sum(1) / p / L
    return np.trapezoid(integrand, p) / (t_hi - t_lo)


def toy_loss(noised) -> np.ndarray:
    """Per row: weight * k h(k / L) / L with k the row's masked count (B,) float64."""
    k = np.asarray(noised["is_masked"]).sum(1).astype(np.float64)
    return np.asarray(noised["weight"], np.float64) * k * h(k / L) / L


def draw(cfg: D.DiffusionConfig, seed: int) -> dict:
    tokens = jnp.arange(B * L, dtype=jnp.int32).reshape(B, L) % 5
    if cfg.masking != "independent":
        tokens = D.pair_rows({"tokens": tokens})["tokens"]
    fn = jax.jit(lambda key, x: D.noise_batch(key, x, cfg))
    return fn(jax.random.key(seed), tokens)


CASES = [
    dict(schedule="linear"),
    dict(schedule="cosine", t_density="bell"),
    dict(schedule="polynomial", t_density="bell", t_sampling="stratified"),
    dict(schedule="linear", masking="complementary"),
    dict(schedule="cosine", masking="complementary", t_sampling="stratified"),
    dict(schedule="linear", masking="paired", t_density="bell"),
    dict(schedule="linear", eps=0.3, t_max=0.8),  # BD3-LM's clipped range: a partial integral
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_estimator_expectation_is_the_elbo(case):
    case = dict(case)
    eps = case.pop("eps", EPS)
    cfg = D.DiffusionConfig(mask_id=MASK_ID, eps=eps, random_length_prob=0.0, **case)
    t_lo = cfg.eps
    t_hi = cfg.t_max
    if cfg.masking == "complementary":
        # The top of t' is where copy 2's rate 1 - p meets copy 1's floor p(eps).
        t_hi = float(np.interp(1 - np_mask_prob(t_lo, cfg.schedule), *_inverse(cfg.schedule)))
        np.testing.assert_allclose(D.time_range(cfg)[1], t_hi, rtol=1e-4)
    p_lo, p_hi = np_mask_prob(t_lo, cfg.schedule), np_mask_prob(t_hi, cfg.schedule)
    ref = elbo_reference(p_lo, p_hi, t_lo, t_hi)
    losses = np.concatenate([toy_loss(draw(cfg, seed)) for seed in range(4)])
    halves = losses.reshape(4, 2, B // 2) if cfg.masking == "complementary" else None
    se = losses.std() / math.sqrt(losses.size)
    if cfg.t_sampling == "stratified":  # draws are not independent within a batch: per batch
        per_batch = losses.reshape(4, B).mean(1)
        se = max(se, per_batch.std(ddof=1) / 2)
    assert abs(losses.mean() - ref) < 5 * se + 1e-3, (losses.mean(), ref, se)
    if halves is not None:  # each copy alone is unbiased too
        for copy in range(2):
            part = halves[:, copy].ravel()
            assert abs(part.mean() - ref) < 5 * part.std() / math.sqrt(part.size) + 1e-3


def _inverse(schedule):
    t = np.linspace(0, 1, 200001)
    return np_mask_prob(t, schedule), t


def test_bell_time_is_beta_2_2_with_its_inverse_density():
    u = (np.arange(20000) + 0.5) / 20000
    t, iw = map(np.asarray, D.bell_time(jnp.asarray(u)))
    np.testing.assert_allclose(3 * t**2 - 2 * t**3, u, atol=2e-6)  # the Beta(2, 2) CDF
    np.testing.assert_allclose(iw, 1 / (6 * t * (1 - t)), rtol=1e-5)
    # E_q[f(t) / q(t)] = int_0^1 f: for f(t) = t^2, 1/3 (midpoint quadrature in u).
    assert abs(np.mean(t**2 * iw) - 1 / 3) < 2e-3


@pytest.mark.parametrize("schedule", D.SCHEDULES)
def test_time_of_inverts_mask_prob(schedule):
    cfg = D.DiffusionConfig(mask_id=MASK_ID, schedule=schedule, power=3.0)
    t = np.linspace(0.001, 0.999, 101)
    back = np.asarray(D.time_of(D.mask_prob(jnp.asarray(t), cfg), cfg))
    np.testing.assert_allclose(back, t, atol=2e-4)


def test_complementary_masks_cover_each_maskable_token_once():
    cfg = D.DiffusionConfig(mask_id=MASK_ID, masking="complementary", random_length_prob=0.0)
    n = 6
    tokens = jnp.arange(n * L, dtype=jnp.int32).reshape(n, L) % 5
    valid = jnp.arange(L)[None, :] < jnp.array([16, 12, 9, 16, 16, 16])[:, None]
    prompt = jnp.arange(L)[None, :] < jnp.array([0, 3, 2, 0, 0, 0])[:, None]
    pairs = D.pair_rows({"tokens": tokens, "valid": valid, "prompt_mask": prompt})
    out = D.noise_batch(
        jax.random.key(0),
        pairs["tokens"],
        cfg,
        prompt_mask=pairs["prompt_mask"],
        valid=pairs["valid"],
    )
    m = np.asarray(out["is_masked"])
    maskable = np.asarray(valid & ~prompt)[:3]
    first, second = m[:3], m[3:]
    np.testing.assert_array_equal(first | second, maskable)
    assert not (first & second).any()
    np.testing.assert_array_equal(np.asarray(pairs["tokens"])[3:], np.asarray(tokens)[:3])
    p = np.asarray(out["p"])
    np.testing.assert_allclose(p[3:], 1 - p[:3], rtol=1e-6)
    w = np.asarray(out["weight"])
    np.testing.assert_allclose(w[3:], w[:3] * p[:3] / (1 - p[:3]), rtol=1e-5)


def test_paired_masks_are_independent_draws():
    cfg = D.DiffusionConfig(mask_id=MASK_ID, masking="paired", random_length_prob=0.0)
    out = draw(cfg, 0)
    m = np.asarray(out["is_masked"])
    # Complements would make first | second all True; independent draws leave both visible.
    assert (~m[: B // 2] & ~m[B // 2 :]).any()
    assert not np.allclose(np.asarray(out["p"])[: B // 2], np.asarray(out["p"])[B // 2 :])


def test_bound_note():
    base = dict(mask_id=MASK_ID)
    assert D.bound_note(D.DiffusionConfig(**base)) is None
    assert D.bound_note(D.DiffusionConfig(**base, t_density="bell")) is None
    assert D.bound_note(D.DiffusionConfig(**base, masking="complementary")) is None
    assert "not a bound" in D.bound_note(D.DiffusionConfig(**base, loss_weight="none"))
    assert "[0.3, 0.8]" in D.bound_note(D.DiffusionConfig(**base, eps=0.3, t_max=0.8))
    assert D.bound_note(D.DiffusionConfig(**base, eps=0.05)) is not None


@pytest.mark.parametrize(
    "field,value",
    [("t_density", "gauss"), ("loss_weight", "mdlm"), ("masking", "twice"), ("t_max", 1.5)],
)
def test_invalid_variant_raises(field, value):
    with pytest.raises(ValueError, match=f"diffusion.{field}={value!r}"):
        D.DiffusionConfig(mask_id=MASK_ID, **{field: value})
    with pytest.raises(ValueError, match="eps=0.9"):
        D.DiffusionConfig(mask_id=MASK_ID, eps=0.9, t_max=0.8)


def test_train_step_pairs_rows_and_trains_on_masked_ce(tmp_path):
    overrides = [("diffusion.masking", "complementary"), ("diffusion.loss_weight", "none")]
    cfg = config.load("configs/tiny.py", overrides)
    run = run_lib.build_run(cfg, workdir=str(tmp_path), devices=jax.devices()[:1])
    graphdef, params, _ = run_lib.create_state(run)
    batch = pipeline.to_global(run.batches[0], run.mesh, cfg.data.batch_size)
    noised = train_step.noise(jax.random.key(3), batch, run.step_cfg)
    tokens, half = np.asarray(noised["targets"]), cfg.data.batch_size // 2
    np.testing.assert_array_equal(tokens[half:], np.asarray(batch["tokens"])[:half])
    np.testing.assert_array_equal(tokens[:half], tokens[half:])

    loss, _ = train_step.loss_fn(graphdef, params, noised, "none")
    model = nnx.merge(graphdef, params)
    logits = np.asarray(model(noised["inputs"], noised["valid"], valid_prefix=True), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    masked = np.asarray(noised["is_masked"]) & np.asarray(noised["valid"])
    assert float(loss) == pytest.approx(ce[masked].mean(), rel=1e-5)
    elbo, _ = train_step.loss_fn(graphdef, params, noised, "elbo")
    assert float(elbo) != pytest.approx(float(loss), rel=1e-3)


def test_odd_batch_with_paired_masking_is_refused(tmp_path):
    cfg = config.load(
        "configs/tiny.py", [("diffusion.masking", "paired"), ("data.batch_size", "7")]
    )
    with pytest.raises(ValueError, match="data.batch_size=7 must be even"):
        run_lib.build_run(cfg, workdir=str(tmp_path), devices=jax.devices()[:1])
    # Loading such a run for evaluation or sampling (its own batch sizes) is fine.
    run_lib.build_run(cfg, devices=jax.devices()[:1], data=False)

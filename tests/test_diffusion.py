"""Tests of llada_jax.diffusion against independent numpy computations."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llada_jax import diffusion as D
from llada_jax import sections

MASK_ID = 99
EPS = 1e-3


# ------------------------------------------------------------------ numpy references


def np_alpha(t, schedule, k=2.0):
    t = np.asarray(t, np.float64)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return np.cos(np.pi * t / 2)
    return 1.0 - t**k


def np_minus_alpha_prime(t, schedule, k=2.0):
    t = np.asarray(t, np.float64)
    if schedule == "linear":
        return np.ones_like(t)
    if schedule == "cosine":
        return (np.pi / 2) * np.sin(np.pi * t / 2)
    return k * t ** (k - 1)


def np_weight(t, schedule, k=2.0):
    t = np.asarray(t, np.float64)
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        return (np.pi / 2) * np.sin(np.pi * t / 2) / (1 - np.cos(np.pi * t / 2))
    return k * t ** (k - 1) / t**k


def np_ce(logits, targets):
    """-log softmax(logits)[target] in float64, via the max-shift trick."""
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def cfg_of(schedule="linear", power=2.0, **kw):
    kw.setdefault("random_length_prob", 0.0)
    return D.DiffusionConfig(mask_id=MASK_ID, schedule=schedule, power=power, eps=EPS, **kw)


NB_B, NB_L = 8, 16  # one shape for every noise_batch call (fewer compiles)
SCHEDULE_CASES = [("linear", 2.0), ("cosine", 2.0), ("polynomial", 2.0), ("polynomial", 3.0)]


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("schedule,k", SCHEDULE_CASES)
def test_schedule_values_match_numpy(schedule, k):
    cfg = cfg_of(schedule, k)
    t = np.linspace(0.01, 1.0, 50)
    np.testing.assert_allclose(
        np.asarray(D.alpha(t, cfg)), np_alpha(t, schedule, k), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(D.mask_prob(t, cfg)), 1 - np_alpha(t, schedule, k), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(D.elbo_weight(t, cfg)), np_weight(t, schedule, k), rtol=1e-5
    )
    # Spot values by hand.
    a_half = float(D.alpha(jnp.float32(0.5), cfg))
    expected = {"linear": 0.5, "cosine": math.cos(math.pi / 4), "polynomial": 1 - 0.5**k}[schedule]
    assert a_half == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("schedule,k", SCHEDULE_CASES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule, k):
    """w(t) vs a numpy central finite difference of the code's alpha(t)."""
    cfg = cfg_of(schedule, k)
    t = np.linspace(0.05, 0.95, 19)
    h = 1e-3
    a_plus = np.asarray(D.alpha(t + h, cfg), np.float64)
    a_minus = np.asarray(D.alpha(t - h, cfg), np.float64)
    a = np.asarray(D.alpha(t, cfg), np.float64)
    fd_weight = -(a_plus - a_minus) / (2 * h) / (1 - a)
    np.testing.assert_allclose(np.asarray(D.elbo_weight(t, cfg)), fd_weight, rtol=2e-3)


def test_cosine_weight_is_stable_near_eps():
    cfg = cfg_of("cosine")
    t = np.array([EPS, 2 * EPS, 1e-2])
    np.testing.assert_allclose(np.asarray(D.elbo_weight(t, cfg)), np_weight(t, "cosine"), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(D.mask_prob(t, cfg)), 1 - np.cos(np.pi * t / 2), rtol=1e-5
    )


@pytest.mark.parametrize("schedule,k", SCHEDULE_CASES[:3])
def test_monte_carlo_elbo_identity(schedule, k):
    """mean_t w(t') (1 - alpha(t')) ~= E_{t'~U(eps,1)}[-alpha'(t')]
    = (alpha(eps) - alpha(1)) / (1 - eps)."""
    cfg = cfg_of(schedule, k)
    B = 1 << 16
    analytic = (np_alpha(EPS, schedule, k) - np_alpha(1.0, schedule, k)) / (1 - EPS)
    # Spread of f(t') = -alpha'(t') on [eps, 1] (independent numpy): its std sets the iid
    # tolerance, its total variation bounds the stratified error (one sample per stratum of
    # width 1/B => |error| <= TV / B).
    grid = np.linspace(EPS, 1.0, 200001)
    f = np_minus_alpha_prime(grid, schedule, k)
    std = f.std()
    tv = np.abs(np.diff(f)).sum()
    float_tol = 2e-5  # float32 evaluation of w and 1 - alpha
    errs = {}
    for method, seed in (("iid", 0), ("stratified", 1)):
        t = D.sample_t(jax.random.PRNGKey(seed), B, method)
        p, w = D.noise_level(t, cfg)
        est = np.mean(np.asarray(w, np.float64) * np.asarray(p, np.float64))
        errs[method] = abs(est - analytic)
    assert errs["iid"] <= 5 * std / math.sqrt(B) + float_tol, (errs, std)
    assert errs["stratified"] <= tv / B + float_tol, (errs, tv)
    if schedule != "linear":  # linear: f is constant, both are exact
        assert tv / B + float_tol < 0.1 * 5 * std / math.sqrt(B)


def test_sample_t_ranges_and_stratified_spacing():
    B = 64
    t_iid = np.asarray(D.sample_t(jax.random.PRNGKey(3), B, "iid"))
    assert t_iid.shape == (B,) and t_iid.dtype == np.float32
    assert np.all((t_iid >= 0) & (t_iid < 1))
    assert len(np.unique(t_iid)) == B
    for seed in range(3):
        t = np.asarray(D.sample_t(jax.random.PRNGKey(seed), B, "stratified"))
        assert t.shape == (B,) and t.dtype == np.float32
        assert np.all((t >= 0) & (t < 1))
        s = np.sort(t.astype(np.float64))
        gaps = np.append(np.diff(s), s[0] + 1.0 - s[-1])  # including the wrap-around gap
        np.testing.assert_allclose(gaps, 1.0 / B, atol=1e-6)
    with pytest.raises(ValueError, match="bogus"):
        D.sample_t(jax.random.PRNGKey(0), B, "bogus")


# ------------------------------------------------------------------ forward process


def test_forward_mask_statistics():
    rng = np.random.default_rng(0)
    B, L = 6, 20000
    p = np.array([0.0, 0.01, 0.25, 0.5, 0.9, 1.0], np.float32)
    tokens = rng.integers(0, MASK_ID, (B, L)).astype(np.int32)
    maskable = rng.random((B, L)) < 0.7
    inputs, is_masked = D.forward_mask(
        jax.random.PRNGKey(0), jnp.asarray(tokens), jnp.asarray(p), jnp.asarray(maskable), MASK_ID
    )
    inputs, is_masked = np.asarray(inputs), np.asarray(is_masked)
    assert inputs.dtype == np.int32 and is_masked.dtype == np.bool_
    assert not np.any(is_masked & ~maskable)
    np.testing.assert_array_equal(inputs, np.where(is_masked, MASK_ID, tokens))
    np.testing.assert_array_equal(inputs == MASK_ID, is_masked)  # tokens never equal MASK_ID
    n = maskable.sum(1)
    rate = (is_masked & maskable).sum(1) / n
    tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(rate - p) <= tol), (rate, p, tol)


def test_llada_linear_case():
    cfg = cfg_of("linear")
    t = np.array([0.0, 0.1, 0.5, 0.999], np.float32)
    p, w = D.noise_level(jnp.asarray(t), cfg)
    expected_p = (1 - EPS) * t.astype(np.float64) + EPS
    np.testing.assert_allclose(np.asarray(p), expected_p, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w), 1.0 / expected_p, rtol=1e-6)
    # Through noise_batch: weight = 1/p with p in [eps, 1).
    tokens = jnp.zeros((NB_B, NB_L), jnp.int32)
    b = D.noise_batch(jax.random.PRNGKey(0), tokens, cfg)
    p, w = np.asarray(b["p"], np.float64), np.asarray(b["weight"], np.float64)
    assert np.all((p >= EPS * (1 - 1e-6)) & (p < 1))
    np.testing.assert_allclose(w * p, 1.0, rtol=1e-6)


def test_noise_batch_shapes_determinism_and_jit():
    cfg = cfg_of("cosine", t_sampling="stratified", random_length_prob=0.5, cfg_prompt_dropout=0.5)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, MASK_ID, (NB_B, NB_L)), jnp.int32)
    prompt = jnp.asarray(np.arange(NB_L)[None, :] < rng.integers(0, 6, (NB_B, 1)))
    f = jax.jit(D.noise_batch, static_argnames=("cfg",))
    b1 = f(jax.random.PRNGKey(5), tokens, cfg, prompt_mask=prompt)
    b2 = D.noise_batch(jax.random.PRNGKey(5), tokens, cfg, prompt_mask=prompt)
    b3 = f(jax.random.PRNGKey(6), tokens, cfg, prompt_mask=prompt)
    assert set(b1) == {"inputs", "targets", "is_masked", "weight", "p", "valid"}
    shapes = {k: (v.shape, v.dtype) for k, v in b1.items()}
    BL = (NB_B, NB_L)
    assert shapes == {
        "inputs": (BL, jnp.int32),
        "targets": (BL, jnp.int32),
        "is_masked": (BL, jnp.bool_),
        "weight": ((NB_B,), jnp.float32),
        "p": ((NB_B,), jnp.float32),
        "valid": (BL, jnp.bool_),
    }
    for k in b1:
        np.testing.assert_allclose(np.asarray(b1[k]), np.asarray(b2[k]), rtol=1e-6)
    assert not np.array_equal(np.asarray(b1["p"]), np.asarray(b3["p"]))
    np.testing.assert_array_equal(np.asarray(b1["targets"]), np.asarray(tokens))


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_prompt_never_masked_and_cfg_dropout(dropout):
    B, L, V = NB_B, NB_L, 8
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, V, (B, L)).astype(np.int32)  # targets must index the vocabulary
    plen = rng.integers(1, 8, B)
    prompt = np.arange(L)[None, :] < plen[:, None]
    cfg = cfg_of("linear", cfg_prompt_dropout=dropout)
    b = D.noise_batch(
        jax.random.PRNGKey(7), jnp.asarray(tokens), cfg, prompt_mask=jnp.asarray(prompt)
    )
    inputs, is_masked = np.asarray(b["inputs"]), np.asarray(b["is_masked"])
    assert not np.any(is_masked & prompt)
    assert np.any(is_masked)  # responses do get masked
    if dropout == 1.0:
        assert np.all(inputs[prompt] == MASK_ID)
    else:
        np.testing.assert_array_equal(inputs[prompt], tokens[prompt])
    np.testing.assert_array_equal(inputs[~prompt], np.where(is_masked, MASK_ID, tokens)[~prompt])
    # The prompt stays out of the loss: changing the logits at prompt positions changes nothing.
    logits = rng.normal(size=(B, L, V)).astype(np.float32)
    logits2 = logits.copy()
    logits2[prompt] += 10 * rng.normal(size=logits2[prompt].shape).astype(np.float32)
    response = ~prompt
    l1, _ = D.sft_loss(jnp.asarray(logits), b, jnp.asarray(response))
    l2, _ = D.sft_loss(jnp.asarray(logits2), b, jnp.asarray(response))
    assert np.isfinite(float(l1)) and float(l1) > 0
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    l1, _ = D.pretrain_loss(jnp.asarray(logits), b)
    l2, _ = D.pretrain_loss(jnp.asarray(logits2), b)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)


def test_random_length():
    B, L = NB_B, NB_L
    tokens = jnp.ones((B, L), jnp.int32)
    lengths = set()
    cfg1 = cfg_of("linear", random_length_prob=1.0)
    for seed in range(64):  # 64 draws: length = 0 or length > L would show up with high probability
        b = D.noise_batch(jax.random.PRNGKey(seed), tokens, cfg1)
        valid, is_masked = np.asarray(b["valid"]), np.asarray(b["is_masked"])
        length = int(valid[0].sum())
        assert 1 <= length <= L
        np.testing.assert_array_equal(valid, np.broadcast_to(np.arange(L) < length, (B, L)))
        assert not np.any(is_masked & ~valid)
        lengths.add(length)
    assert len(lengths) >= 8  # length varies across keys (U{1..16} gives ~14 distinct in 64 draws)
    # A caller-provided valid mask is intersected with the cut.
    user_valid = np.arange(L)[None, :] < np.array([[16], [3], [10], [1], [16], [5], [0], [12]])
    b = D.noise_batch(jax.random.PRNGKey(0), tokens, cfg1, valid=jnp.asarray(user_valid))
    length = int(np.asarray(b["valid"])[0].sum())
    np.testing.assert_array_equal(np.asarray(b["valid"]), user_valid & (np.arange(L) < length))
    cfg0 = cfg_of("linear", random_length_prob=0.0)
    for seed in range(3):
        assert np.all(np.asarray(D.noise_batch(jax.random.PRNGKey(seed), tokens, cfg0)["valid"]))


# ------------------------------------------------------------------ losses


LB, LL, LV = 2, 6, 8  # one logits shape for the hand-built loss tests (fewer compiles)


def _hand_logits():
    """Deterministic small-integer-ish logits (LB, LL, LV), values in {-2.5, ..., 2.5}."""
    return (((np.arange(LB * LL * LV).reshape(LB, LL, LV) * 7) % 11) - 5).astype(np.float32) / 2


def test_cross_entropy_float32_and_bf16():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(LB, LL, LV)).astype(np.float32) * 3
    targets = rng.integers(0, LV, (LB, LL))
    ce = D.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ce), np_ce(logits, targets), rtol=1e-5, atol=1e-6)
    lb = jnp.asarray(logits, jnp.bfloat16)
    ce_b = D.cross_entropy(lb, jnp.asarray(targets))
    assert ce_b.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(ce_b), np_ce(np.asarray(lb, np.float32), targets), rtol=1e-5, atol=1e-5
    )


def test_pretrain_loss_hand_built():
    logits = _hand_logits()
    targets = np.array([[0, 2, 1, 7, 3, 5], [3, 2, 0, 6, 6, 1]], np.int32)
    is_masked = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], bool)
    weight = np.array([2.0, 4.0], np.float32)
    batch = {
        "targets": jnp.asarray(targets),
        "is_masked": jnp.asarray(is_masked),
        "weight": jnp.asarray(weight),
        "valid": jnp.ones((LB, LL), bool),
    }
    loss, aux = D.pretrain_loss(jnp.asarray(logits), batch)
    ce = np_ce(logits, targets)
    expected = (ce * weight[:, None] * is_masked).sum() / (LB * LL)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert int(aux["num_masked"]) == 6
    assert float(aux["masked_ce"]) == pytest.approx(ce[is_masked].mean(), rel=1e-5)
    # Hand check of one term, position (0, 0): -log softmax(row)[0].
    row = [float(v) for v in logits[0, 0]]
    assert ce[0, 0] == pytest.approx(-row[0] + math.log(sum(math.exp(v) for v in row)))


def test_pretrain_loss_random_length_batch():
    rng = np.random.default_rng(4)
    length = 4
    logits = rng.normal(size=(LB, LL, LV)).astype(np.float32)
    targets = rng.integers(0, LV, (LB, LL)).astype(np.int32)
    valid = np.broadcast_to(np.arange(LL) < length, (LB, LL))
    # Invalid positions flagged as masked on purpose: they must still be excluded.
    is_masked = np.array([[1, 0, 1, 0, 1, 1], [1, 1, 0, 1, 1, 0]], bool)
    weight = np.array([1.5, 3.0], np.float32)
    batch = {
        "targets": jnp.asarray(targets),
        "is_masked": jnp.asarray(is_masked),
        "weight": jnp.asarray(weight),
        "valid": jnp.asarray(valid),
    }
    loss, aux = D.pretrain_loss(jnp.asarray(logits), batch)
    ce = np_ce(logits, targets)
    m = is_masked & valid
    expected = (ce * weight[:, None] * m).sum() / (LB * length)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert int(aux["num_masked"]) == 5
    assert float(aux["masked_ce"]) == pytest.approx(ce[m].mean(), rel=1e-5)


def test_sft_loss_hand_built():
    rng = np.random.default_rng(5)
    B, L, V, EOS = LB, LL, LV, 7
    logits = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    # seq 0: prompt 2 tokens, answer 2 tokens + 2 EOS padding (answer length 4)
    # seq 1: prompt 3 tokens, answer 2 tokens, last position invalid (answer length 2)
    targets = np.array([[1, 2, 3, 4, EOS, EOS], [5, 6, 1, 2, 3, 0]], np.int32)
    prompt = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
    valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], bool)
    response = ~prompt
    is_masked = np.array([[0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0]], bool)
    weight = np.array([2.0, 5.0], np.float32)
    batch = {
        "targets": jnp.asarray(targets),
        "is_masked": jnp.asarray(is_masked),
        "weight": jnp.asarray(weight),
        "valid": jnp.asarray(valid),
    }
    loss, aux = D.sft_loss(jnp.asarray(logits), batch, jnp.asarray(response))
    ce = np_ce(logits, targets)
    seq0 = 2.0 * (ce[0, 2] + ce[0, 4] + ce[0, 5]) / 4
    seq1 = 5.0 * ce[1, 3] / 2
    assert float(loss) == pytest.approx((seq0 + seq1) / 2, rel=1e-5)
    assert int(aux["num_masked"]) == 4
    assert float(aux["masked_ce"]) == pytest.approx(
        (ce[0, 2] + ce[0, 4] + ce[0, 5] + ce[1, 3]) / 4, rel=1e-5
    )
    # Zero-length answer: guarded, contributes 0 to the mean.
    batch0 = dict(batch, valid=jnp.asarray(np.array([valid[0], prompt[1]])))
    loss0, _ = D.sft_loss(jnp.asarray(logits), batch0, jnp.asarray(response))
    assert np.isfinite(float(loss0))
    assert float(loss0) == pytest.approx(seq0 / 2, rel=1e-5)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "field,value",
    [
        ("schedule", "bogus_sched"),
        ("t_sampling", "sobol_x"),
        ("power", -1.5),
        ("power", 0.0),
        ("eps", 0.0),
        ("eps", 1.25),
        ("random_length_prob", 1.5),
        ("cfg_prompt_dropout", -0.25),
        ("mask_id", -7),
        ("mask_id", 3.5),
    ],
)
def test_invalid_config_raises(field, value):
    kwargs = {"mask_id": MASK_ID, field: value}
    with pytest.raises(ValueError) as e:
        D.DiffusionConfig(**kwargs)
    # Named as the user types the config key (the mask id comes from the tokenizer).
    key = "mask id" if field == "mask_id" else f"diffusion.{field}={value!r}"
    assert key in str(e.value) and repr(value) in str(e.value)


def test_built_from_its_config_section_by_name():
    c = ml_collections.ConfigDict(
        {
            "schedule": "polynomial",
            "power": 3.0,
            "eps": 1e-2,
            "t_sampling": "stratified",
            "random_length_prob": 0.0,
            "cfg_prompt_dropout": 0.1,
        }
    )
    cfg = sections.from_section(D.DiffusionConfig, c, mask_id=126336)
    assert cfg == D.DiffusionConfig(
        mask_id=126336,
        schedule="polynomial",
        power=3.0,
        eps=1e-2,
        t_sampling="stratified",
        random_length_prob=0.0,
        cfg_prompt_dropout=0.1,
    )
    default = D.DiffusionConfig(mask_id=5)
    assert (
        default.schedule,
        default.power,
        default.eps,
        default.t_sampling,
        default.random_length_prob,
        default.cfg_prompt_dropout,
    ) == ("linear", 2.0, 1e-3, "iid", 0.01, 0.0)
    with pytest.raises(ValueError, match="'nope'"):
        sections.from_section(D.DiffusionConfig, {"schedule": "nope"}, mask_id=1)

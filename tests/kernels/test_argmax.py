"""The sampler's argmax (max reductions over chunks of the vocabulary) against numpy's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.kernels.argmax import argmax


@pytest.mark.parametrize("vocab", [1, 32, 128, 4096, 4100, 126464])
def test_first_index_of_the_maximum_like_numpy(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.normal(size=(3, 5, vocab)).astype(np.float32)
    ties = rng.integers(0, 4, size=(2, 7, vocab)).astype(np.float32)  # many equal maxima
    for a in (x, ties):
        got = np.asarray(jax.jit(argmax)(jnp.asarray(a)))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, a.argmax(-1))


def test_infinities_nans_and_float64():
    x = np.full((6, 300), -np.inf, np.float32)
    x[1, 7] = x[1, 290] = np.inf  # ties at +inf: the first
    x[2, 299] = -1e30  # the last column of a padded chunk
    x[3, 150:] = 0.0
    x[4, 200], x[4, 10] = np.nan, 5.0  # NaN counts as the maximum, as in numpy
    x[5, [3, 131, 260]] = np.nan
    got = np.asarray(argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, [0, 7, 299, 150, 200, 3])
    np.testing.assert_array_equal(got, x.argmax(-1))
    with jax.enable_x64(True):
        y = np.random.default_rng(0).normal(size=(6, 1000))
        y[:, 10] = y[:, 900] = 50.0
        got = argmax(jnp.asarray(y))
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.full(6, 10))

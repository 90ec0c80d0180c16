"""kernels/autotune.py: the version that ran fastest on the call's shapes runs, and the choice
is remembered per shape, in the process and on disk."""

import json
import time

import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.kernels import autotune


class Version:
    """A stand-in for a jitted function: sleeps `seconds` per element of its argument's first
    axis, counts its compilations and calls, returns its name."""

    mesh = "mesh"

    def __init__(self, name, seconds_per_row):
        self.name, self.seconds_per_row = name, seconds_per_row
        self.compiled = self.calls = 0

    def __call__(self, x):
        self.calls += 1
        time.sleep(self.seconds_per_row * x.shape[0])
        return self.name

    def lower(self, x):
        outer = self

        class Lowered:
            def compile(self):
                outer.compiled += 1
                return outer

        return Lowered()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "llada_jax" / autotune.CACHE_FILE


def test_the_fastest_version_runs_and_is_remembered_per_shape(cache):
    slow, fast = Version("slow", 0.004), Version("fast", 0.001)
    fn = autotune.Fastest("f", {"slow": slow, "fast": fast})
    assert fn(jnp.zeros((3, 2))) == "fast"
    assert (slow.compiled, fast.compiled) == (1, 1)
    assert slow.calls == 1 + autotune.ROUNDS
    fn(jnp.zeros((3, 2)))  # the same shapes: no more timing
    assert slow.calls == 1 + autotune.ROUNDS and slow.compiled == 1
    fn(jnp.zeros((4, 2)))  # new shapes are timed again
    assert slow.compiled == 2
    assert cache.exists() and len(json.loads(cache.read_text())) == 2

    # A new process (a new Fastest) takes the remembered choice without timing.
    again_slow, again_fast = Version("slow", 0.004), Version("fast", 0.001)
    again = autotune.Fastest("f", {"slow": again_slow, "fast": again_fast})
    assert again(jnp.zeros((3, 2))) == "fast"
    assert again_slow.calls == again_slow.compiled == 0


def test_a_faster_version_wins_whatever_its_name_or_order(cache):
    for seconds in ((0.001, 0.004), (0.004, 0.001)):
        a, b = Version("a", seconds[0]), Version("b", seconds[1])
        fn = autotune.Fastest(f"g{seconds}", {"a": a, "b": b})
        want = "a" if seconds[0] < seconds[1] else "b"
        assert fn(np.zeros((3,))) == want
        assert fn.lower(np.zeros((3,))).compile() is {"a": a, "b": b}[want]


def test_signature_names_shapes_and_dtypes():
    sig = autotune.signature((jnp.zeros((2, 3), jnp.int32), {"w": jnp.ones(4)}, 0.5))
    assert sig == "int32[2, 3],float32[4],float"

"""FLOPs accounting against the matmuls actually traced, and the CPU peak cache."""

import errno
import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import checkpoint, likelihood, metrics, sharding
from llada_jax.kernels import Kernels
from llada_jax.model import ModelConfig, Transformer


def dot_flops(jaxpr) -> float:
    """2 * (output elements) * (contracted size) summed over every dot_general, recursively."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in lhs_contract])
        for name, sub in eqn.params.items():
            subs = sub if isinstance(sub, (list, tuple)) else [sub]
            for s in subs:
                inner = getattr(s, "jaxpr", s)
                if hasattr(inner, "eqns"):
                    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
                    total += times * dot_flops(inner)
    return total


@pytest.mark.parametrize("tied,scan", [(False, True), (True, False)])
def test_flops_match_traced_matmuls(tied, scan):
    cfg = ModelConfig(
        vocab_size=96,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=40,
        tie_embeddings=tied,
        scan_layers=scan,
    )
    b, length = 2, 24
    xla = Kernels("xla", "xla", "cpu")  # counts dot_general equations; MKL's are custom calls
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), kernels=xla), nnx.Param)
    tokens = jnp.zeros((b, length), jnp.int32)
    forward = lambda p: nnx.merge(graphdef, p)(tokens).astype(jnp.float32).sum()
    fwd = dot_flops(jax.make_jaxpr(forward)(params).jaxpr) / (b * length)
    assert fwd == pytest.approx(metrics.forward_flops_per_token(cfg, length), rel=1e-9)
    train = dot_flops(jax.make_jaxpr(jax.grad(forward))(params).jaxpr) / (b * length)
    # Every matmul has two backward matmuls (input and weight gradients): exactly 3x forward.
    assert train == pytest.approx(metrics.train_flops_per_token(cfg, length), rel=1e-9)


@pytest.mark.parametrize("head_positions", [8, 24])
def test_scorer_flops_match_its_traced_matmuls(head_positions):
    """The likelihood scorer (packed rows of two slots; the last layer and the head on
    `head_positions` of the 24 positions, or on all of them) traced: its matmuls are
    `metrics.scorer_flops`."""
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden=40)
    b, length = 2, 24
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    xla = Kernels("xla", "xla", "cpu")
    with sharding.use_mesh(mesh):
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), kernels=xla), nnx.Param)
    scorer = likelihood.make_scorer(
        graphdef, mesh, mask_id=95, num_samples=4, seed=0, num_head_positions=head_positions
    )
    segment = np.repeat([[1] * 10 + [2] * 12 + [0] * 2], b, axis=0).astype(np.int32)
    target = np.zeros((b, length), bool)
    target[:, 6:10] = target[:, 18:22] = True
    slots = np.zeros((b, 2), np.int32)
    with sharding.use_mesh(mesh):  # what the scorer runs under
        jaxpr = scorer.jitted.trace(
            params, np.zeros((b, length), np.int32), target, segment, slots, slots
        ).jaxpr
    assert dot_flops(jaxpr.jaxpr) == pytest.approx(
        metrics.scorer_flops(cfg, b, length, head_positions), rel=1e-9
    )
    if head_positions == length:  # a whole forward pass
        assert metrics.scorer_flops(cfg, b, length, length) == pytest.approx(
            b * length * metrics.forward_flops_per_token(cfg, length), rel=1e-9
        )


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        metrics, "measure_cpu_matmul_peak", lambda dtype: calls.append(dtype) or 1e11
    )
    metrics.cpu_peak_flops.cache_clear()
    assert metrics.cpu_peak_flops("float32") == 1e11
    metrics.cpu_peak_flops.cache_clear()
    assert metrics.cpu_peak_flops("float32") == 1e11
    assert calls == ["float32"]
    (entry,) = json.loads((tmp_path / "llada_jax" / "cpu_peak_flops.json").read_text()).values()
    assert entry == 1e11
    metrics.cpu_peak_flops.cache_clear()


def test_matmul_probe_is_plausible():
    peak = metrics.measure_cpu_matmul_peak("float32", sizes=(256,), repeats=2)
    assert 1e8 < peak < 1e14


def test_format_duration():
    assert [metrics.format_duration(s) for s in (0, 45, 192, 3720)] == [
        "0s",
        "45s",
        "3m12s",
        "1h02m",
    ]


def test_resumed_writer_keeps_earlier_lines_and_drops_a_cut_off_one(tmp_path):
    """A resumed run keeps the lines up to its step; a last line cut short by a kill and the
    lines past the resume step are dropped, and the file is replaced in one step."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": 2.0}\n'
        '{"step": 4, "lo'
    )
    with metrics.MetricsWriter(str(tmp_path), after_step=2) as writer:
        writer.write(3, {"loss": 1.5})
    records = metrics.read_jsonl(str(path))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 2.5 and np.isnan(records[1]["loss"]) and records[2]["loss"] == 1.5
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]


def read_tfrecords(path: str) -> list[bytes]:
    """The records of a TFRecord file (length u64, its CRC u32, data, the data's CRC u32; the
    CRCs are not checked)."""
    with open(path, "rb") as f:
        raw = f.read()
    records, at = [], 0
    while at < len(raw):
        (length,) = struct.unpack("<Q", raw[at : at + 8])
        records.append(raw[at + 12 : at + 12 + length])
        at += 12 + length + 4
    return records


def test_tensorboard_scalars_are_in_the_event_file_when_write_returns(tmp_path):
    """Each write is one event holding the line's numbers, on disk when `write` returns (written
    in the caller's thread, so a failed write raises there)."""
    from tensorboardX.proto import event_pb2

    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.write(10, {"loss": 2.5, "skipped": 0, "mfu": None})
        writer.write(20, {"loss": 1.25, "skipped": 3, "mfu": None})
        (name,) = os.listdir(tmp_path / "tensorboard")
        events = [
            event_pb2.Event.FromString(r) for r in read_tfrecords(tmp_path / "tensorboard" / name)
        ]
    scalars = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
    assert events[0].file_version == "brain.Event:2"
    assert scalars == [(10, {"loss": 2.5, "skipped": 0.0}), (20, {"loss": 1.25, "skipped": 3.0})]


class FullDisk(io.StringIO):
    """A file whose writes and close fail as on a full disk."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_leaving_the_writer_on_an_error_reports_that_error_not_the_close(tmp_path):
    """A run stopped by an error (a failed save) while the metrics file cannot be flushed leaves
    with its own error; a close that fails on a clean exit raises."""
    with pytest.raises(checkpoint.SaveFailed, match="saving checkpoint step 4"):
        with metrics.MetricsWriter(str(tmp_path)) as writer:
            writer._jsonl = FullDisk()
            with pytest.raises(OSError, match="No space left"):
                writer.write(4, {"loss": 1.0})
            raise checkpoint.SaveFailed("saving checkpoint step 4 failed")
    with pytest.raises(OSError, match="No space left"):
        with metrics.MetricsWriter(str(tmp_path)) as writer:
            writer._jsonl = FullDisk()

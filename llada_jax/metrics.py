"""Model FLOPs, accelerator peaks, MFU, and the metric writers (JSONL + TensorBoard).

FLOPs accounting (one function, used by the trainer and the benchmark):
  forward FLOPs per token = 2 * (matmul parameters: q, k, v, o, gate, up, down per layer, plus
  the LM head) + 4 * n_layers * seq_len * n_heads * head_dim (QK^T and PV over the full L x L map:
  attention is bidirectional, so there is no causal halving). Training = 3 x forward (backward
  costs twice the forward). Rematerialization is not counted: MFU measures useful model work.

  A block-diffusion model with blocks of b tokens trains on each row and its clean copy, 2L
  positions: per token of the row the layers' matmuls run twice and the head once, and only
  the attended blocks count: noised block k sees its own b keys and the k b clean keys before
  it, clean block k the (k + 1) b clean keys up to its own, so a row of K = L / b blocks
  attends to sum_k b (b + k b + (k + 1) b) = L^2 + L b (query, key) pairs, L + b per token:
    forward FLOPs per token = 2 * (2 * layer matmul parameters + head)
                              + 4 * n_layers * (L + b) * n_heads * head_dim.

  A likelihood scorer call (`scorer_flops`) runs every layer but the last, and the last
  layer's key and value projections, on all L positions of a row; the last layer's queries,
  output projection and MLP, and the head, on its K head positions alone.
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import files
from llada_jax.host.cache import cache_dir, cpu_name
from llada_jax.kernels import mkl
from llada_jax.model import DTYPES, ModelConfig

# Dense peak FLOP/s per chip, by a substring of jax's `device_kind`. float32 matmuls run at the
# bfloat16 rate on TPU (default precision) and as TF32 on NVIDIA GPUs.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, block_size: int = 0) -> float:
    """Matmul FLOPs of one forward pass, per token, for sequences of `seq_len` (of a
    block-diffusion model's training pass with blocks of `block_size` when > 0: see the module
    docstring)."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.mlp_hidden
    copies = 2 if block_size else 1  # a block model's layers also run on the clean copy
    params = copies * cfg.n_layers * per_layer + d * cfg.vocab_size
    attention = 4 * cfg.n_layers * (seq_len + block_size) * cfg.n_heads * hd
    return 2.0 * params + attention


def scorer_flops(cfg: ModelConfig, rows: int, length: int, head_positions: int) -> float:
    """Matmul FLOPs of one likelihood scorer call (`likelihood.make_scorer`) of a bidirectional
    model on `rows` rows of `length` positions whose last layer's queries, MLP and output head
    run on `head_positions` positions per row: every other layer, and the last layer's keys and
    values, run on every position, each query attending to the whole row. With head_positions
    = length, a forward pass: rows * length * `forward_flops_per_token`."""
    d, hd = cfg.d_model, cfg.head_dim
    queries_out = 2 * d * hd * cfg.n_heads  # the q and output projections
    keys_values = 2 * d * hd * cfg.n_kv_heads
    mlp = 3 * d * cfg.mlp_hidden
    attention = 2 * cfg.n_heads * hd * length  # q.k and weights.v of one query
    layers_but_last = (cfg.n_layers - 1) * (queries_out + mlp + attention)
    every_position = layers_but_last + cfg.n_layers * keys_values
    head_only = queries_out + mlp + attention + d * cfg.vocab_size
    return 2.0 * rows * (length * every_position + head_positions * head_only)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, block_size: int = 0) -> float:
    """Forward + backward matmul FLOPs per token (3 x forward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, block_size)


@jax.jit
def _square(x: jax.Array) -> jax.Array:
    return x @ x


@jax.jit
def _square_mkl(x: jax.Array) -> jax.Array:
    return mkl.matmul(x, x)


def _cpu_matmuls(dtype: str) -> list[Callable[[jax.Array], jax.Array]]:
    """The jitted square matmuls a CPU step can use: XLA's, and MKL's where it is installed."""
    with_mkl = (
        jax.default_backend() == "cpu"
        and jnp.dtype(DTYPES[dtype]) == jnp.float32
        and mkl.available("auto")
    )
    return [_square, _square_mkl] if with_mkl else [_square]


def measure_cpu_matmul_peak(
    dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5
) -> float:
    """Best FLOP/s of a jitted square matmul on the CPU (all cores, one device), the best of
    XLA's and MKL's where kernels.matmul can use MKL: the peak is the fastest matmul available."""
    device = jax.devices("cpu")[0]
    best = 0.0
    for n in sizes:
        a = jax.device_put(jnp.ones((n, n), dtype), device)
        for square in _cpu_matmuls(dtype):
            square(a).block_until_ready()
            for _ in range(repeats):
                t = time.perf_counter()
                square(a).block_until_ready()
                best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def paired_mfu(flops: float, times: list[float], probes: list[float]) -> float:
    """Median over steps of flops / times[i] / max(probes[i], probes[i + 1]): each step's FLOP/s
    against the better of the peak probes taken just before and just after it (FLOP/s)."""
    if len(probes) != len(times) + 1:
        raise ValueError(f"{len(probes)} probes for {len(times)} steps: need one more than steps")
    return float(
        np.median([flops / t / max(probes[i], probes[i + 1]) for i, t in enumerate(times)])
    )


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(dtype: str = "float32") -> float:
    """Measured CPU matmul peak, cached on disk per CPU model, core count and dtype."""
    # "kept": measured with host_memory's malloc settings (earlier entries paid page faults).
    key = f"{cpu_name()}|{os.cpu_count()}|{dtype}|jax{jax.__version__}|kept"
    if len(_cpu_matmuls(dtype)) > 1:
        key += "|mkl"
    path = os.path.join(cache_dir(), "cpu_peak_flops.json")
    cache: dict[str, float] = {}
    if os.path.exists(path):
        with open(path) as f:
            cache = json.load(f)
    if key not in cache:
        cache[key] = measure_cpu_matmul_peak(dtype)
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    return cache[key]


def total_peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of all devices in the job, or None for an accelerator not in the table.

    On CPU the fake device count does not add compute: the host's measured peak is the total.
    """
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return cpu_peak_flops(dtype)
    kind = devices[0].device_kind
    for name, peaks in PEAK_FLOPS.items():
        if name in kind:
            return peaks[dtype] * len(devices)
    return None


def format_duration(seconds: float) -> str:
    """1h02m, 3m12s, 45s."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_log_line(step: int, total: int, m: Mapping[str, float]) -> str:
    """One human-readable progress line from a metrics dict."""
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    return (
        f"step {step}/{total} | loss {m['loss']:.4f} | grad_norm {m['grad_norm']:.3f} "
        f"| lr {m['lr']:.2e} | tok/s {m['tokens_per_sec']:,.0f} "
        f"| masked tok/s {m['masked_tokens_per_sec']:,.0f} | mfu {mfu} "
        f"| eta {format_duration(m['eta_sec'])}"
    )


class MetricsWriter:
    """Adds a line to DIR/metrics.jsonl and TensorBoard events per write; a no-op when disabled.

    A local file is appended to (a kill loses at most the line being written). An object
    (gs://) cannot be appended to: the whole file is uploaded again at every write, one upload
    each, so a kill loses at most the last interval there too, and every reader (`read_jsonl`)
    reads both the same way.
    """

    def __init__(self, workdir: str, enabled: bool = True, after_step: int = 0):
        """`after_step`: the step a run resumes from; lines logged past it by the interrupted
        run are dropped, so the file reads as one uninterrupted run."""
        self.enabled = enabled
        if not enabled:
            return
        self.path = files.join(workdir, "metrics.jsonl")
        keep = read_jsonl(self.path, up_to_step=after_step) if after_step else []
        self._lines = [json.dumps(r) + "\n" for r in keep]
        files.write_atomically(self.path, "".join(self._lines))
        self._jsonl = None if files.is_uri(self.path) else open(self.path, "a", buffering=1)
        self._tb = ScalarEvents(files.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One line {"step": step, **metrics} (values made plain Python), and each numeric value
        as a TensorBoard scalar at `step`."""
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in metrics.items()}
        line = json.dumps({"step": step, **clean}) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
        else:
            self._lines.append(line)
            files.write_atomically(self.path, "".join(self._lines))
        self._tb.write(step, {k: v for k, v in clean.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        """Closes the local jsonl file (if one is open) and the TensorBoard writer."""
        if self.enabled:
            try:
                if self._jsonl is not None:
                    self._jsonl.close()
            finally:
                self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # Leaving on an error (a full disk, a failed save): the error leaving is the one to
        # report, not the close's own failure to flush what that error left unwritten.
        try:
            self.close()
        except OSError:
            if exc_type is None:
                raise


class ScalarEvents:
    """TensorBoard scalars in an event file under `logdir`, written and flushed in the caller's
    thread: a write that fails (a full disk) raises there, as an OSError. (tensorboardX's
    SummaryWriter writes from a thread of its own, which prints a traceback and dies on such an
    error, and then blocks the next writes once its queue is full.)"""

    def __init__(self, logdir: str, filename_suffix: str = ""):
        from tensorboardX import event_file_writer  # imported here: only process 0 writes

        files.makedirs(logdir)
        self._events = event_file_writer.EventsWriter(files.join(logdir, "events"), filename_suffix)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """One event holding each of `scalars` at `step`, flushed to the file."""
        from tensorboardX.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        event = event_pb2.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
        )
        self._events.write_event(event)
        self._events.flush()

    def close(self) -> None:
        """Closes the event file."""
        self._events.close()


def read_jsonl(path: str, up_to_step: int | None = None) -> list[dict]:
    """The records of a metrics file (those with step <= up_to_step, if given). A last line cut
    short by a kill (not JSON) is dropped; blank lines are skipped. Raises ValueError when
    another line is not a JSON object with an integer "step" (one line naming the file, the line
    and what is wrong).
    """
    if not files.exists(path):
        return []
    lines = io.BytesIO(files.read_bytes(path)).readlines()  # split at b"\n" only
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = _decode(raw)
        except ValueError as e:
            if number == len(lines):
                break  # the line a killed writer left unfinished
            raise _bad_line(path, number, str(e)) from None
        problem = _record_problem(record)
        if problem:
            raise _bad_line(path, number, problem)
        if up_to_step is None or record["step"] <= up_to_step:
            records.append(record)
    return records


def _decode(raw: bytes) -> Any:
    """A line's JSON value; ValueError saying whether its UTF-8 or its JSON is wrong."""
    try:
        return json.loads(raw.decode("utf-8").strip())
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}, column {e.colno})") from None


def _record_problem(record: Any) -> str | None:
    """What a decoded metrics line has wrong (None: nothing)."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    if "step" not in record:
        return 'no "step"'
    step = record["step"]
    if isinstance(step, bool) or not isinstance(step, int):
        return f'"step" is {step!r}, not an integer'
    return None


def _bad_line(path: str, number: int, problem: str) -> ValueError:
    """The one-line error for a bad line of a metrics file, saying what a valid one is."""
    return ValueError(
        f'{path} line {number}: {problem}; valid: one JSON object with a "step" per line; '
        "fix or remove that line"
    )


def _to_python(v: Any) -> Any:
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(v).item()
    return v

"""Hugging Face checkpoint directories <-> workdirs that train, sample and evaluate start from.

`import_hf(hf_dir, workdir)`: an HF LLaDA (LLaDAModelLM), LlamaForCausalLM, Qwen2ForCausalLM or
Qwen3ForCausalLM checkpoint
(config.json + model.safetensors, or shards + model.safetensors.index.json; float32 or bfloat16)
-> workdir/config.json (base_config() with the model section from the HF config) and a
params-only Orbax checkpoint workdir/checkpoints/0 whose meta holds that config and the HF one.

`export_hf(workdir, hf_dir)`: a workdir's checkpoint -> the HF LLaDA layout (config.json that the
HF LLaDA code reads, model.safetensors or shards + index), in float32 or bfloat16 (a model with
per-head query/key norms, which that layout cannot hold, goes to the Qwen3 layout), with the
run's tokenizer as Hugging Face files (convert/hf_tokenizer.py) and the modeling code: the
checkpoint's own (an import keeps the HF directory's .py files in workdir/hf_code/) or an
auto_map naming the public LLaDA repository's.

Memory stays bounded by one parameter: import reads one HF tensor at a time into memory-mapped
arrays in the output's temporary directory (layers filled one by one, never a copy of the state
dict), which Orbax writes to the checkpoint one array at a time without copying; export restores
one parameter at a time as numpy and writes each HF tensor at its offset in the shard files.
(Peak anonymous memory is about one of our parameters, e.g. the stacked [n_layers, ...] MLP
matrix, when freed buffers go back to the OS: see tools/convert_hf.py.) Outputs are written to a
temporary directory next to the destination and renamed when complete.

A workdir may be on an object store (`gs://...`, through llada_jax/files.py): import builds it the
same way in a local temporary directory (under $TMPDIR: room for about twice the model) and then
uploads it (`_upload_workdir`), the step's commit file last, so that a kill mid-upload never
leaves a step that looks complete. While it uploads, the workdir holds IMPORT_MARKER; a rerun
that finds the marker removes the partial upload and starts again, and any other non-empty
target is refused, as locally. Export reads a gs:// workdir; the HF directory it writes is local.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import type_handlers as _th

from llada_jax import checkpoint, files, sections
from llada_jax import config as config_lib
from llada_jax.convert import hf_llada, hf_llama, hf_tokenizer, layouts
from llada_jax.convert.safetensors_io import (
    DTYPES,
    ConvertError,
    TensorReader,
    parse_size,
    write_sharded,
)
from llada_jax.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from llada_jax.model import ModelConfig
from llada_jax.special_ids import SpecialIds

SOURCES = ("llada", "llama", "qwen2", "qwen3")
# Import writes parameters in chunks of at most this size: tensorstore's buffers for an array
# then stay near the array's own size (they reach ~2x with Orbax's default 2 GiB chunks).
WRITE_CHUNK_BYTES = 16 << 20
# An import to an object store: the object that marks its upload unfinished, and how many files
# go up at once (each holds at most gcsfs's 50 MiB upload chunk in memory).
IMPORT_MARKER = ".convert_hf-incomplete"
UPLOAD_THREADS = 4


def read_hf_config(hf_dir: str) -> dict:
    """The parsed config.json of a local HF checkpoint directory; ConvertError (one line) if the
    directory is a URI, is missing, or lacks a valid config.json."""
    if files.is_uri(hf_dir):
        raise ConvertError(
            f"--hf_dir={hf_dir!r}: the HF checkpoint directory must be local (copy it here first)"
        )
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"--hf_dir={hf_dir!r} does not exist or is not a directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConvertError(
            f"{path!r} does not exist (an HF checkpoint directory holds config.json)"
        )
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path!r} is not valid JSON: {e}") from None


def detect_source(hf: dict) -> str:
    """One of SOURCES from config.json's model_type / architectures."""
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type == "llada" or "LLaDAModelLM" in archs:
        return "llada"
    for source, arch in hf_llama.ARCHITECTURES.items():
        if model_type == source or arch in archs:
            return source
    raise ConvertError(
        f"unknown architecture (model_type={model_type!r}, architectures={archs}); "
        f"supported: LLaDA (model_type 'llada'), LlamaForCausalLM ('llama'), "
        f"Qwen2ForCausalLM ('qwen2') and Qwen3ForCausalLM ('qwen3')"
    )


def model_config(hf: dict, source: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of an HF config.json dict of `source` (one of SOURCES, from
    `detect_source`), with `overrides` applied."""
    if source == "llada":
        return hf_llada.model_config_from_hf(hf, **overrides)
    return hf_llama.model_config_from_llama(hf, source, **overrides)


def run_config(cfg: ModelConfig, ids: SpecialIds) -> config_lib.ConfigDict:
    """base_config() with this model section (head_dim 0 when it is the default d_model //
    heads) and these special ids."""
    c = config_lib.base_config()
    model = {f: getattr(cfg, f) for f in c.model.keys()}
    if cfg.head_dim == cfg.d_model // cfg.n_heads:
        model["head_dim"] = 0
    c.model.update(model)
    c.tokens.update(dataclasses.asdict(ids))
    return c


# --------------------------------------------------------------------------------------------
# Import: HF directory -> workdir
# --------------------------------------------------------------------------------------------
TOKENIZER_DIR = "tokenizer"  # DIR/tokenizer/: the HF directory's tokenizer files, copied
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
# DIR/hf_code/: the HF directory's Python files (its remote code: configuration_llada.py,
# modeling_llada.py), copied so that an export of this model or of one trained from it has them.
CODE_DIR = "hf_code"


def _use_tokenizer(run_cfg: config_lib.ConfigDict, source: str, final_path: str) -> None:
    """Points the run config at the copied tokenizer (`final_path`) and names its end-of-turn
    id (and the mask and EOS ids config.json does not give) in the tokens section."""
    try:
        tok = HFTokenizer(source)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    m = run_cfg.model
    if tok.vocab_size > m.vocab_size:
        raise ConvertError(
            f"the tokenizer {source!r} has {tok.vocab_size} tokens, more than the model's "
            f"vocabulary ({m.vocab_size})"
        )
    run_cfg.data.tokenizer = final_path
    ids = run_cfg.tokens
    ids.mask_id = ids.mask_id if ids.mask_id >= 0 else tok.mask_id
    ids.eos_id = ids.eos_id if ids.eos_id >= 0 else tok.eos_id
    ids.eot_id = tok.eot_id


@contextlib.contextmanager
def _output_dir(dest: str, flag: str) -> Iterator[str]:
    """A temporary directory renamed to `dest` on success and removed on failure."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise ConvertError(f"{flag}={dest!r}: parent directory {parent!r} does not exist")
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ConvertError(f"{flag}={dest!r} already exists and is not empty")
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve(path: str) -> str:
    """files.resolve, its one-line error (a gs:// path without the gcs extra) a ConvertError."""
    try:
        return files.resolve(path)
    except ValueError as e:
        raise ConvertError(str(e)) from None


@contextlib.contextmanager
def _workdir_output(workdir: str) -> Iterator[str]:
    """The local directory import_hf builds the workdir in: `_output_dir` for a local workdir;
    for a URI a local temporary directory, uploaded to the workdir when the block succeeds. The
    URI must be empty or hold only an interrupted import's upload (removed first); whatever
    this import uploaded is removed if it fails."""
    if not files.is_uri(workdir):
        with _output_dir(workdir, "--workdir") as tmp:
            yield tmp
        return
    dest = _resolve(workdir)
    _claim_remote_workdir(dest)
    tmp = tempfile.mkdtemp(prefix="llada-import-")
    try:
        yield tmp
        _upload_workdir(tmp, dest)
    except BaseException:
        with contextlib.suppress(Exception):
            _remove_upload(dest)
            files.remove(files.join(dest, IMPORT_MARKER))
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _claim_remote_workdir(dest: str) -> None:
    """Refuses a non-empty `dest` unless it holds IMPORT_MARKER (an interrupted import: removed),
    then writes the marker (which also fails early on a missing bucket or no permission)."""
    a_file = files.isfile(dest)
    names = [] if a_file else files.listdir(dest)
    if a_file or (names and IMPORT_MARKER not in names):
        raise ConvertError(f"--workdir={dest!r} already exists and is not empty")
    marker = files.join(dest, IMPORT_MARKER)
    try:
        if names:
            print(f"removing the partial upload of an interrupted import at {dest}", flush=True)
            _remove_upload(dest)
        started = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        files.write_atomically(marker, json.dumps(started))
    except Exception as e:  # noqa: BLE001 - the store's own errors (no bucket, no permission)
        raise ConvertError(f"cannot write {marker}: {checkpoint.first_line(e)}") from None


def _remove_upload(dest: str) -> None:
    """Removes what an import uploaded to `dest` but IMPORT_MARKER (so that a kill meanwhile
    leaves it for the next try to find), the step's commit file first."""
    commit = files.join(checkpoint.checkpoint_dir(dest), "0", checkpoint.COMMIT_FILE)
    if files.exists(commit):
        files.remove(commit)
    for name in files.listdir(dest):
        path = files.join(dest, name)
        if name == IMPORT_MARKER:
            continue
        if files.isdir(path):
            files.rmtree(path)
        else:
            files.remove(path)


def _upload_workdir(local: str, dest: str) -> None:
    """Uploads the workdir built in `local` to `dest`: every file but the step's commit file
    (UPLOAD_THREADS at a time), then the commit file, so that checkpoints/0 counts as complete
    only once all of it is there; then removes IMPORT_MARKER."""
    commit = os.path.join(local, "checkpoints", "0", checkpoint.COMMIT_FILE)
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(local) for n in names)
    if commit not in paths:
        raise ConvertError(f"the checkpoint built in {local!r} has no {checkpoint.COMMIT_FILE}")

    def put(path: str) -> None:
        """Uploads the local file `path` to its place under `dest`; ConvertError if the store
        fails."""
        target = files.join(dest, *os.path.relpath(path, local).split(os.sep))
        try:
            files.upload(path, target)
        except Exception as e:  # noqa: BLE001 - the store's own errors
            raise ConvertError(f"cannot write {target}: {checkpoint.first_line(e)}") from None

    pool = ThreadPoolExecutor(UPLOAD_THREADS)
    try:
        for _ in pool.map(put, [p for p in paths if p != commit]):
            pass
    finally:
        pool.shutdown(cancel_futures=True)
    put(commit)
    files.remove(files.join(dest, IMPORT_MARKER))


class _OneArrayAtATime(_th.NumpyHandler):
    """Orbax's numpy handler, writing one array at a time and without a copy first.

    Orbax starts every array's write at once and tensorstore holds an array's encoded chunks
    until its write commits, so the stock handler's memory grows to the whole model; it also
    deep-copies numpy leaves, which our read-only memory-mapped leaves do not need.
    """

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)
        self._lock: asyncio.Lock | None = None

    async def _open_and_write(self, value: np.ndarray, tspec: dict, ts_context: Any) -> None:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            await super()._open_and_write(value, tspec, ts_context)


@contextlib.contextmanager
def _numpy_leaves_one_at_a_time() -> Iterator[None]:
    """Registers _OneArrayAtATime for numpy leaves while the block runs."""
    previous = ocp.type_handlers.get_type_handler(np.ndarray)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "overriding np.ndarray" warnings
    try:
        ocp.type_handlers.register_type_handler(np.ndarray, _OneArrayAtATime(), override=True)
        yield
    finally:
        ocp.type_handlers.register_type_handler(np.ndarray, previous, override=True)
        absl_logger.setLevel(level)


def check_tensors(reader: TensorReader, cfg: ModelConfig, source: str) -> None:
    """Every expected tensor present with its shape; nothing unexpected left over."""
    expected = {e.hf_key(i): e.hf_shape for e, i in layouts.hf_tensor_list(cfg, source)}
    missing = [k for k in expected if k not in reader]
    if missing:
        raise ConvertError(
            f"{len(missing)} tensor(s) missing from {reader.directory!r}, e.g. "
            f"{', '.join(missing[:4])}"
        )
    for key, shape in expected.items():
        if reader.shape(key) != shape:
            raise ConvertError(
                f"tensor {key!r} has shape {reader.shape(key)}, expected {shape} from config.json"
            )
    extra = [
        k
        for k in reader.keys()
        if k not in expected
        and not k.endswith(layouts.IGNORED_SUFFIXES)
        and not (cfg.tie_embeddings and k == layouts.KEYS[source]["lm_head"])
    ]
    if extra:
        raise ConvertError(
            f"{len(extra)} unexpected tensor(s) in {reader.directory!r} for this "
            f"config, e.g. {', '.join(extra[:4])}"
        )


def import_hf(hf_dir: str, workdir: str, source: str = "auto", dtype: str = "float32") -> dict:
    """HF checkpoint -> workdir (config.json + checkpoints/0). Returns the run config as a dict.

    dtype: the parameters' dtype in the checkpoint (model.param_dtype), float32 or bfloat16.
    """
    hf = read_hf_config(hf_dir)
    if source == "auto":
        source = detect_source(hf)
    if source not in SOURCES:
        raise ConvertError(f"--source={source!r} is not one of auto, {', '.join(SOURCES)}")
    if dtype not in ("float32", "bfloat16"):
        raise ConvertError(f"--dtype={dtype!r} is not float32 or bfloat16")
    try:
        cfg = model_config(hf, source, param_dtype=dtype, causal=False, scan_layers=True)
    except ConvertError:
        raise
    except (ValueError, TypeError) as e:
        raise ConvertError(f"config.json of {hf_dir!r}: {e}") from None
    reader = TensorReader(hf_dir)
    check_tensors(reader, cfg, source)
    tokenizer_files = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    ids = hf_llada.special_ids_from_hf(hf)
    run_cfg = run_config(cfg, ids)
    # The context the model was trained for: how long sampling canvases and evaluation windows
    # may be (tools/sample.py, lm-eval's max_length).
    context = hf.get("max_sequence_length") or hf.get("max_position_embeddings")
    if isinstance(context, int) and context > 0:
        run_cfg.data.seq_len = context
    if "tokenizer.json" in tokenizer_files:
        tokenizer_path = files.join(_resolve(workdir), TOKENIZER_DIR, "tokenizer.json")
        _use_tokenizer(run_cfg, os.path.join(hf_dir, "tokenizer.json"), tokenizer_path)
    out_dtype = DTYPES[dtype]
    with _workdir_output(workdir) as tmp:
        if tokenizer_files:
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        for name in tokenizer_files:
            shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, TOKENIZER_DIR, name))
        code_files = _code_files(hf_dir)
        if code_files:
            os.makedirs(os.path.join(tmp, CODE_DIR))
        for name in code_files:
            shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, CODE_DIR, name))
        mm_dir = os.path.join(tmp, "tmp-arrays")
        os.makedirs(mm_dir)
        params: dict = {}
        for n, e in enumerate(layouts.entries(cfg, source)):
            shape = (cfg.n_layers, *e.shape) if e.per_layer else e.shape
            path = os.path.join(mm_dir, f"{n}.npy")
            out = np.lib.format.open_memmap(path, mode="w+", dtype=out_dtype, shape=shape)
            if e.per_layer:
                for i in range(cfg.n_layers):  # one HF tensor in memory at a time
                    out[i] = e.to_ours(reader.get(e.hf_key(i)))
            else:
                out[...] = e.to_ours(reader.get(e.hf_key()))
            out.flush()
            del out
            layouts.set_path(
                params, e.path, {"value": np.load(path, mmap_mode="r").view(out_dtype)}
            )
        reader.close()
        meta = {"config": run_cfg.to_dict(), "step": 0, "hf_config": hf, "hf_source": source}
        with _numpy_leaves_one_at_a_time():
            ckpt = checkpoint.Checkpointer(tmp, async_save=False, writer=True)
            ckpt.save(0, params, None, meta, chunk_bytes=WRITE_CHUNK_BYTES)
            ckpt.close()
        del params
        shutil.rmtree(mm_dir)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(run_cfg.to_json_best_effort(indent=2))
    return run_cfg.to_dict()


# --------------------------------------------------------------------------------------------
# Export: workdir -> HF directory
# --------------------------------------------------------------------------------------------
def _params_dir(workdir: str, step: int) -> str:
    return files.join(checkpoint.checkpoint_dir(workdir), str(step), "params")


def _saved_paths(params_dir: str) -> dict[tuple, tuple]:
    """Our parameter path -> the saved key path (with the trailing 'value' of nnx.Param leaves)."""
    tree = json.loads(files.read_text(files.join(params_dir, "_METADATA")))["tree_metadata"]
    out = {}
    for entry in tree.values():
        keys = tuple(k["key"] for k in entry["key_metadata"])
        out[keys[:-1] if keys[-1] == "value" else keys] = keys
    return out


def _restore_numpy(params_dir: str, saved_path: tuple, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """One saved parameter as a numpy array (nothing else of the checkpoint is read)."""
    item: dict = {}
    args: dict = {}
    layouts.set_path(item, saved_path, np.empty(0, dtype))  # placeholder leaf; only its type counts
    layouts.set_path(args, saved_path, ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype))
    out = ocp.PyTreeCheckpointer().restore(
        files.as_epath(params_dir),
        args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
    )
    array = layouts.get_path(out, saved_path)
    if tuple(array.shape) != tuple(shape):
        raise ConvertError(
            f"checkpoint parameter {'.'.join(map(str, saved_path))} has shape "
            f"{array.shape}, expected {shape} from its config"
        )
    return array


def _hf_origin(workdir: str, meta: dict, layout: str, depth: int = 0) -> tuple[str, dict] | None:
    """(the workdir imported from an HF checkpoint of `layout`, that checkpoint's config.json)
    for the checkpoint this workdir descends from: its own import, or train.init_from's; None if
    none."""
    if meta.get("hf_config") is not None:
        if meta.get("hf_source") != layout:
            return None
        return workdir, meta["hf_config"]
    init_from = meta.get("config", {}).get("train", {}).get("init_from")
    if not init_from or depth > 8 or not files.isdir(checkpoint.checkpoint_dir(init_from)):
        return None
    source = checkpoint.Checkpointer(init_from)
    step = source.latest_step()
    found = None
    if step is not None:
        found = _hf_origin(init_from, source.meta(step), layout, depth + 1)
    source.close()
    return found


def _run_tokenizer(run_cfg: dict) -> Tokenizer | None:
    """The run's tokenizer with the special ids of its tokens section; None (with a warning) if
    it cannot be loaded."""
    path = run_cfg.get("data", {}).get("tokenizer", "")
    try:
        tokens = config_lib.upgrade(run_cfg).get("tokens", {})
        return load_tokenizer(path).with_special_ids(sections.from_section(SpecialIds, tokens))
    except Exception as e:  # noqa: BLE001 - a moved or unreadable tokenizer: export the weights
        print(f"warning: no tokenizer written: data.tokenizer={path!r}: {e}", flush=True)
        return None


def _code_files(directory: str) -> list[str]:
    """The Python files (an HF checkpoint's remote code) directly in `directory` (a URI too)."""
    if not directory or not files.isdir(directory):
        return []
    return sorted(n for n in files.listdir(directory) if n.endswith(".py"))


def _write_code(out: str, hf_cfg: dict, code_dirs: list[str]) -> list[str]:
    """Copies the modeling code of the first of `code_dirs` that holds any into `out` and
    points hf_cfg's auto_map at it (the checkpoint's own auto_map when it names local modules).
    With no code, an auto_map naming another repository's code is kept, else it names the
    public LLaDA repository's (`hf_llada.remote_auto_map`): transformers downloads that on first
    load. Returns the names copied."""
    auto_map = hf_cfg.get("auto_map") or {}
    remote = bool(auto_map) and all("--" in str(v) for v in auto_map.values())
    for directory in code_dirs:
        names = _code_files(directory)
        if names:
            for name in names:
                with open(os.path.join(out, name), "wb") as f:
                    f.write(files.read_bytes(files.join(directory, name)))
            if remote or not auto_map:
                hf_cfg["auto_map"] = dict(hf_llada.AUTO_MAP)
            return names
    if not remote:
        hf_cfg["auto_map"] = hf_llada.remote_auto_map()
    return []


def _open_for_export(workdir: str, step: int | None) -> tuple[checkpoint.Checkpointer, int]:
    """The workdir's checkpointer (to close) and its latest complete step, or `step` if it is
    complete. Raises ConvertError with one line otherwise."""
    _resolve(workdir)
    if not files.isdir(workdir):
        raise ConvertError(f"--workdir={workdir!r} does not exist or is not a directory")
    if not files.isdir(checkpoint.checkpoint_dir(workdir)):
        raise ConvertError(f"--workdir={workdir!r} has no checkpoints/ directory")
    ckpt = checkpoint.Checkpointer(workdir)
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.complete_steps():
        ckpt.close()
        raise ConvertError(
            f"--workdir={workdir!r} holds no complete checkpoint"
            + (f" at step {step}" if step is not None else "")
        )
    return ckpt, step


def export_layout(cfg: ModelConfig) -> str:
    """The HF layout an export writes: LLaDA's, or Qwen3's for a model with per-head query/key
    norms (which LLaDA's cannot hold)."""
    return "qwen3" if cfg.qk_norm else "llada"


def export_hf(
    workdir: str,
    hf_dir: str,
    dtype: str = "",
    max_shard_size: str | int = "5GB",
    step: int | None = None,
    hf_code: str = "",
) -> list[str]:
    """A workdir's checkpoint (latest, or `step`) -> hf_dir in the HF LLaDA layout (Qwen3's for
    a model with query/key norms: `export_layout`).

    Besides the weights and config.json it writes the run's tokenizer (`_write_tokenizer`) and
    the modeling code (`_write_code`): that of `hf_code` (a directory holding
    configuration_llada.py and modeling_llada.py) if given, else that kept when the checkpoint
    it descends from was imported, else an auto_map naming the public LLaDA repository's code.
    The Qwen3 layout needs none (transformers has it): `hf_code` is refused there.
    dtype: float32 or bfloat16; "" = the dtype of the HF checkpoint it was imported from, else
    the parameters' dtype. Returns the safetensors file names. The workdir may be a gs:// one;
    hf_dir is local.
    """
    if files.is_uri(hf_dir):
        raise ConvertError(
            f"--hf_dir={hf_dir!r}: export writes a local directory (copy it to the bucket after)"
        )
    if hf_code and not _code_files(hf_code):
        raise ConvertError(
            f"--hf_code={hf_code!r} holds no .py files (configuration_llada.py, ...)"
        )
    shard_bytes = parse_size(max_shard_size)
    ckpt, step = _open_for_export(workdir, step)
    meta = ckpt.meta(step)
    run_cfg = meta["config"]
    cfg = sections.from_section(ModelConfig, run_cfg["model"])
    if not cfg.scan_layers:
        raise ConvertError("export of a scan_layers=False checkpoint is not supported yet")
    layout = export_layout(cfg)
    if hf_code and layout != "llada":
        raise ConvertError(
            f"--hf_code={hf_code!r} does not apply: this model (model.qk_norm=True) is written in "
            "the Qwen3 layout, which transformers loads with its own code; leave --hf_code out"
        )
    if cfg.causal:
        print("warning: model.causal=True; HF LLaDA attention is bidirectional", flush=True)
    origin = _hf_origin(workdir, meta, layout)
    template = origin[1] if origin else None
    if not dtype:
        dtype = (
            (template or {}).get("torch_dtype") or (template or {}).get("dtype") or cfg.param_dtype
        )
    if dtype not in ("float32", "bfloat16"):
        raise ConvertError(f"--dtype={dtype!r} is not float32 or bfloat16")
    out_dtype = DTYPES[dtype]
    tok = _run_tokenizer(run_cfg)
    seq_len = run_cfg.get("data", {}).get("seq_len")
    ids = None
    if template is None and tok is not None:
        ids = {"mask_token_id": tok.mask_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    max_length = None if template else seq_len
    if layout == "llada":
        hf_cfg = hf_llada.hf_config_from_model(cfg, template, dtype, ids, max_length)
    else:
        hf_cfg = hf_llama.qwen3_config_from_model(cfg, template, dtype, ids, max_length)
        print(
            "note: model.qk_norm=True is written in the Qwen3 layout (the LLaDA layout has no "
            "per-head query/key norm); transformers' Qwen3ForCausalLM runs it with causal "
            "attention, so sample from it with this package or diffusion-aware code",
            flush=True,
        )
    params_dir = _params_dir(workdir, step)
    saved = _saved_paths(params_dir)
    entries = layouts.entries(cfg, layout)
    for e in entries:
        if e.path not in saved:
            raise ConvertError(f"checkpoint {params_dir!r} lacks parameter {'.'.join(e.path)}")
    tensors = [(e.hf_key(i), e.hf_shape, out_dtype) for e, i in layouts.hf_tensor_list(cfg, layout)]
    param_dtype = np.dtype(cfg.weight_dtype)

    def produce(e: layouts.Entry):
        """Yields (HF tensor name, array) for parameter `e`: its saved array read and checked
        against the checkpoint's checksums, then (per layer when stacked) in HF layout, as
        `out_dtype`."""
        shape = (cfg.n_layers, *e.shape) if e.per_layer else e.shape
        try:
            leaf = _restore_numpy(params_dir, saved[e.path], shape, param_dtype)
        except ConvertError:
            raise
        except Exception as err:  # noqa: BLE001 - a truncated or missing array file
            raise checkpoint.DamagedCheckpoint(
                ckpt.directory, step, f"its params cannot be read: {checkpoint.first_line(err)}"
            ) from None
        ckpt.verify_array(step, meta, "params", "/".join(map(str, saved[e.path])), leaf)
        for i in range(cfg.n_layers) if e.per_layer else [None]:
            w = leaf[i] if i is not None else leaf
            yield e.hf_key(i), np.asarray(e.to_hf(w), dtype=out_dtype, order="C")

    with ckpt, _output_dir(hf_dir, "--hf_dir") as tmp:
        names = write_sharded(tmp, tensors, entries, produce, shard_bytes)
        if layout == "llada":
            code_dirs = [hf_code, files.join(origin[0], CODE_DIR) if origin else ""]
            _write_code(tmp, hf_cfg, code_dirs)
        _write_tokenizer(tmp, tok, cfg.vocab_size, seq_len or 0)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    return names


def _write_tokenizer(out: str, tok: Tokenizer | None, vocab_size: int, max_length: int) -> None:
    """The run's tokenizer as tokenizer.json, tokenizer_config.json and special_tokens_map.json
    in `out` (a sentencepiece model converted with the same ids); a warning instead when there
    is none or it does not fit the model's vocabulary, or cannot be converted exactly."""
    if tok is None:
        return
    if tok.vocab_size > vocab_size:
        print(
            f"warning: no tokenizer written: the run's tokenizer has {tok.vocab_size} tokens, "
            f"more than the model's vocabulary ({vocab_size})",
            flush=True,
        )
        return
    try:
        hf_tokenizer.write_tokenizer_files(tok, out, max_length)
    except ValueError as e:
        print(f"warning: no tokenizer written: {e}", flush=True)

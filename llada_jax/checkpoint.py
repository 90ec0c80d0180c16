"""Orbax checkpoints of a run: params, optimizer state and metadata, saved asynchronously.

DIR/checkpoints/<step>/ holds three items: `params`, `opt_state` (absent in a params-only
checkpoint, e.g. one converted from Hugging Face) and `meta` (JSON: step and the resolved config).
Orbax writes each step into `<step>.orbax-checkpoint-tmp`, writes `commit_success.txt` into it
last, and then renames it to `<step>`, so a kill mid-save leaves the previous checkpoint as the
latest readable one. A step directory counts as complete only when it holds
`commit_success.txt` (the rule Orbax itself applies on object stores, where it cannot rename).
The RNG and the data position need no saving: both are pure functions of (seed, step).

Verified restores: `meta` records a fingerprint of every saved array (llada_jax/fingerprint.py),
written with the step's commit. Every restore recomputes them on what it read, and refuses
arrays holding NaN or Inf. A step that fails this, or cannot be read at all (a truncated file, a
missing item, garbage meta), raises `DamagedCheckpoint` naming the step and what is wrong: the
trainer sets it aside (`set_aside`: moved to DIR/damaged_checkpoints/, never deleted, never
picked again) and falls back to the next older step; read-only tools refuse it. Steps saved
before fingerprints were recorded are checked for NaN/Inf only.

An interrupted save leaves a temporary directory behind, and an interrupted clean-up of old
steps leaves a step directory without its commit file. The trainer's checkpointer (`writer=True`)
removes both when it starts, before anything is restored or saved: process 0 removes them (Orbax's
`cleanup_tmp_directories` for the temporary ones), the other processes wait for it. Readers
(`writer=False`, e.g. an evaluation job watching a running trainer) never remove anything: what
looks unfinished to them may be a save in progress.

One writer at a time: process 0 of a trainer holds DIR/writer.lock while it runs
(llada_jax/writer_lock.py).

Readers list and restore step directories directly (no Orbax CheckpointManager, whose start-up
scan fails when a trainer deletes an old step under it); only the writer has a manager, for
saving and retention.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llada_jax import files, fingerprint
from llada_jax.host import decisions
from llada_jax.model import ModelConfig

PyTree = Any
ITEMS = ("params", "opt_state", "meta")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a directory being written
COMMIT_FILE = "commit_success.txt"  # written by Orbax as the last file of a step
DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: steps set aside by the trainer


def checkpoint_dir(workdir: str) -> str:
    """WORKDIR/checkpoints, the workdir resolved (an absolute path, or a URI as given)."""
    return files.join(files.resolve(workdir), "checkpoints")


class DamagedCheckpoint(ValueError):
    """A step that cannot be read, fails its fingerprints, or holds NaN/Inf parameters."""

    def __init__(self, directory: str, step: int, reason: str):
        self.directory, self.step, self.reason = directory, step, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")


class StructureMismatch(ValueError):
    """The saved tree's arrays are not the ones today's config makes (e.g. another optimizer)."""


class SaveFailed(OSError):
    """A checkpoint save failed (disk full, permissions, ...): the message is one line."""


class Checkpointer:
    """Saves every `save_every` steps and when `save_every_sec` seconds have passed since the
    last save (or the start), keeps the last `max_to_keep` plus every `keep_every`-th. Older
    steps are deleted after the new one commits, by Orbax's thread that finishes an
    asynchronous save: off the training thread.

    writer: this process belongs to the run that writes DIR (the trainer, a converter): removes
    what interrupted saves left behind before anything else happens. Otherwise nothing is
    created or removed, and `save` is refused.
    """

    def __init__(
        self,
        workdir: str,
        save_every: int = 0,
        max_to_keep: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = True,
        writer: bool = False,
        save_every_sec: float = 0.0,
    ):
        self.save_every, self.save_every_sec, self.writer = save_every, save_every_sec, writer
        self._last_save = time.monotonic()
        self.workdir = files.resolve(workdir)
        self.directory = checkpoint_dir(workdir)
        self.manager: ocp.CheckpointManager | None = None
        self._saving: int | None = None  # the step of the save in flight
        self.failed = False  # a save failed: close() does not wait for it again
        _quiet_orbax_failures()
        if writer:
            remove_leftovers(self.directory)
            self.manager = ocp.CheckpointManager(
                files.as_epath(self.directory),
                item_names=ITEMS,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep,
                    keep_period=keep_every or None,
                    enable_async_checkpointing=async_save,
                    create=True,
                    cleanup_tmp_directories=True,
                ),
            )
        self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def complete_steps(self) -> list[int]:
        """The complete steps, oldest first: process 0's listing, on every process (every
        process calls it; each host's own could differ while a save is being committed)."""
        return decisions.process_0_decides(lambda: complete_steps(self.directory))

    def is_complete(self, step: int) -> bool:
        """Whether `step` was committed: its directory holds COMMIT_FILE."""
        return files.isfile(files.join(self.directory, str(step), COMMIT_FILE))

    def should_save(self, step: int) -> bool:
        """Whether `step` is due by the step or the clock cadence: this process's view (a
        multi-process trainer takes process 0's, the training loop agrees on it)."""
        by_step = self.save_every > 0 and step % self.save_every == 0
        by_clock = 0 < self.save_every_sec <= time.monotonic() - self._last_save
        return by_step or by_clock

    # ----------------------------------------------------------------------------------------
    # Writing
    # ----------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        params: PyTree,
        opt_state: PyTree | None,
        meta: dict,
        chunk_bytes: int | None = None,
    ) -> bool:
        """Starts an asynchronous save (returns after the device-to-host copy). A step that is
        already saved completely is kept as it is (returns False); an incomplete one is replaced.
        `meta` is saved with the fingerprints of `params` and `opt_state` added. Raises
        SaveFailed when the previous save or this one's start failed.

        chunk_bytes: the largest storage chunk of a parameter (None: Orbax's choice).
        """
        if self.manager is None:
            raise ValueError(f"{self.directory} was opened for reading (writer=False)")
        self.wait()  # Orbax would wait for the previous save too; a failure is named after it
        existing = self._existing(step)
        if existing == "complete":
            return False
        if existing == "incomplete":
            if jax.process_index() == 0:
                files.rmtree(files.join(self.directory, str(step)))
            sync_processes(f"checkpoint_replace_{step}")
            self.manager.reload()
        checksums = {"params": fingerprint.fingerprints(params)[0]}
        if opt_state is not None:
            checksums["opt_state"] = fingerprint.fingerprints(opt_state)[0]
        save_args = (
            None
            if chunk_bytes is None
            else jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), params)
        )
        items = dict(
            params=ocp.args.StandardSave(params, save_args=save_args),
            meta=ocp.args.JsonSave(dict(meta, checksums=checksums)),
        )
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._saving, self._last_save = step, time.monotonic()
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - any failure of the save's synchronous part
            raise self._failure(e) from None
        return True

    def _existing(self, step: int) -> str:
        """'none', 'incomplete' (a directory without its commit file) or 'complete': process
        0's view, on every process."""

        def look() -> str:
            """The step's directory as process 0 sees it: 'none', 'incomplete' or 'complete'."""
            if not files.isdir(files.join(self.directory, str(step))):
                return "none"
            return "complete" if self.is_complete(step) else "incomplete"

        return decisions.process_0_decides(look)

    def check_for_errors(self) -> None:
        """Raises SaveFailed if the save in flight has failed (cheap: call it every step)."""
        self._surfacing_failures(lambda manager: manager.check_for_errors())

    def wait(self) -> None:
        """Waits for the save in flight; SaveFailed if it failed."""
        self._surfacing_failures(lambda manager: manager.wait_until_finished())

    def _surfacing_failures(self, call: Any) -> None:
        """`call(manager)` (a reader has none: nothing), a failed save raised as SaveFailed."""
        if self.manager is None:
            return
        try:
            call(self.manager)
        except Exception as e:  # noqa: BLE001 - whatever the background save raised
            raise self._failure(e) from None

    def _failure(self, error: BaseException) -> SaveFailed:
        """One line for a failed save: which step, where, why, and the space left there."""
        reason = first_line(error)
        os_error = re.search(r'Failed writing: "([^"]+)".*\[os_error_code=.(\d+).\]', str(error))
        if os_error:  # tensorstore's wording: the errno and the file are what the user needs
            reason = f"{os.strerror(int(os_error[2]))} (writing {os_error[1]})"
        try:
            free = f"; {shutil.disk_usage(self.directory).free / 2**20:,.1f} MiB free there"
        except (OSError, ValueError):  # an object store (a URI)
            free = ""
        self.failed = True
        return SaveFailed(
            f"saving checkpoint step {self._saving} to {self.directory} failed: {reason}{free}; "
            f"the checkpoints saved before it are intact"
        )

    def set_aside(self, step: int) -> str:
        """Moves a damaged step out of checkpoints/ into DIR/damaged_checkpoints/ (process 0;
        the others wait), where nothing reads or removes it. Returns the new path."""
        target = files.join(self.workdir, DAMAGED_DIR, str(step))
        n = 1
        while files.exists(target):
            n += 1
            target = files.join(self.workdir, DAMAGED_DIR, f"{step}-{n}")
        if jax.process_index() == 0:
            files.makedirs(files.join(self.workdir, DAMAGED_DIR))
            files.rename(files.join(self.directory, str(step)), target)
        sync_processes(f"checkpoint_set_aside_{step}")
        if self.manager is not None:
            self.manager.reload()
        return target

    # ----------------------------------------------------------------------------------------
    # Reading
    # ----------------------------------------------------------------------------------------
    def meta(self, step: int) -> dict:
        """The step's meta item (step, config, checksums); DamagedCheckpoint if unreadable."""
        path = files.join(self.directory, str(step))
        try:
            meta = self._reader.restore(
                files.as_epath(path), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:  # noqa: BLE001 - a missing, truncated or garbage file
            raise DamagedCheckpoint(
                self.directory, step, f"its meta ({path}/meta) cannot be read: {first_line(e)}"
            ) from None
        if not isinstance(meta, dict):
            raise DamagedCheckpoint(self.directory, step, f"its meta ({path}/meta) is not a dict")
        return meta

    def newest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest complete step whose meta can be read, or None."""
        for step in reversed(self.complete_steps()):
            with contextlib.suppress(DamagedCheckpoint):
                return step, self.meta(step)
        return None

    def restore(
        self, step: int, params: PyTree, opt_state: PyTree | None = None
    ) -> tuple[PyTree, PyTree | None]:
        """Restores onto the shapes and shardings of the given (abstract or real) trees, then
        verifies what was read. Raises DamagedCheckpoint (unreadable, a fingerprint differs,
        NaN/Inf parameters) or StructureMismatch (the trees are not the saved ones)."""
        meta = self.meta(step)
        targets = {"params": params}
        if opt_state is not None:
            targets["opt_state"] = opt_state
        for item, tree in targets.items():
            self._check_structure(step, item, tree)
        items = {k: ocp.args.StandardRestore(abstract(v)) for k, v in targets.items()}
        path = files.as_epath(files.join(self.directory, str(step)))
        error = ""
        try:
            out = self._reader.restore(path, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - a truncated or missing array file
            error = first_line(e)
        error = agreed_error(error)  # every process takes the same decision
        if error:
            raise DamagedCheckpoint(self.directory, step, f"cannot be read: {error}")
        restored = {k: out[k] for k in targets}
        self._verify(step, restored, meta.get("checksums"))
        return restored["params"], restored.get("opt_state")

    def _check_structure(self, step: int, item: str, tree: PyTree) -> None:
        """The saved item holds the arrays `tree` has, by name (before anything is read)."""
        path = files.as_epath(files.join(self.directory, str(step), item))
        try:
            saved = ocp.StandardCheckpointHandler().metadata(path).tree
        except Exception as e:  # noqa: BLE001 - a missing item or garbage metadata
            raise DamagedCheckpoint(
                self.directory, step, f"its {item} cannot be read: {first_line(e)}"
            ) from None
        names = leaf_names(tree)
        saved_names = leaf_names(saved)
        if names != saved_names:
            missing, extra = sorted(saved_names - names), sorted(names - saved_names)
            raise StructureMismatch(
                f"checkpoint step {step} in {self.directory}: its {item} does not match the "
                f"config's ({len(missing)} saved arrays not expected, e.g. {missing[:1]}; "
                f"{len(extra)} expected arrays not saved, e.g. {extra[:1]})"
            )

    def verify_array(self, step: int, meta: dict, item: str, name: str, array: Any) -> None:
        """One array read on its own (e.g. by the exporter, a leaf at a time) against the
        fingerprint `meta` records for it ('a/b/c' under `item`)."""
        saved = meta.get("checksums", {}).get(item, {})
        self._verify(
            step, {item: {name: array}}, {item: {name: saved[name]}} if name in saved else None
        )

    def _verify(self, step: int, restored: dict[str, PyTree], checksums: dict | None) -> None:
        """Fingerprints equal to the saved ones (when recorded), no NaN/Inf in floating arrays."""
        for item, tree in restored.items():
            sums, nonfinite = fingerprint.fingerprints(tree)
            saved = (checksums or {}).get(item)
            if saved is not None:
                bad = sorted(n for n in sums if saved.get(n) != sums[n])
                if bad:
                    raise DamagedCheckpoint(
                        self.directory,
                        step,
                        f"{len(bad)} of its {len(sums)} {item} arrays differ from what was saved "
                        f"(checksum), e.g. {item}/{bad[0]}",
                    )
            if nonfinite:
                raise DamagedCheckpoint(
                    self.directory,
                    step,
                    f"its {item} hold NaN or Inf ({len(nonfinite)} arrays, e.g. "
                    f"{item}/{nonfinite[0]})",
                )

    def close(self) -> None:
        """Waits for the save in flight, then stops Orbax's threads. Call it on every exit path:
        an interpreter that shuts down under a running save prints tracebacks from them. After a
        failed save it only stops the threads (the failure was raised already)."""
        try:
            if not self.failed:
                self.wait()
        finally:
            if self.manager is not None:
                with _quiet():
                    self.manager.close()
            self._reader.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def leftovers(directory: str) -> list[str]:
    """Names in a checkpoints directory that no complete save produced: Orbax's temporary
    directories and step directories without their commit file."""
    names = []
    for name in files.listdir(directory):
        path = files.join(directory, name)
        if not files.isdir(path):
            continue
        if TMP_SUFFIX in name or (
            name.isdigit() and not files.isfile(files.join(path, COMMIT_FILE))
        ):
            names.append(name)
    return names


def remove_leftovers(directory: str) -> None:
    """Process 0 removes the `leftovers` and says so in one line; the others wait for it.

    Step directories are removed here; temporary ones are left to Orbax's own clean-up
    (`cleanup_tmp_directories`), which finishes before the manager's first save.
    """
    if jax.process_index() == 0:
        names = leftovers(directory)
        for name in names:
            if TMP_SUFFIX not in name:
                files.rmtree(files.join(directory, name))
        if names:
            print(
                f"checkpoints: removing what interrupted saves left in {directory}: "
                f"{', '.join(names)}",
                flush=True,
            )
    sync_processes("checkpoint_remove_leftovers")


def complete_steps(directory: str) -> list[int]:
    """The steps in a checkpoints directory that hold their commit file, oldest first. Safe
    beside a running trainer: a step removed between the listing and the look is left out."""
    return sorted(
        int(n)
        for n in files.listdir(directory)
        if n.isdigit() and files.isfile(files.join(directory, n, COMMIT_FILE))
    )


def leaf_names(tree: PyTree) -> set[str]:
    """The names of a tree's arrays ('a/b/0/c'), as checkpoints record them."""
    return {fingerprint.key_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def agreed_error(error: str) -> str:
    """One process's error as every process's decision: '' only if no process had one."""
    if jax.process_count() == 1:
        return error
    failed = multihost_utils.process_allgather(np.int32(bool(error)))
    if error or not np.any(failed):
        return error
    return f"another process could not read it (process {int(np.argmax(failed))})"


class _OrbaxErrors(logging.Filter):
    """Drops the error records, tracebacks included, that Orbax's background threads (and
    asyncio, for their tasks) log when a save fails: the failure reaches the trainer as one
    SaveFailed line, and a dozen tracebacks from other threads would bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep `record`: False for an ERROR or worse from Orbax's code (its message's
        or traceback's files) and for asyncio's unretrieved-task report; True otherwise."""
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        if record.name == "asyncio" and message.startswith("Task exception was never retrieved"):
            return False  # a read still in flight when Orbax's failed restore returned
        where = [record.pathname, message]
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            where.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        return not any(f"{os.sep}orbax{os.sep}" in w for w in where)


def _quiet_orbax_failures() -> None:
    """Installs, once per process, the filters that keep a failed save or read to one line:
    `_OrbaxErrors` on the loggers, `_drop_straggler_reports` on sys.unraisablehook."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxErrors) for f in logger.filters):
            logger.addFilter(_OrbaxErrors())
    _drop_straggler_reports()


def _drop_straggler_reports() -> None:
    """After a failed read or write, the operations still in flight finish on tensorstore's
    threads: their coroutines fail or call back into Orbax's event loop, closed by then. Each
    such report goes to sys.unraisablehook, which prints a traceback (`Event loop is closed`,
    `Exception ignored in: <coroutine ...>`). Reports raised in Orbax's or asyncio's code are
    dropped (the failure itself was raised); any other goes to the hook as before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_stragglers", False):
        return

    def hook(report: Any) -> None:
        """sys.unraisablehook's replacement: drops a report from Orbax's reads, passes any other
        to the previous hook."""
        if not _from_orbax_reads(report):
            previous(report)

    hook.drops_stragglers = True
    sys.unraisablehook = hook


def _from_orbax_reads(report: Any) -> bool:
    """Whether an unraisable report comes from Orbax's asynchronous reads."""
    code = getattr(report.object, "cr_code", None)
    files = [code.co_filename] if code is not None else []
    tb = report.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any(f"{os.sep}orbax{os.sep}" in f or f"{os.sep}asyncio{os.sep}" in f for f in files)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Orbax's errors while stopping its threads after a failed save: already reported."""
    try:
        yield
    except Exception:  # noqa: BLE001
        pass


def sync_processes(name: str) -> None:
    """A barrier across the run's processes (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def abstract(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying each leaf's sharding (the restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def shape_changes(saved_model: dict, model: dict) -> list[str]:
    """Model keys whose change would alter parameter shapes or the tree's structure (the model
    config's shape keys; a resumed run may not change them): 'key: saved -> new'."""
    return [
        f"model.{k}: {saved_model.get(k)!r} -> {model.get(k)!r}"
        for k in ModelConfig.shape_keys()
        if saved_model.get(k) != model.get(k)
    ]

"""Orbax checkpoints of a run: params, optimizer state and metadata, saved asynchronously.

DIR/checkpoints/<step>/ holds three items: `params`, `opt_state` (absent in a params-only
checkpoint, e.g. one converted from Hugging Face) and `meta` (JSON: step and the resolved config).
Orbax writes each step into `<step>.orbax-checkpoint-tmp`, writes `commit_success.txt` into it
last, and then renames it to `<step>`, so a kill mid-save leaves the previous checkpoint as the
latest readable one. A step directory counts as complete only when it holds
`commit_success.txt` (the rule Orbax itself applies on object stores, where it cannot rename).
The RNG and the data position need no saving: both are pure functions of (seed, step).

An interrupted save leaves a temporary directory behind, and an interrupted clean-up of old
steps leaves a step directory without its commit file. The trainer's checkpointer (`writer=True`)
removes both when it starts, before anything is restored or saved: process 0 removes them (Orbax's
`cleanup_tmp_directories` for the temporary ones), the other processes wait for it. Readers
(`writer=False`, e.g. an evaluation job watching a running trainer) never remove anything: what
looks unfinished to them may be a save in progress.

One writer at a time: process 0 of a trainer holds an exclusive lock on DIR/writer.lock
(`WriterLock`) while it runs. A restarted job can overlap the one it replaces (a launcher killed
by the scheduler passes SIGTERM to its trainer, which saves while the new one starts); the new
writer waits for
the lock instead of removing the other's save in progress. The kernel drops the lock of a killed
process, so a crash never leaves DIR locked.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any
ITEMS = ("params", "opt_state", "meta")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a directory being written
COMMIT_FILE = "commit_success.txt"  # written by Orbax as the last file of a step

# Model keys that change parameter shapes or tree structure: a resumed run may not change them.
SHAPE_KEYS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "mlp_hidden",
    "tie_embeddings",
    "scan_layers",
    "param_dtype",
)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Saves every `save_every` steps, keeps the last `max_to_keep` plus every `keep_every`-th.

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
    ):
        self.save_every, self.writer = save_every, writer
        self.directory = checkpoint_dir(workdir)
        if writer:
            remove_leftovers(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                keep_period=keep_every or None,
                enable_async_checkpointing=async_save,
                create=writer,
                cleanup_tmp_directories=writer,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def complete_steps(self) -> list[int]:
        return [s for s in sorted(self.manager.all_steps()) if self.is_complete(s)]

    def is_complete(self, step: int) -> bool:
        return os.path.isfile(os.path.join(self.directory, str(step), COMMIT_FILE))

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

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

        chunk_bytes: the largest storage chunk of a parameter (None: Orbax's choice).
        """
        if not self.writer:
            raise ValueError(f"{self.directory} was opened for reading (writer=False)")
        if os.path.isdir(os.path.join(self.directory, str(step))):
            if self.is_complete(step):
                return False
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                shutil.rmtree(os.path.join(self.directory, str(step)))
            sync_processes(f"checkpoint_replace_{step}")
            self.manager.reload()
        save_args = (
            None
            if chunk_bytes is None
            else jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), params)
        )
        items = dict(
            params=ocp.args.StandardSave(params, save_args=save_args), meta=ocp.args.JsonSave(meta)
        )
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        return True

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(
        self, step: int, params: PyTree, opt_state: PyTree | None = None
    ) -> tuple[PyTree, PyTree | None]:
        """Restores onto the shapes and shardings of the given (abstract or real) trees."""
        items = dict(params=ocp.args.StandardRestore(abstract(params)))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if opt_state is not None else None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight, then stops Orbax's threads. Call it on every exit path:
        an interpreter that shuts down under a running save prints tracebacks from them."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class WorkdirBusy(RuntimeError):
    """Another process kept writing the workdir for longer than this one would wait."""


class WriterLock:
    """An exclusive lock on DIR/writer.lock (flock), waited for up to `wait_sec` seconds.

    The file holds the pid of the holder, for the messages. On a file system without locks
    (some network mounts) it warns and goes on unlocked.
    """

    def __init__(self, workdir: str, wait_sec: float):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(os.path.abspath(workdir), "writer.lock")
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, told = time.monotonic() + wait_sec, False
        while not self._try_lock():
            if self.fd is None:
                return
            holder = self._holder()
            if time.monotonic() >= deadline:
                self.release()
                raise WorkdirBusy(
                    f"--workdir={workdir!r} is still written by another process (pid {holder}) "
                    f"after {wait_sec:.0f}s (checkpoint.wait_for_writer_sec): stop it, or use "
                    f"another workdir"
                )
            if not told:
                print(
                    f"checkpoints: waiting up to {wait_sec:.0f}s for the process that writes "
                    f"{workdir} (pid {holder}) to exit",
                    flush=True,
                )
                told = True
            time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def _try_lock(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            print(
                f"warning: cannot lock {self.path} ({e.strerror}); make sure only one trainer "
                f"writes this workdir",
                flush=True,
            )
            self.release()
            return False

    def _holder(self) -> str:
        with open(self.path) as f:
            return f.read().strip() or "unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def leftovers(directory: str) -> list[str]:
    """Names in a checkpoints directory that no complete save produced: Orbax's temporary
    directories and step directories without their commit file."""
    if not os.path.isdir(directory):
        return []
    names = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if TMP_SUFFIX in name or (
            name.isdigit() and not os.path.isfile(os.path.join(path, COMMIT_FILE))
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
                shutil.rmtree(os.path.join(directory, name))
        if names:
            print(
                f"checkpoints: removing what interrupted saves left in {directory}: "
                f"{', '.join(names)}",
                flush=True,
            )
    sync_processes("checkpoint_remove_leftovers")


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
    """Model keys whose change would alter parameter shapes: 'key: saved -> new'."""
    return [
        f"model.{k}: {saved_model.get(k)!r} -> {model.get(k)!r}"
        for k in SHAPE_KEYS
        if saved_model.get(k) != model.get(k)
    ]

"""One trainer writes a workdir at a time: DIR/writer.lock, held by process 0 while it runs.

A restarted job can overlap the one it replaces (a launcher killed by the scheduler passes
SIGTERM to its trainer, which saves while the new one starts): the new writer waits for the lock
instead of removing the other's save in progress (`checkpoint.wait_for_writer_sec`).

- Local (or mounted) directories: an exclusive flock on the file (`FileLock`). The kernel drops
  the lock of a killed process, so a crash never leaves DIR locked.
- Object stores (gs://): no flock exists there. `ObjectLock` creates the lock object only if it
  is absent (a generation-match precondition: of two writers exactly one succeeds) and renews
  it every `stale_sec / 4` seconds, again conditioned on the generation it wrote last. Nothing
  drops the lock of a killed holder, so a waiter takes over one whose generation has not
  changed for `stale_sec` of its own clock (no clocks are compared across machines), again with
  a generation precondition (one waiter wins). A holder whose renewal fails has lost the lock:
  `lost` turns True and the trainer stops before its next save.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

from llada_jax import files

LOCK_FILE = "writer.lock"


class WorkdirBusy(RuntimeError):
    """Another process kept writing the workdir for longer than this one would wait, or took
    the workdir over."""


def open_lock(workdir: str, wait_sec: float, stale_sec: float) -> FileLock | ObjectLock:
    """The workdir's lock, acquired (waiting up to `wait_sec` seconds)."""
    if files.is_uri(workdir):
        return ObjectLock(workdir, wait_sec, stale_sec)
    return FileLock(workdir, wait_sec)


def holder_name() -> str:
    """This process, as the lock file names it: "HOST pid PID"."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def _busy(workdir: str, holder: str, wait_sec: float) -> WorkdirBusy:
    return WorkdirBusy(
        f"--workdir={workdir!r} is still written by another process ({holder}) after "
        f"{wait_sec:.0f}s (checkpoint.wait_for_writer_sec): stop it, or use another workdir"
    )


def _waiting(workdir: str, holder: str, wait_sec: float) -> None:
    print(
        f"checkpoints: waiting up to {wait_sec:.0f}s for the process that writes {workdir} "
        f"({holder}) to exit",
        flush=True,
    )


class FileLock:
    """An exclusive flock on DIR/writer.lock, waited for up to `wait_sec` seconds.

    The file holds the holder's name, for the messages. On a file system without locks (some
    network mounts) it warns and goes on unlocked.
    """

    lost = False  # a flock cannot be taken over

    def __init__(self, workdir: str, wait_sec: float):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, told = time.monotonic() + wait_sec, False
        while not self._try_lock():
            if self.fd is None:
                return
            holder = self._holder()
            if time.monotonic() >= deadline:
                self.release()
                raise _busy(workdir, holder, wait_sec)
            if not told:
                _waiting(workdir, holder, wait_sec)
                told = True
            time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{holder_name()}\n".encode())

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
        """Drops the lock (closes the descriptor); a no-op if not held."""
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class ObjectLock:
    """DIR/writer.lock on an object store (gs://), as the module docstring describes."""

    def __init__(self, workdir: str, wait_sec: float, stale_sec: float):
        from google.api_core import exceptions
        from google.cloud import storage

        self._precondition_failed = exceptions.PreconditionFailed
        self._not_found = exceptions.NotFound
        bucket, _, prefix = workdir[len("gs://") :].partition("/")
        self.blob = storage.Client().bucket(bucket).blob(files.join(prefix, LOCK_FILE).lstrip("/"))
        self.renew_sec, self.generation, self.lost = stale_sec / 4, None, False
        self._stop = threading.Event()
        deadline, told = time.monotonic() + wait_sec, False
        seen, seen_since = None, time.monotonic()  # the holder's generation, and since when
        while not self._try_create():
            holder, generation = self._holder()
            if generation != seen:
                seen, seen_since = generation, time.monotonic()
            elif generation is not None and time.monotonic() - seen_since >= stale_sec:
                if self._try_take_over(generation):
                    print(
                        f"checkpoints: took over {workdir}'s writer lock from {holder} (not "
                        f"renewed for {stale_sec:.0f}s: checkpoint.lock_stale_sec)",
                        flush=True,
                    )
                    break
                continue
            if time.monotonic() >= deadline:
                raise _busy(workdir, holder, wait_sec)
            if not told:
                _waiting(workdir, holder, wait_sec)
                told = True
            time.sleep(min(1.0, self.renew_sec))
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="writer-lock")
        self._renewer.start()

    def _body(self) -> str:
        return json.dumps({"holder": holder_name(), "time": time.time()})

    def _try_create(self) -> bool:
        return self._upload(if_generation_match=0)

    def _try_take_over(self, generation: int) -> bool:
        return self._upload(if_generation_match=generation)

    def _upload(self, if_generation_match: int) -> bool:
        """One conditional single-request upload; False if the precondition failed."""
        try:
            self.blob.upload_from_string(self._body(), if_generation_match=if_generation_match)
        except self._precondition_failed:
            return False
        self.generation = self.blob.generation
        return True

    def _holder(self) -> tuple[str, int | None]:
        """(who holds the lock, its generation), ('nobody', None) if it vanished meanwhile."""
        try:
            self.blob.reload()
            holder = json.loads(self.blob.download_as_text()).get("holder", "unknown")
            return holder, self.blob.generation
        except self._not_found:
            return "nobody", None
        except ValueError:  # not JSON: held by something else
            return "unknown", self.blob.generation

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_sec):
            try:
                renewed = self._upload(if_generation_match=self.generation)
            except Exception:  # noqa: BLE001 - a network error: try again next time
                continue
            if not renewed:
                self.lost = True
                return

    def release(self) -> None:
        """Stops renewing and deletes the lock if it is still this process's."""
        self._stop.set()
        self._renewer.join()
        if self.generation is not None and not self.lost:
            try:
                self.blob.delete(if_generation_match=self.generation)
            except (self._precondition_failed, self._not_found):
                pass
            self.generation = None

    def __enter__(self) -> ObjectLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

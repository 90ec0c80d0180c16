"""Files replaced in one step: a kill at any moment leaves the old file or the new one, never a
part of either (metrics.jsonl, config.json, prepared-data metadata and sidecars); and the one
line that says why a write failed."""

from __future__ import annotations

import contextlib
import os
import shutil


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory (`path.tmp-PID`),
    synced, then renamed over `path`. On any failure (a full disk, an interrupt) the temporary
    file is removed and the error re-raised, `path` left as it was; an OSError then names
    `path` (a failed write of an open file names none)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            e.filename, e.filename2 = path, None
        raise


def write_error(e: OSError, default_path: str) -> str:
    """`cannot write PATH: REASON (N bytes free on that file system)`, PATH being the file the
    error names, else `default_path` (e.g. the workdir)."""
    path = e.filename or default_path
    free = shutil.disk_usage(nearest_existing(path)).free
    return f"cannot write {path}: {e.strerror or e} ({free:,} bytes free on that file system)"


def nearest_existing(path: str) -> str:
    """`path` if it exists, else its nearest existing parent directory."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path

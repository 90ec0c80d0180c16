"""The path layer: every file of a workdir, a sweep or a prepared dataset is read and written
here, whether its path is local or a URI that etils.epath opens (`gs://bucket/...`, through
gcsfs: the `gcs` extra).

Local paths keep plain os calls (an absolute path, atomic replace through a synced temporary
file). URIs go through epath; a URI is never made absolute, and an object store has no
directories (one "exists" once an object is in it) and no rename (gcsfs copies, then deletes).
Files replaced in one step: a kill at any moment leaves the old file or the new one, never a
part of either (metrics.jsonl, config.json, prepared-data metadata and sidecars): a temporary
file renamed over the old one locally, a single upload on an object store.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import posixpath
import shutil

import fsspec
from etils import epath

GCS_EXTRA = 'pip install -e ".[gcs]"'

# gcsfs caches directory listings for the life of a process unless told not to: a watcher would
# never see a new checkpoint, nor a trainer a step another process removed. Set before the first
# file system object is made (fsspec applies it then).
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False


def is_uri(path: str) -> bool:
    """Whether `path` names an object store (`scheme://...`) rather than a local file."""
    return "://" in str(path)


def resolve(path: str) -> str:
    """A local path made absolute, a URI without its trailing slash."""
    path = str(path)
    if is_uri(path):
        check_uri(path)
        return path.rstrip("/")
    return os.path.abspath(path)


def check_uri(path: str) -> None:
    """ValueError (one line) for a gs:// path when the gcs extra is not installed."""
    if path.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        raise ValueError(f"{path!r} is on Google Cloud Storage: {GCS_EXTRA} first")


def join(path: str, *names: str) -> str:
    """`names` joined under `path`: with '/' on an object store (gs://), os.path.join locally."""
    return posixpath.join(path, *names) if is_uri(path) else os.path.join(path, *names)


def basename(path: str) -> str:
    """The last name of a path ('run' of '/a/run/' and of 'gs://b/a/run')."""
    path = str(path).rstrip("/")
    return posixpath.basename(path) if is_uri(path) else os.path.basename(os.path.normpath(path))


def dirname(path: str) -> str:
    """The directory holding `path` ('gs://b/a' of 'gs://b/a/x.json')."""
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(path)


def as_epath(path: str) -> epath.Path:
    """What Orbax, grain and the other libraries take for a path."""
    return epath.Path(path)


def exists(path: str) -> bool:
    """Whether a file or directory is at `path` (local or gs://)."""
    return epath.Path(path).exists() if is_uri(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    """Whether `path` is a file (local or gs://)."""
    return epath.Path(path).is_file() if is_uri(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    """Whether `path` is a directory (local or gs://)."""
    return epath.Path(path).is_dir() if is_uri(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """The names in a directory, sorted; [] if it does not exist (or vanished meanwhile)."""
    try:
        if is_uri(path):
            return sorted(p.name for p in epath.Path(path).iterdir())
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def mtime(path: str) -> float | None:
    """When the file was last written (seconds since the epoch), None if it does not exist."""
    try:
        return epath.Path(path).stat().mtime if is_uri(path) else os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def makedirs(path: str) -> None:
    """Creates a directory and its parents (on an object store: nothing to create)."""
    if is_uri(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def rmtree(path: str) -> None:
    """Deletes a directory and everything under it (local or gs://)."""
    if is_uri(path):
        epath.Path(path).rmtree()
    else:
        shutil.rmtree(path)


def remove(path: str) -> None:
    """Deletes one file (local or gs://)."""
    if is_uri(path):
        epath.Path(path).unlink()
    else:
        os.remove(path)


def rename(source: str, target: str) -> None:
    """Moves a file or directory (atomic locally; copied, then deleted, on an object store)."""
    if is_uri(source):
        epath.Path(source).rename(epath.Path(target))
    else:
        os.replace(source, target)


def read_text(path: str) -> str:
    """A file's contents as text (UTF-8 locally)."""
    return epath.Path(path).read_text() if is_uri(path) else _read(path, "r")


def read_bytes(path: str) -> bytes:
    """A file's contents as bytes (local or gs://)."""
    return epath.Path(path).read_bytes() if is_uri(path) else _read(path, "rb")


def _read(path: str, mode: str) -> str | bytes:
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        return f.read()


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory (`path.tmp-PID`),
    synced, then renamed over `path`. On any failure (a full disk, an interrupt) the temporary
    file is removed and the error re-raised, `path` left as it was; an OSError then names
    `path` (a failed write of an open file names none). On an object store: one upload."""
    if is_uri(path):
        epath.Path(path).write_text(text)
        return
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
    if is_uri(path):
        return f"cannot write {path}: {e.strerror or e}"
    free = shutil.disk_usage(nearest_existing(path)).free
    return f"cannot write {path}: {e.strerror or e} ({free:,} bytes free on that file system)"


def nearest_existing(path: str) -> str:
    """`path` if it exists, else its nearest existing parent directory."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def upload(local_path: str, path: str) -> None:
    """Copies the local file `local_path` to the URI `path` in one upload (gcsfs `put_file`): the
    object appears whole when the upload completes, so a kill before then leaves the object that
    was there, or none (never a part). For what cannot be written in place on an object store
    (an ArrayRecord shard: written locally, then uploaded)."""
    import fsspec

    fs, target = fsspec.core.url_to_fs(path)
    fs.put_file(local_path, target)


def size(path: str) -> int:
    """The size in bytes of the file at `path` (one metadata request on an object store);
    FileNotFoundError if there is none."""
    return epath.Path(path).stat().length if is_uri(path) else os.path.getsize(path)

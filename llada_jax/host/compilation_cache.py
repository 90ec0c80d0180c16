"""JAX's persistent compilation cache (`train.compilation_cache`): a restarted run, or a new run
of the same config, loads its compiled train step (and everything else it compiles) from disk
instead of compiling it again. `enable()` must run before the first compilation.

Settings: "auto" (the default) is $JAX_COMPILATION_CACHE_DIR where set, else
<cache dir>/jax_compilation (host/cache.py: ~/.cache/llada_jax/jax_compilation); a local
directory, made if needed; a gs:// path (JAX opens it with etils.epath, so gcsfs: the `gcs`
extra); "" turns the cache off, also one named by $JAX_COMPILATION_CACHE_DIR. JAX writes
entries from process 0 alone and every process reads: a pod's hosts need a shared directory
(gs://), or only process 0's compilations are skipped.

Every compilation is cached, however short (JAX skips those under a second by default, which on
a fast machine includes a small model's train step); JAX keys an entry by the program, the
jaxlib version, the platform, XLA flags, compile options and devices, and never evicts one by
default: the directory can be deleted at any time. On CPU the key does not include the
instruction set: XLA refuses an entry compiled for features this CPU lacks, and JAX warns and
compiles. JAX writes an entry in place: a process killed within the milliseconds of a write
leaves a torn entry, which JAX reports in a warning and compiles around at every start until
the file is deleted. A cache is code the process runs: JAX's documentation warns to share one
only with those trusted to run code on the machine.
"""

from __future__ import annotations

import os
import tempfile

import jax

from llada_jax import files
from llada_jax.host.cache import cache_dir

AUTO = "auto"


def directory(setting: str, key: str = "train.compilation_cache") -> str:
    """The cache directory a setting names ("" for off); ValueError (one line naming `key`)
    for a gs:// path without the gcs extra."""
    if setting == AUTO:
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
            cache_dir(), "jax_compilation"
        )
    try:
        return files.resolve(setting) if setting else ""
    except ValueError as e:
        raise ValueError(f"{key}={setting!r}: {e}") from None


def enable(setting: str, key: str = "train.compilation_cache") -> str:
    """Points JAX's persistent compilation cache at `setting`'s directory (checked: a local one
    is made and written to) or turns it off (""); returns the directory, "" for off."""
    path = directory(setting, key)
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return ""
    if not files.is_uri(path):
        try:
            os.makedirs(path, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise ValueError(
                f"{key}={setting!r}: cannot write the directory {path!r}: {e.strerror}; "
                f'name another, or "" for no cache'
            ) from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path

"""Files replaced in one step: a kill at any moment leaves the old file or the new one, never a
part of either (metrics.jsonl, config.json, prepared-data metadata and sidecars)."""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory (`path.tmp-PID`),
    synced, then renamed over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

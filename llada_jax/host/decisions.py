"""The decisions every process of a multi-process run takes together.

A choice that depends on files or clocks (which step to restore, whether a step
exists, whether it is time to save) can come out differently on each host (a shared
filesystem's attribute cache, an object store's listing during a save), and hosts that choose
differently deadlock in their next collective. `process_0_decides` takes such a choice once and
gives it to every process; `flags_of_every_process` lets every process see each one's flags
(a SIGINT that reached one of them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_0_decides(decide: Callable[[], Any]) -> Any:
    """`decide()` run on process 0 only, its result (anything JSON holds) returned on every
    process; a ValueError it raises is raised on every process, with its message. Every
    process calls it, at the same point; `decide` must not itself wait for the other
    processes (no collectives: Orbax's reads are)."""
    if jax.process_count() == 1:
        return decide()
    answer = b""
    if jax.process_index() == 0:
        try:
            answer = json.dumps({"value": decide()}).encode()
        except ValueError as e:
            answer = json.dumps({"error": str(e)}).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(answer))))
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = np.frombuffer(answer, np.uint8)
    received = json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())
    if "error" in received:
        raise ValueError(received["error"])
    return received["value"]


def flags_of_every_process(flags_F: Sequence[bool]) -> np.ndarray:
    """Each process's flags, (processes, F) bool, on every process (a collective: it waits for
    the devices' queued work). A single process gets its own as (1, F)."""
    mine = np.asarray(flags_F, bool)
    if jax.process_count() == 1:
        return mine[None]
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)

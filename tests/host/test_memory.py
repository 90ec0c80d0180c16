"""glibc malloc settings of CPU runs: a large block freed by a worker thread stays in the heap."""

import json
import os
import subprocess
import sys

import pytest

from llada_jax.host import memory as host_memory

# A 256 MiB block malloc'ed, written and freed on a worker thread (as XLA:CPU's executor does
# with a step's temporary buffer); prints whether the settings were applied and glibc's counters.
PROBE = """
import ctypes, json, runpy, sys, threading
from llada_jax.host import memory as host_memory
if sys.argv[1].startswith("tools/"):  # the tool's main, on a bad flag (it exits 2)
    tool, sys.argv = sys.argv[1], [sys.argv[1], "--no_such_flag=1"]
    try:
        runpy.run_path(tool, run_name="__main__")
    except SystemExit as e:
        assert e.code == 2, e.code
    applied = None
else:
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
size = 256 << 20
during = {}

def work():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    during["mmapped"] = libc.mallinfo2().hblkhd
    libc.free(block)

thread = threading.Thread(target=work)
thread.start()
thread.join()
after = libc.mallinfo2()
print(json.dumps(dict(applied=applied, size=size, mmapped_during=during["mmapped"],
                      heap_free_after=after.fordblks)))
"""


def probe(mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_block_stays_in_heap_only_with_the_settings():
    default, keep = probe("default"), probe("keep")
    # glibc's default: the block is mmapped, and its memory goes back to the kernel on free.
    assert not default["applied"] and default["mmapped_during"] >= default["size"]
    assert default["heap_free_after"] < default["size"]
    # Kept: served from the heap, and still there (free, resident) for the next allocation.
    assert keep["applied"] and keep["mmapped_during"] < keep["size"]
    assert keep["heap_free_after"] >= keep["size"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize(
    "tool", ["tools/evaluate.py", "tools/sample.py", "tools/lm_eval_harness.py"]
)
def test_the_cpu_tools_keep_freed_memory(tool):
    """The evaluation job, the sampler and the lm-eval command line set the trainer's malloc
    settings first thing: a large block freed after their main has run stays in the heap."""
    if "lm_eval" in tool:
        pytest.importorskip("lm_eval")
    out = probe(tool)
    assert out["mmapped_during"] < out["size"] <= out["heap_free_after"]


@pytest.mark.parametrize(
    "platforms, expected",
    [("cpu", True), ("cpu,tpu", False), ("tpu", False), ("cuda", False), (" cpu ", True)],
)
def test_cpu_only_follows_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.cpu_only() is expected


def test_accelerator_runs_are_left_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize(
    "vendors, plugin, expected",
    [
        ([], True, True),  # libtpu installed (the `tpu` extra, for AOT checks) on a CPU-only host
        (["0x8086", "0x1af4"], True, True),
        (["0x8086", "0x1ae0"], True, False),  # a TPU chip (Google's PCI vendor id)
        (["0x10de"], True, False),  # an NVIDIA GPU
        (["0x10de"], False, True),  # a GPU, but no JAX plugin to drive it
    ],
)
def test_cpu_only_without_jax_platforms_looks_for_a_device(
    monkeypatch, tmp_path, vendors, plugin, expected
):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    for i, vendor in enumerate(vendors):
        (tmp_path / f"0000:00:0{i}.0").mkdir()
        (tmp_path / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
    monkeypatch.setattr(host_memory, "PCI_DEVICES", str(tmp_path))
    monkeypatch.setattr(host_memory, "_plugin_installed", lambda: plugin)
    assert host_memory.cpu_only() is expected

"""Shared command-line plumbing for the launchers (standard library only: no jax, no network).

Launcher flags come before `--`, the training flags (passed to `python -m llada_jax.train`
unchanged) after it. Bad arguments are one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set by the launchers themselves (or, on TPU pods and SLURM, detected by JAX); a user value
# would contradict the launcher's.
DISTRIBUTED_FLAGS = ("--coordinator", "--num_processes", "--process_id")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with absl-style booleans and one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        fail(message)


def fail(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def boolean(value: str) -> bool:
    """`--flag`, `--flag=true`, `--flag=false` (absl spelling)."""
    v = value.lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_bool(parser: argparse.ArgumentParser, name: str, help: str, default: bool = False):
    parser.add_argument(
        f"--{name}", type=boolean, nargs="?", const=True, default=default, help=help
    )


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, training flags): everything after the first `--` is for the trainer."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def reject_flags(train_args: list[str], names: tuple[str, ...], why: str):
    for a in train_args:
        if flag_name(a) in names:
            raise UsageError(f"{flag_name(a)} in the training flags: {why}")


def positive(name: str, value, minimum=1):
    if value is None or value < minimum:
        raise UsageError(f"--{name}={value} must be >= {minimum}")


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """One copy-pasteable shell line: `K=V ... cmd args`, every word quoted as needed."""
    assigns = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(assigns + [shlex.join(argv)]) if assigns else shlex.join(argv)


def xla_device_count(inherited: str, devices: int) -> str:
    """XLA_FLAGS giving `devices` fake CPU devices, the inherited flags otherwise kept."""
    kept = [f for f in inherited.split() if f.split("=", 1)[0] != DEVICE_COUNT_FLAG]
    return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])


def gpu_groups(n: int, per: int, inherited: str | None, asked: str) -> list[str]:
    """`n` consecutive groups of `per` GPUs, as CUDA_VISIBLE_DEVICES values, counted within an
    inherited CUDA_VISIBLE_DEVICES if any. `asked` names the flags in the error."""
    visible = (
        [g for g in inherited.split(",") if g]
        if inherited is not None
        else [str(i) for i in range(n * per)]
    )
    if len(visible) < n * per:
        raise UsageError(
            f"{asked} needs {n * per} GPUs but CUDA_VISIBLE_DEVICES={inherited} has {len(visible)}"
        )
    return [",".join(visible[i * per : (i + 1) * per]) for i in range(n)]


def pump_lines(pipe, out, prefix: bytes, lock: threading.Lock):
    """Copies each line of `pipe` to `out` with `prefix`, one whole line at a time."""
    for line in iter(pipe.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with lock:
            out.write(prefix + line)
            out.flush()
    pipe.close()

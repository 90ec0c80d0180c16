"""Bad input the trainer refuses at start, before it compiles anything: a config file it cannot
load, nonsense values, a read-only workdir and a full disk. Each is one error line on stderr and
exit 2, with no traceback, and what the workdir held stays as it was (real subprocesses)."""

import errno
import os
import re
import subprocess
import sys

import pytest

from llada_jax import config, files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def train(workdir: str, *args: str, config_path: str = TINY) -> subprocess.CompletedProcess:
    """The trainer on `workdir` with tiny.py (or `config_path`) and `args`."""
    cmd = [sys.executable, "-m", "llada_jax.train", f"--config={config_path}"]
    cmd += [f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def error_line(returncode: int, stderr: str) -> str:
    """The one line a refused run printed (asserting exit 2, one line and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def snapshot(directory: str) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes)."""
    out = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def previous_run(tmp_path) -> str:
    """A workdir a previous run left: its config.json, metrics and lock file."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 0}\n')
    (workdir / "metrics.jsonl").write_text('{"step": 2, "loss": 8.3}\n')
    (workdir / "writer.lock").write_text("12345\n")
    return str(workdir)


# --------------------------------------------------------------------------------------------
# 1. A config file that cannot be loaded
# --------------------------------------------------------------------------------------------
CONFIG_FILES = {
    "not_python": ("tiny.json", '{"seed": 0}\n', "is not a Python file; expected a .py file"),
    "directory": ("configs_dir", None, "is a directory; expected a .py file"),
    "syntax_error": ("bad.py", "x = 1\ndef get_config(:\n", "bad.py:2: "),
    "import_error": ("imp.py", "import no_such_module_xyz\n", "imp.py:1: ModuleNotFoundError"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_config_file_that_cannot_be_loaded(tmp_path, previous_run, case):
    """Today's AttributeError/SyntaxError tracebacks (and 'does not exist' for a directory) are
    one line naming the file, and the line of a syntax or import error."""
    name, text, message = CONFIG_FILES[case]
    path = tmp_path / name
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)
    before = snapshot(previous_run)
    proc = train(previous_run, config_path=str(path))
    line = error_line(proc.returncode, proc.stderr)
    assert str(path) in line and message in line, line
    assert snapshot(previous_run) == before


# --------------------------------------------------------------------------------------------
# 2. Nonsense values
# --------------------------------------------------------------------------------------------
NONSENSE = [
    ("optim.grad_accum=0", "optim.grad_accum=0 is invalid; valid: an integer >= 1"),
    ("train.log_every=0", "train.log_every=0 is invalid; valid: an integer >= 1"),
    (
        "checkpoint.max_to_keep=-1",
        "checkpoint.max_to_keep=-1 is invalid; valid: a positive integer, or None to keep "
        "every checkpoint",
    ),
    (
        "checkpoint.max_to_keep=0",
        "checkpoint.max_to_keep=0 is invalid; valid: a positive integer, or None to keep "
        "every checkpoint",
    ),
    (
        "checkpoint.keep_every=-3",
        "checkpoint.keep_every=-3 is invalid; valid: an integer >= 0 (0 or None: none kept "
        "beyond checkpoint.max_to_keep)",
    ),
    ("checkpoint.save_every=-1", "checkpoint.save_every=-1 is invalid; valid: an integer >= 0"),
    (
        "checkpoint.wait_for_writer_sec=-1",
        "checkpoint.wait_for_writer_sec=-1.0 is invalid; valid: a number of seconds >= 0",
    ),
    ("data.workers=-1", "data.workers=-1 is invalid; valid: an integer >= 0"),
    ("data.prefetch=-1", "data.prefetch=-1 is invalid; valid: an integer >= 0"),
    (
        "train.max_skipped_in_a_row=-1",
        "train.max_skipped_in_a_row=-1 is invalid; valid: an integer >= 0",
    ),
    # Found by scanning the other sections' counts.
    ("seed=-1", "seed=-1 is invalid; valid: an integer >= 0"),
    ("data.seq_len=0", "data.seq_len=0 is invalid; valid: an integer >= 1"),
    ("data.batch_size=0", "data.batch_size=0 is invalid; valid: an integer >= 1"),
    ("sample.num_samples=-1", "sample.num_samples=-1 is invalid; valid: an integer >= 0"),
    ("eval.limit=-1", "eval.limit=-1 is invalid; valid: an integer >= 0 (0: all)"),
]


@pytest.mark.parametrize("override,message", NONSENSE, ids=[o for o, _ in NONSENSE])
def test_nonsense_value_is_refused_at_start(previous_run, override, message):
    """Values accepted today (and trained with), or refused late or with a traceback: one line
    naming the key as typed and what is valid, before anything is compiled or written."""
    before = snapshot(previous_run)
    proc = train(previous_run, f"--config.{override}")
    assert error_line(proc.returncode, proc.stderr) == f"error: {message}"
    assert snapshot(previous_run) == before


def test_none_keeps_every_checkpoint_on_the_command_line():
    """`--config.checkpoint.max_to_keep=None` is how 'keep every checkpoint' is typed (today a
    type error); None stays refused for a key without that meaning."""
    c = config.load(TINY, [("checkpoint.max_to_keep", "None"), ("checkpoint.keep_every", "5")])
    assert c.checkpoint.max_to_keep is None and c.checkpoint.keep_every == 5
    c = config.load(TINY, [("checkpoint.max_to_keep", "None"), ("checkpoint.max_to_keep", "7")])
    assert c.checkpoint.max_to_keep == 7
    with pytest.raises(config.ConfigError, match="config.model.d_model=None is not a valid int"):
        config.load(TINY, [("model.d_model", "None")])


# --------------------------------------------------------------------------------------------
# 3 and 4. A read-only workdir, a full disk
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def private_mounts(tmp_path_factory) -> None:
    """Skips unless this machine lets an unprivileged user and mount namespace mount a tmpfs
    (`unshare`): as root, chmod does not stop writes, a read-only mount does."""
    script = 'mount -t tmpfs tmpfs "$1" && touch "$1/x" && mount -o remount,ro "$1"'
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
    try:
        target = str(tmp_path_factory.mktemp("probe"))
        proc = subprocess.run(cmd + [target], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {proc.stderr.strip()}")


def train_on_tmpfs(tmp_path, size: str, prepare: str, ro: bool) -> tuple[str, dict, dict]:
    """Mounts a fresh tmpfs of `size` at $FS in a private user and mount namespace, runs the sh
    commands `prepare`, remounts it read-only if `ro`, and runs the trainer on $FS/run.
    Returns the trainer's error line and the files on $FS before and after it ran."""
    fs, before, after, err, rc = (str(tmp_path / n) for n in ("fs", "before", "after", "err", "rc"))
    for d in (fs, before, after):
        os.mkdir(d)
    script = f"""set -e
mount -t tmpfs -o size={size} tmpfs "$FS"
{prepare}
cp -a "$FS/." "$BEFORE"
{'mount -o remount,ro "$FS"' if ro else ""}
set +e
"$PY" -m llada_jax.train --config="$TINY" --workdir="$FS/run" 2>"$ERR"
echo $? >"$RC"
cp -a "$FS/." "$AFTER"
"""
    env = dict(os.environ, FS=fs, BEFORE=before, AFTER=after, ERR=err, RC=rc)
    env.update(PY=sys.executable, TINY=TINY)
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and os.path.exists(rc), proc.stderr[-3000:]
    with open(rc) as f, open(err) as g:
        line = error_line(int(f.read()), g.read())
    return line.replace(fs, "$FS"), snapshot(before), snapshot(after)


@pytest.mark.parametrize("exists", [True, False], ids=["existing_workdir", "new_workdir"])
def test_read_only_workdir(tmp_path, private_mounts, exists):
    """Today an OSError traceback from writer.lock; now one line naming --workdir and the OS's
    reason, and nothing on the file system changed."""
    prepare = 'mkdir "$FS/run" && echo "{}" >"$FS/run/config.json"' if exists else ":"
    line, before, after = train_on_tmpfs(tmp_path, "1m", prepare, ro=True)
    where = "is not writable" if exists else "cannot be created in '$FS'"
    assert line == f"error: --workdir='$FS/run' {where}: Read-only file system"
    assert after == before


# Which write fails on a full disk: the lock file's pid (a fresh workdir), or config.json (a
# workdir whose lock file already holds a pid: truncating and rewriting it needs no new space).
FULL_DISK = {"lock_file": ("", "$FS/run"), "config_json": ("12345", "$FS/run/config.json")}


@pytest.mark.parametrize("case", FULL_DISK)
def test_full_disk_at_start(tmp_path, private_mounts, case):
    """Today a traceback and a leftover config.json.tmp-PID; now one line naming the file, why,
    and the free space, and the previous run's config.json as it was."""
    lock, path = FULL_DISK[case]
    prepare = (
        'mkdir "$FS/run" && echo \'{"seed": 0}\' >"$FS/run/config.json"\n'
        + (f'echo {lock} >"$FS/run/writer.lock"\n' if lock else "")
        + 'dd if=/dev/zero of="$FS/fill" bs=4k 2>/dev/null || true'
    )
    line, before, after = train_on_tmpfs(tmp_path, "256k", prepare, ro=False)
    assert re.fullmatch(
        rf"error: cannot write {re.escape(path)}: No space left on device "
        r"\(\d[\d,]* bytes free on that file system\)",
        line,
    ), line
    assert after["run/config.json"] == before["run/config.json"] == b'{"seed": 0}\n'
    assert not [name for name in after if ".tmp-" in name], sorted(after)


def test_write_atomically_removes_its_temporary_file(tmp_path, monkeypatch):
    """A write that fails (here at the sync) leaves the old file and no temporary one, and the
    error names the file being written."""
    path = tmp_path / "config.json"
    path.write_text("old\n")

    def fail(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", fail)
    with pytest.raises(OSError) as e:
        files.write_atomically(str(path), "new\n")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert os.listdir(tmp_path) == ["config.json"] and path.read_text() == "old\n"

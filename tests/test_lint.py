"""The repository passes its linter and is formatted as `ruff format` writes it (ruff.toml)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ruff = shutil.which("ruff")
needs_ruff = pytest.mark.skipif(ruff is None, reason='ruff comes with the test extra (".[test]")')


@needs_ruff
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    proc = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

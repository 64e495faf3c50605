"""Ruff runs as part of the test command, so lint and format drift fail the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.stack import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    ruff = shutil.which("ruff")
    argv = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    return subprocess.run([*argv, *args], cwd=REPO, capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    "args", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"]
)
def test_ruff_is_clean(args: tuple[str, ...]) -> None:
    result = _ruff(*args)
    assert result.returncode == 0, result.stdout + result.stderr

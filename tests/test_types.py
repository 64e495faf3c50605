"""mypy runs as part of the test command, so a type error fails the suite like a lint error.

The configuration (strict on shared/, the default mode elsewhere) is `[tool.mypy]` in
pyproject.toml; running `mypy` with no arguments in the repo checks the same packages.
"""

from __future__ import annotations

import subprocess
import sys

from tests.stack import REPO

PACKAGES = ("api", "worker", "shared", "forklift")


def test_mypy_is_clean() -> None:
    packages = [name for name in PACKAGES if (REPO / name).is_dir()]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *packages],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""mypy runs as part of the test command, so a type error fails the suite like a lint error.

The configuration (strict on shared/, the default mode elsewhere) is `[tool.mypy]` in
pyproject.toml; running `mypy` with no arguments in the repo checks the same files.
`tests/store_types.py` pins what the stores' methods return for each kind of client.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHECKED = ("api", "worker", "shared", "forklift", "tests/store_types.py")


def test_mypy_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *CHECKED],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

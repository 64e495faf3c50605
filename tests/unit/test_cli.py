"""The `forklift` command as installed: its help lists every command, `--version` answers."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from shared.client.cli import COMMANDS

FORKLIFT = Path(sys.executable).with_name("forklift")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FORKLIFT), *argv], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_up_with_every_other_command() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    listed = set(re.findall(r"^    (\w+)\s", done.stdout, re.M))
    assert listed == {"up", *COMMANDS}, done.stdout


def test_version_is_the_installed_distribution() -> None:
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"forklift {metadata.version('forklift')}"


def test_global_options_stand_before_up() -> None:
    done = _run("--url", "http://127.0.0.1:9", "--json", "up", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: forklift up" in done.stdout
    assert "--redis-port" in done.stdout


def test_a_usage_error_exits_2() -> None:
    done = _run("up", "--no-such-option")
    assert done.returncode == 2
    assert "unrecognized arguments: --no-such-option" in done.stderr

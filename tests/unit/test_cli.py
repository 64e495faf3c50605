"""The `forklift` command as installed: its help lists every command, `--version` answers,
usage errors exit 2, the client options stand before or after a command, and the shell
completion click generates completes the commands."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from rich.console import Console

from forklift.cli import CLIENT_COMMANDS, cli
from forklift.progress import Bars

FORKLIFT = Path(sys.executable).with_name("forklift")


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FORKLIFT), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _listed(help_text: str) -> set[str]:
    section = help_text.split("Commands:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^  ([\w-]+)\s", section, re.M))


def test_help_lists_up_with_every_other_command() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    assert _listed(done.stdout) == {"up", "completion", *CLIENT_COMMANDS}, done.stdout
    assert set(CLIENT_COMMANDS) == {
        "submit", "wait", "status", "cancel", "put", "get", "delete", "tasks",
        "schedule", "schedules", "unschedule", "jobs", "delete-job",
    }  # fmt: skip
    assert set(cli.commands) == {"up", "completion", *CLIENT_COMMANDS}


def test_version_is_the_installed_distribution() -> None:
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"forklift {metadata.version('forklift')}"


def test_global_options_stand_before_up() -> None:
    done = _run("--url", "http://127.0.0.1:9", "--json", "up", "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: forklift up" in done.stdout
    assert "--redis-port" in done.stdout
    assert "--env-file" in done.stdout


def test_a_usage_error_exits_2() -> None:
    done = _run("up", "--no-such-option")
    assert done.returncode == 2
    assert "No such option '--no-such-option'" in done.stderr
    unknown = _run("frobnicate")
    assert unknown.returncode == 2
    assert "No such command 'frobnicate'" in unknown.stderr


def test_client_options_before_or_after_the_command_and_from_the_environment() -> None:
    # Nothing listens on these ports: each run fails to connect, and says where it tried.
    env_url, top_url, sub_url = (f"http://127.0.0.1:{port}" for port in (9, 7, 5))
    env = {"FORKLIFT_URL": env_url}
    cases = [
        ((), env_url),
        (("--url", top_url), top_url),
        (("--url", top_url, "tasks", "--url", sub_url), sub_url),
    ]
    for options, expected in cases:
        argv = [*options, "tasks"] if "tasks" not in options else list(options)
        done = _run(*argv, "--retry-for", "0", env=env)
        assert done.returncode == 4, done.stderr
        assert "cannot reach" in done.stderr and expected in done.stderr, (argv, done.stderr)


def test_shell_completion_completes_the_commands() -> None:
    script = _run("completion", "bash")
    assert script.returncode == 0, script.stderr
    assert "_FORKLIFT_COMPLETE=bash_complete" in script.stdout
    # What the script asks the command for when the user types `forklift su<TAB>`.
    done = _run(
        env={"_FORKLIFT_COMPLETE": "bash_complete", "COMP_WORDS": "forklift su", "COMP_CWORD": "1"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["plain,submit"]
    for shell in ("zsh", "fish"):
        assert _run("completion", shell).returncode == 0


def test_bars_fit_the_terminal_and_stay_off_without_one() -> None:
    width = 72
    out = io.StringIO()
    bars = Bars(console=Console(file=out, force_terminal=True, width=width, color_system=None))
    with bars.transfer("put x.npy", 8 << 20) as progress:
        progress(4 << 20, 8 << 20)
        progress(8 << 20, None)  # a total left unsaid keeps the one known
    with bars.job("sleep 1a2b3c4d") as bar:
        bar.update("running", {"fraction": 0.5, "note": "half way"})
        bar.update("succeeded", None)
    lines = [line for line in re.split(r"[\r\n]", out.getvalue()) if line.strip()]
    text = "\n".join(lines)
    assert "put x.npy" in text and "8.0/8.0 MiB" in text, text
    assert "50%" in text and "half way" in text and "100%" in text and "succeeded" in text
    assert max(len(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line)) for line in lines) <= width
    # Not a terminal (this test's own stdout is captured): nothing drawn, callbacks no-ops.
    quiet = Bars()
    assert not quiet.enabled
    with quiet.transfer("put", 10) as progress:
        progress(10, 10)

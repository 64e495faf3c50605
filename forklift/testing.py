"""A real forklift stack for your own tests, as `celery.contrib.testing` is for Celery's.

    from forklift.testing import running_stack

    def test_double() -> None:
        with running_stack("myproject.jobs") as stack, stack.client() as fl:
            assert fl.submit("double", x=21).result(timeout=60) == 42

`running_stack` starts a private redis-server on a spare port (or uses the Redis you give it),
a Celery prefork worker and the API, each in its own process group, and stops them all by pid
when the block ends. The stack has its own key prefix, queue and shared-memory prefix, so it
never touches a forklift already running on the machine, and on exit the segments left under
its prefix are unlinked (and listed in `Stack.leaked_segments`, for a test to assert on).
forklift's own test suite runs on this harness.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forklift import Client
from forklift.supervisor import (
    QUIET_WORKER_OPTIONS,
    Proc,
    Supervisor,
    processes_with_env,
)
from shared.arrays.segments import list_segments, unlink_segment
from shared.settings import Settings


def isolated_env(
    redis_url: str,
    settings: Mapping[str, str] | None = None,
    *,
    job_modules: str | Sequence[str] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a private stack on `redis_url`: `base` (this process's environment
    by default) without its FORKLIFT_* settings, then a key prefix, a queue and an shm prefix
    of its own, the job modules, and `settings` (FORKLIFT_* names) on top.

    A queue of its own: stacks sharing a Redis and a queue name take each other's jobs.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items()}
    for key in list(env):
        if key.startswith("FORKLIFT_"):
            del env[key]
    modules = [job_modules] if isinstance(job_modules, str) else list(job_modules)
    tag = uuid.uuid4().hex[:8]
    env.update(
        {
            "REDIS_URL": redis_url,
            "FORKLIFT_KEY_PREFIX": f"forklift-test-{tag}",
            "FORKLIFT_QUEUE": f"forklift-test-{tag}-queue",
            "FORKLIFT_SHM_PREFIX": f"forklift_t{tag}_",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if modules:
        env["FORKLIFT_JOB_MODULES"] = ",".join(modules)
    env.update(settings or {})
    return env


def segments(prefix: str) -> set[str]:
    """Names of the /dev/shm segments under `prefix`."""
    return set(list_segments(prefix))


@dataclass(eq=False)
class Stack:
    """A running private stack. `worker` and `api` may be replaced by a test (a restart); the
    current ones and every process the harness started are stopped at the end."""

    env: dict[str, str]
    url: str
    redis_url: str
    worker: Proc
    api: Proc
    redis: Proc | None = None  # None on a Redis the caller gave
    leaked_segments: list[str] = field(default_factory=list)
    stray_pids: list[int] = field(default_factory=list)

    @property
    def key_prefix(self) -> str:
        return self.env["FORKLIFT_KEY_PREFIX"]

    @property
    def shm_prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def client(self, **options: Any) -> Client:
        """A `forklift.Client` for this stack (close it, or use it in a `with`)."""
        return Client(self.url, **options)


@contextlib.contextmanager
def running_stack(
    job_modules: str | Sequence[str] = (),
    *,
    concurrency: int = 2,
    redis_url: str | None = None,
    env: Mapping[str, str] | None = None,
    name: str = "main",
    supervisor: Supervisor | None = None,
) -> Iterator[Stack]:
    """Redis (unless `redis_url`), a worker pool of `concurrency` and the API, until the block
    ends. `env` adds settings (`FORKLIFT_*`) to the stack's private environment; `supervisor`
    says where the processes run and log (default: this directory, logs in a temporary one)."""
    sup = supervisor or Supervisor(worker_options=QUIET_WORKER_OPTIONS)
    redis_proc: Proc | None = None
    if redis_url is None:
        redis_proc, redis_url = sup.start_redis()
    started: list[Proc] = []
    running: Stack | None = None
    try:
        stack_env = isolated_env(redis_url, env, job_modules=job_modules)
        before = segments(stack_env["FORKLIFT_SHM_PREFIX"])
        worker, api, url = sup.start_worker_and_api(stack_env, name, concurrency)
        started += [worker, api]
        running = Stack(stack_env, url, redis_url, worker, api, redis_proc)
        yield running
    finally:
        # The current api and worker first (a test may have replaced them), then the rest.
        current = [running.api, running.worker] if running is not None else []
        for proc in [*current, *reversed(started)]:
            proc.stop()
        if running is not None:
            stray = processes_with_env("FORKLIFT_KEY_PREFIX", running.key_prefix)
            for pid in stray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            running.stray_pids = sorted(stray)
            left = segments(running.shm_prefix) - before
            for segment in left:
                unlink_segment(segment)
            running.leaked_segments = sorted(left)
        if redis_proc is not None:
            redis_proc.stop()

"""Session fixtures: one private Redis, one worker pool and one API for the integration tests.

The stack keeps to its own redis-server (a spare port), its own key prefix and its own
shared-memory prefix, so a running forklift on this machine is never disturbed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from shared.metrics import queue_keys
from shared.settings import Settings
from tests import stack


@dataclass
class Stack:
    env: dict[str, str]
    url: str
    redis: redis.Redis
    worker: stack.Proc
    api: stack.Proc

    @property
    def shm_prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]

    @property
    def key_prefix(self) -> str:
        return self.env["FORKLIFT_KEY_PREFIX"]

    def queue_lengths(self) -> int:
        """Messages waiting in this stack's queues: its own and its shm domain's (only those:
        other stacks on the same Redis have queues of their own)."""
        settings = Settings.from_env(self.env)
        queues = (settings.queue, settings.domain_queue())
        return sum(self.redis.llen(key) for queue in queues for key in queue_keys(queue))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("FORKLIFT_TEST_REDIS_URL"):
        yield os.environ["FORKLIFT_TEST_REDIS_URL"]
        return
    proc, url = stack.start_redis()
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def live(redis_url: str) -> Iterator[Stack]:
    env = stack.stack_env(redis_url, FORKLIFT_JANITOR_INTERVAL="2")
    before = stack.segments(env["FORKLIFT_SHM_PREFIX"])
    worker, api, url = stack.start_worker_and_api(env, "main", concurrency=2)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    running = Stack(env=env, url=url, redis=client, worker=worker, api=api)
    try:
        yield running
    finally:
        # Tests may replace the stack's processes (restart a worker): stop the current ones.
        running.api.stop()
        running.worker.stop()
        worker.stop()
        stray = stack.processes_with_env("FORKLIFT_KEY_PREFIX", env["FORKLIFT_KEY_PREFIX"])
        for pid in stray:
            os.kill(pid, 9)
        assert not stray, f"the test session left processes running: {sorted(stray)}"
        left = stack.segments(env["FORKLIFT_SHM_PREFIX"]) - before
        for name in left:
            (stack.Path("/dev/shm") / name).unlink(missing_ok=True)
        assert not left, f"the test session leaked shared-memory segments: {sorted(left)}"


@pytest.fixture
def http(live: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client

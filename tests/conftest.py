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

from forklift import testing
from shared.keys import queue_keys
from shared.settings import Settings
from tests import stack


@dataclass
class Stack:
    """The session's stack (forklift.testing's), with a Redis client on its database."""

    running: testing.Stack
    redis: redis.Redis

    @property
    def env(self) -> dict[str, str]:
        return self.running.env

    @property
    def url(self) -> str:
        return self.running.url

    # Tests may replace the stack's processes (restart a worker): the harness stops the
    # current ones and every one it started.
    @property
    def worker(self) -> stack.Proc:
        return self.running.worker

    @worker.setter
    def worker(self, proc: stack.Proc) -> None:
        self.running.worker = proc

    @property
    def api(self) -> stack.Proc:
        return self.running.api

    @api.setter
    def api(self, proc: stack.Proc) -> None:
        self.running.api = proc

    @property
    def shm_prefix(self) -> str:
        return self.running.shm_prefix

    @property
    def key_prefix(self) -> str:
        return self.running.key_prefix

    @property
    def on_amqp(self) -> bool:
        """The session runs on RabbitMQ (FORKLIFT_TEST_BROKER=amqp): no kombu keys in Redis."""
        return Settings.from_env(self.env).broker_is_amqp

    def queue_lengths(self) -> int:
        """Messages waiting in this stack's queues: its own and its shm domain's (only those:
        other stacks on the same Redis have queues of their own)."""
        settings = Settings.from_env(self.env)
        queues = (settings.queue, settings.domain_queue())
        if settings.broker_is_amqp:
            return sum(stack.amqp_depths(settings.broker, queues).values())
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
def broker_env() -> Iterator[dict[str, str]]:
    """The session stack's broker: Redis (the default), or with FORKLIFT_TEST_BROKER=amqp a
    RabbitMQ vhost of the session's own, deleted afterwards (tests/stack.py amqp_vhost)."""
    choice = os.environ.get("FORKLIFT_TEST_BROKER", "redis")
    if choice == "redis":
        yield {}
        return
    if choice != "amqp":
        raise pytest.UsageError(f"FORKLIFT_TEST_BROKER must be redis or amqp, not {choice!r}")
    if not stack.rabbitmq_available():
        raise pytest.UsageError("FORKLIFT_TEST_BROKER=amqp needs RabbitMQ and rabbitmqctl")
    with stack.amqp_vhost() as (_, url):
        yield {"FORKLIFT_BROKER_URL": url}


@pytest.fixture(scope="session")
def live(redis_url: str, broker_env: dict[str, str]) -> Iterator[Stack]:
    harness = testing.running_stack(
        stack.JOB_MODULES,
        redis_url=redis_url,
        env={"FORKLIFT_JANITOR_INTERVAL": "2", **broker_env},
        supervisor=stack.SUPERVISOR,
    )
    with harness as running:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            yield Stack(running=running, redis=client)
        finally:
            client.close()
    assert not running.stray_pids, f"the test session left processes running: {running.stray_pids}"
    assert not running.leaked_segments, (
        f"the test session leaked shared-memory segments: {running.leaked_segments}"
    )


@pytest.fixture
def http(live: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client

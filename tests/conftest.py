"""Session fixtures: one private Redis, one worker pool and one API for the integration tests.

The stack keeps to its own redis-server (a spare port), its own key prefix and its own
shared-memory prefix, so a running forklift on this machine is never disturbed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
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


BROKERS = ("redis", "amqp")


def default_broker() -> str:
    """The broker of the session's stack: Redis, or what FORKLIFT_TEST_BROKER names."""
    choice = os.environ.get("FORKLIFT_TEST_BROKER", "redis")
    if choice not in BROKERS:
        raise pytest.UsageError(f"FORKLIFT_TEST_BROKER must be redis or amqp, not {choice!r}")
    return choice


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `both_brokers` runs each of its tests that use the stack twice, on the
    Redis broker and on RabbitMQ (`test_x[redis]`, `test_x[amqp]`): the modules where the
    transport matters (delivery, acks, redelivery, priorities, cancel). The others run on
    the default broker only, so the suite stays one pass."""
    if "live" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_brokers"):
        metafunc.parametrize("live", BROKERS, indirect=True, scope="module")


@contextlib.contextmanager
def running_on(redis_url: str, broker: str) -> Iterator[Stack]:
    """A stack on `broker`: Celery's messages in the session's Redis, or in a RabbitMQ vhost of
    its own, deleted afterwards (tests/stack.py amqp_vhost). Checked afterwards: no process
    left running, no segment leaked."""
    with contextlib.ExitStack() as cleanup:
        broker_env: dict[str, str] = {}
        if broker == "amqp":
            _, url = cleanup.enter_context(stack.amqp_vhost())
            broker_env = {"FORKLIFT_BROKER_URL": url}
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
        assert not running.stray_pids, f"the stack left processes running: {running.stray_pids}"
        assert not running.leaked_segments, (
            f"the stack leaked shared-memory segments: {running.leaked_segments}"
        )


@pytest.fixture(scope="session")
def stacks(redis_url: str) -> Iterator[Callable[[str], Stack]]:
    """The session's stacks, one per broker, each started when a test first needs it."""
    with contextlib.ExitStack() as started:
        by_broker: dict[str, Stack] = {}

        def on(broker: str) -> Stack:
            if broker not in by_broker:
                by_broker[broker] = started.enter_context(running_on(redis_url, broker))
            return by_broker[broker]

        yield on


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, stacks: Callable[[str], Stack]) -> Stack:
    """The stack a test runs against: the default broker's, or in a `both_brokers` module the
    broker of its parameter."""
    broker = getattr(request, "param", None) or default_broker()
    if broker == "amqp" and not stack.rabbitmq_available():
        pytest.skip("needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl")
    return stacks(broker)


@pytest.fixture
def http(live: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client

"""Hands a job to Celery. Publishing is blocking I/O (kombu), so it runs in a thread, one
batch of whatever the process's requests publish meanwhile per trip (`enqueue_many`).

The API publishes with its own Celery app (`shared/celery_app.py:create_app`, one per broker URL,
kept for the process so its producer pool stays warm); it never imports the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Collection

import redis
from anyio import to_thread
from celery import Celery
from kombu import Producer

from shared.amqp_confirms import confirmed_together
from shared.celery_app import create_app, task_name
from shared.redis_io import REDIS_ERRORS, sync_redis
from shared.schemas import MAX_PRIORITY, TaskPayload
from shared.settings import Settings
from shared.workers import WorkerStore

log = logging.getLogger("forklift.api")


def route(settings: Settings, payload: TaskPayload, live: Collection[str] | None = None) -> str:
    """Jobs whose array inputs all live in one shm domain run there (no copy) while a worker
    of that domain is alive (`live`: domains with a fresh heartbeat; None = assume so); the
    rest go to the common queue, which every worker consumes, and pull what they lack.
    A part of a parallel job runs where its job's output segment lives, and waits there."""
    if payload.output is not None:
        return settings.domain_queue(payload.output.domain)
    domains = {ref.domain for ref in payload.inputs.values()}
    if len(domains) == 1:
        domain = domains.pop()
        if live is None or domain in live:
            return settings.domain_queue(domain)
    return settings.queue


def broker_priority(priority: int, amqp: bool = False) -> int:
    """forklift's 0..9 (higher first) as the message priority: kombu's Redis transport
    serves its lowest number first (shared/keys.py: one list per step); RabbitMQ serves the
    highest first, up to the queues' x-max-priority (shared/celery_app.py), so as is."""
    return priority if amqp else MAX_PRIORITY - priority


_clients: dict[str, redis.Redis] = {}
_apps: dict[str, Celery] = {}


def _app(settings: Settings) -> Celery:
    """One Celery app per broker URL, shared by the threads that publish."""
    app = _apps.get(settings.broker)
    if app is None:
        app = _apps.setdefault(settings.broker, create_app(settings))
    return app


def _client(settings: Settings) -> redis.Redis:
    """One blocking client per Redis URL, shared by the threads that publish."""
    client = _clients.get(settings.redis_url)
    if client is None:
        client = _clients.setdefault(settings.redis_url, sync_redis(settings))
    return client


def _live(settings: Settings, payloads: list[TaskPayload]) -> set[str] | None:
    """Live domains, asked only when a job has inputs in one domain (blocking: in a thread)."""
    if not any(len({ref.domain for ref in p.inputs.values()}) == 1 for p in payloads):
        return None
    try:
        domains: set[str] = WorkerStore(_client(settings), settings).live_domains()
        return domains
    except REDIS_ERRORS as exc:  # the publish below fails too, with the usual 503
        log.warning("cannot read worker heartbeats: %s", exc)
        return None


def _batched(producer: Producer, amqp: bool) -> contextlib.AbstractContextManager[object]:
    """One trip's messages sent together. On Redis, kombu >= 5.7 buffers a batch's LPUSHes
    into one pipeline (one round trip instead of one per message); an error discards what was
    not sent, and the caller undoes the rest. On RabbitMQ, every message is sent before the
    publisher confirms are awaited, together (`shared/amqp_confirms.py`): one wait for the
    broker's disk write per trip instead of one per message."""
    if amqp:
        return confirmed_together(producer.channel)
    batch = getattr(producer, "batch", None)
    return batch() if batch is not None else contextlib.nullcontext()


def _publish(settings: Settings, payloads: list[TaskPayload]) -> list[str]:
    """Route and send every message over one producer connection; returns the queues."""
    live = _live(settings, payloads)
    queues = []
    app = _app(settings)
    amqp = settings.broker_is_amqp
    with app.producer_or_acquire() as producer, _batched(producer, amqp):
        for payload in payloads:
            queue = route(settings, payload, live)
            # ignore_result: the job record is the result; without it Celery subscribes this
            # process to a result channel per task (and unsubscribes later): two round trips
            # and pub/sub bookkeeping for nothing.
            options: dict[str, object] = {
                "task_id": payload.job_id,
                "queue": queue,
                "ignore_result": True,
                "priority": broker_priority(payload.priority, amqp),
                # Celery's default repr of the args (saferepr of the whole payload, for its
                # events and logs) costs as much as the rest of a publish; the job id says enough.
                "argsrepr": payload.job_id,
                "kwargsrepr": "",
            }
            if payload.timeout is not None:
                options["soft_time_limit"] = payload.timeout
                options["time_limit"] = payload.timeout + settings.job_kill_grace
            args = [payload.model_dump(mode="json")]
            app.send_task(task_name(payload.task), args=args, producer=producer, **options)
            queues.append(queue)
    return queues


def publish(settings: Settings, payloads: list[TaskPayload]) -> list[str]:
    """Blocking publish, for threads (the job reaper sends a lost job's message again)."""
    return _publish(settings, payloads)


class _Coalescer:
    """What concurrent requests publish goes out in one batch per trip to a worker thread:
    while one batch is out, the next gathers. Alone, a request's trip leaves at once; with 32
    submitters one trip carries several messages, and the thread hops, the producer's
    acquisition and kombu's per-publish client are paid once for them all (kombu's batch
    sends them in one pipeline). A failed trip fails every request it carried (each undoes
    its own jobs), as a failed `POST /jobs/batch` does."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pending: list[tuple[list[TaskPayload], asyncio.Future[list[str]]]] = []
        self.draining: asyncio.Task[None] | None = None

    async def publish(self, payloads: list[TaskPayload]) -> list[str]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[str]] = loop.create_future()
        self.pending.append((payloads, done))
        if self.draining is None:
            self.draining = loop.create_task(self._drain(), name="forklift-publish")
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            # As a thread's run: the caller learns of its cancellation once its messages
            # are out (or failed), so that its undo never races its own publish.
            await asyncio.wait([done])
            raise

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                flat = [p for payloads, _ in batch for p in payloads]
                try:
                    queues = await to_thread.run_sync(_publish, self.settings, flat)
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                except BaseException:
                    for _, done in batch:
                        done.cancel()
                    raise
                start = 0
                for payloads, done in batch:
                    if not done.done():
                        done.set_result(queues[start : start + len(payloads)])
                    start += len(payloads)
        finally:
            for _, done in self.pending:  # only if this task was cancelled (shutdown)
                done.cancel()
            self.pending = []
            self.draining = None


# Per event loop, per Settings object (the coalescer keeps it alive: its id stays its own).
_coalescers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _Coalescer]] = (
    weakref.WeakKeyDictionary()
)


async def enqueue_many(settings: Settings, payloads: list[TaskPayload]) -> list[str]:
    """Publish off the loop (it never waits on kombu), batched with what other requests of
    this process publish meanwhile (`_Coalescer`)."""
    per_loop = _coalescers.setdefault(asyncio.get_running_loop(), {})
    coalescer = per_loop.get(id(settings))
    if coalescer is None:
        coalescer = per_loop[id(settings)] = _Coalescer(settings)
    return await coalescer.publish(payloads)


async def enqueue(settings: Settings, payload: TaskPayload) -> str:
    return (await enqueue_many(settings, [payload]))[0]

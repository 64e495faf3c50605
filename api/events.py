"""Job events from Redis pub/sub, fanned out to waiters in this API process.

One subscription per API process (not one per waiting request): long-polls and event
streams register a queue for a job id and wake when its record changes, so `?wait=` never
polls Redis in a loop. After a reconnect every waiter is woken to re-read its record, since
messages published while disconnected are lost.

On shutdown (`close`, called from the API's SIGTERM/SIGINT handler) every waiter is woken with
`SHUTDOWN` and `closing` turns true: long-polls answer with what they have and event streams
end, so open connections do not hold the server's graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from shared.redis_io import async_redis
from shared.settings import Settings

log = logging.getLogger("forklift.api")

RESYNC = {"resync": True}
SHUTDOWN = {"shutdown": True}


class JobEventHub:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channel = settings.keys.events
        self._waiters: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._all: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self.closing = False
        # Called with the id of a waiting job announced ready (api/pipelines.py launches it).
        self.on_ready: Callable[[str], None] | None = None
        # Called when a due time may have been added (shared/due.py: the mover wakes): a
        # message on `Keys.jobs_due_wake`, a retry's event, a resubscription.
        self.wake_channel = settings.keys.jobs_due_wake
        self.on_due: Callable[[], None] | None = None

    def close(self) -> None:
        """The server is shutting down: wake every waiter, and let none wait any more."""
        self.closing = True
        self._dispatch(SHUTDOWN)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="forklift-job-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def subscribe(self, job_id: str | None) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of events for one job (or all jobs with None), for the `with` block."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        group = self._all if job_id is None else self._waiters[job_id]
        group.add(queue)
        try:
            yield queue
        finally:
            group.discard(queue)
            if job_id is not None and not group:
                self._waiters.pop(job_id, None)

    def _dispatch(self, event: dict[str, Any]) -> None:
        targets = set(self._all)
        job_id = event.get("id")
        if job_id is None:
            for group in self._waiters.values():
                targets |= group
        else:
            targets |= self._waiters.get(job_id, set())
        for queue in targets:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            client = async_redis(self.settings, socket_timeout=None)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel, self.wake_channel)
                self._dispatch(RESYNC)
                self._due()
                backoff = 0.2
                async for message in _messages(pubsub):
                    if message.get("channel") == self.wake_channel:
                        self._due()
                        continue
                    with contextlib.suppress(ValueError, TypeError):
                        event = json.loads(message["data"])
                        self._dispatch(event)
                        if event.get("ready") and self.on_ready is not None:
                            self.on_ready(str(event["id"]))
                        if "retry_at" in event:
                            self._due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("job event subscription lost (%s); reconnecting", exc)
                self._dispatch(RESYNC)
                self._due()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _due(self) -> None:
        if self.on_due is not None:
            self.on_due()


async def _messages(pubsub: Any) -> AsyncIterator[dict[str, Any]]:
    async for message in pubsub.listen():
        if message.get("type") == "message":
            yield message

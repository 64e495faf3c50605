"""The worker's heartbeat: a thread of the main worker process that says it is alive.

What a beat writes, and every reading of it, is `shared/workers.py` (`WorkerStore`): this
module only gathers what the worker knows (its name, domain, concurrency, and the jobs Celery
has handed it) and beats every `INTERVAL_S` until the worker stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

from shared.redis_io import sync_redis
from shared.schemas import WorkerPresence
from shared.settings import Settings, get_settings
from shared.workers import INTERVAL_S, WorkerStore

log = logging.getLogger("forklift.worker")

_stop = threading.Event()
_name: str | None = None


def held_jobs() -> list[str] | None:
    """Ids of the requests this worker process has received and not finished (reserved
    includes active), read from Celery's own bookkeeping in the main process; None if the
    set kept changing under this thread (the beat then keeps the last list)."""
    from celery.worker import state

    for _ in range(5):
        try:
            return sorted({str(request.id) for request in list(state.reserved_requests)})
        except RuntimeError:  # "set changed size during iteration": the consumer is busy
            time.sleep(0.001)
    return None


def _beat(settings: Settings, record: WorkerPresence) -> None:
    store = WorkerStore(sync_redis(settings), settings)
    while not _stop.is_set():
        try:
            store.beat(record, held_jobs(), time.time())
        except Exception as exc:  # Redis restarting: keep trying
            log.debug("heartbeat failed: %s", exc)
        _stop.wait(INTERVAL_S)
    with contextlib.suppress(Exception):  # best effort on the way out
        store.leave(record.name)


def start(consumer: Any) -> None:
    global _name
    settings = get_settings()
    _name = getattr(consumer, "hostname", None) or f"worker@{os.uname().nodename}"
    concurrency = getattr(getattr(consumer, "pool", None), "limit", None)
    record = WorkerPresence(
        name=_name,
        pid=os.getpid(),
        domain=settings.shm_domain,
        api_url=settings.api_internal_url,  # the domain's API, shown by GET /cluster
        concurrency=concurrency or settings.worker_concurrency,
        started_at=time.time(),
    )
    _stop.clear()
    threading.Thread(
        target=_beat, args=(settings, record), name="forklift-heartbeat", daemon=True
    ).start()


def stop() -> None:
    _stop.set()
    time.sleep(0.05)

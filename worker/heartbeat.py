"""Worker presence in Redis: who is online, in which shm domain, with how many children.

The main worker process refreshes a sorted set (score = last beat) and a small hash with a
TTL. `/healthz` counts members seen recently; nothing needs a broadcast round trip.

Each beat also says which jobs the worker holds (`worker:<name>:held`: the ids of the
requests it has received and not yet finished, with the time they were read), so the reaper
(`shared/jobs_reaper.py`) can tell a running job whose worker is alive but lost it (a child
gone, a consumer reconnected) from one still running, without asking the worker.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from shared.redis_io import sync_redis
from shared.settings import Settings, get_settings

log = logging.getLogger("forklift.worker")

INTERVAL_S = 2.0
STALE_AFTER_S = 10.0

_stop = threading.Event()
_name: str | None = None


def workers_key(settings: Settings) -> str:
    return settings.key("workers")


def worker_key(settings: Settings, name: str) -> str:
    return settings.key("worker", name)


def held_key(settings: Settings, name: str) -> str:
    return settings.key("worker", name, "held")


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


def _beat(settings: Settings, name: str, info: dict[str, Any]) -> None:
    client = sync_redis(settings)
    while not _stop.is_set():
        try:
            now = time.time()
            held = held_jobs()
            pipe = client.pipeline(transaction=False)
            pipe.zadd(workers_key(settings), {name: now})
            pipe.set(worker_key(settings, name), json.dumps(info), ex=int(STALE_AFTER_S * 3))
            if held is not None:
                record = json.dumps({"at": now, "jobs": held})
                pipe.set(held_key(settings, name), record, ex=int(STALE_AFTER_S * 3))
            pipe.execute()
        except Exception as exc:  # Redis restarting: keep trying
            log.debug("heartbeat failed: %s", exc)
        _stop.wait(INTERVAL_S)
    try:
        client.zrem(workers_key(settings), name)
        client.delete(worker_key(settings, name), held_key(settings, name))
    except Exception:  # best effort on the way out
        pass


def start(consumer: Any) -> None:
    global _name
    settings = get_settings()
    _name = getattr(consumer, "hostname", None) or f"worker@{os.uname().nodename}"
    concurrency = getattr(getattr(consumer, "pool", None), "limit", None)
    info = {
        "name": _name,
        "pid": os.getpid(),
        "domain": settings.shm_domain,
        "api_url": settings.api_internal_url,  # the domain's API, shown by GET /cluster
        "concurrency": concurrency or settings.worker_concurrency,
        "started_at": time.time(),
    }
    _stop.clear()
    threading.Thread(
        target=_beat, args=(settings, _name, info), name="forklift-heartbeat", daemon=True
    ).start()


def stop() -> None:
    _stop.set()
    time.sleep(0.05)

"""The FastAPI app: `uvicorn api.main:app`. Accepts work, answers at once, never computes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from anyio import to_thread
from fastapi import FastAPI

from api import errors
from api.deps import AppState
from api.events import JobEventHub
from api.limits import BodyLimitMiddleware, BodyTimeoutMiddleware
from api.routes import (
    arrays,
    cluster,
    dashboard,
    events,
    health,
    internal,
    jobs,
    metrics,
    shm,
    tasks,
)
from shared.arrays import mappings, pool
from shared.arrays.janitor import sweep
from shared.arrays.store import ArrayStore
from shared.jobstore import JobStore
from shared.logs import setup_logging
from shared.redis_io import async_redis, sync_redis
from shared.registry import load_job_modules
from shared.settings import Settings, get_settings

log = logging.getLogger("forklift.api")


async def _janitor(settings: Settings) -> None:
    client = sync_redis(settings)
    while True:
        try:
            await to_thread.run_sync(sweep, client, settings)
        except Exception as exc:  # Redis down: try again next round
            log.warning("janitor pass failed: %s", exc)
        await asyncio.sleep(settings.janitor_interval)


async def _sweep_mappings(interval: float) -> None:
    """Drop this process's kept mappings of freed segments (uploads map through the cache).

    Each API does its own, whichever holds the janitor lock; a mapping of an unlinked segment
    keeps its memory allocated, so this runs more often than the janitor (an fstat per entry).
    """
    while True:
        await asyncio.sleep(interval)
        try:
            await to_thread.run_sync(mappings.sweep)
        except Exception as exc:  # never let the loop die: the next round retries
            log.warning("sweeping kept mappings failed: %s", exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    load_job_modules(settings.all_job_modules)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging(settings, "api")
        if not settings.api_keys:
            log.warning("FORKLIFT_API_KEYS is not set: the API is open to anyone who reaches it")
        client = async_redis(settings)
        hub = JobEventHub(settings)
        await hub.start()
        app.state.forklift = AppState(
            settings=settings,
            redis=client,
            jobs=JobStore(client, settings),
            arrays=ArrayStore(client, settings),
            hub=hub,
        )
        janitor = asyncio.create_task(_janitor(settings), name="forklift-janitor")
        sweeper = asyncio.create_task(
            _sweep_mappings(min(mappings.SWEEP_INTERVAL_S, settings.janitor_interval)),
            name="forklift-mapping-sweep",
        )
        try:
            yield
        finally:
            for task in (janitor, sweeper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await hub.stop()
            await client.aclose()
            await to_thread.run_sync(pool.drain, settings)  # give recycled memory back

    app = FastAPI(
        title="forklift",
        summary="CPU-heavy Python and NumPy jobs behind an HTTP API",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_json_bytes, exempt_prefixes=("/arrays",)
    )
    app.add_middleware(BodyTimeoutMiddleware, idle_s=settings.body_timeout)
    errors.install(app)
    for module in (jobs, events, shm, arrays, tasks, health, dashboard, cluster, internal):
        app.include_router(module.router)
    metrics.install(app)  # /metrics, and the outermost middleware: times every request
    return app


app = create_app()

"""The FastAPI app: `uvicorn api.main:app`. Accepts work, answers at once, never computes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any

from anyio import to_thread
from fastapi import FastAPI

from api import errors, openapi, pipelines
from api.deps import AppState
from api.enqueue import publish
from api.events import JobEventHub
from api.exposure import OpenBindGuard, check_bind, refused
from api.limits import (
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    KeyLimitMiddleware,
    KeyLimits,
)
from api.routes import (
    arrays,
    cluster,
    dashboard,
    events,
    health,
    internal,
    jobs,
    metrics,
    schedules,
    tasks,
)
from api.topology import announce_domain
from shared import due
from shared import schedules as scheduling
from shared.arrays import mappings, pool
from shared.arrays.janitor import sweep
from shared.arrays.store import ArrayStore
from shared.due import DueMover
from shared.jobs_reaper import interval as reaper_interval
from shared.jobs_reaper import reap
from shared.jobstore import JobStore
from shared.logs import setup_logging
from shared.redis_io import REDIS_ERRORS, async_redis, sync_redis
from shared.registry import load_job_modules
from shared.settings import Settings, get_settings

log = logging.getLogger("forklift.api")


PASS_BACKOFF_MAX_S = 5.0


async def _every(interval: float, work: Callable[[], object], what: str) -> None:
    """Run `work` in a thread (a coroutine function: on the loop), then again every
    `interval` seconds, until cancelled.

    The background passes of every API: the janitor (arrays, segments), the job reaper
    (shared/jobs_reaper.py: jobs whose message or worker was lost, so none stays queued,
    running or pinned for the visibility timeout or for good) and the sweep of this process's
    kept mappings; on the loop, the scheduler of periodic jobs (shared/schedules.py). A
    failed pass (Redis down) is logged once, and the passes back off (to at most
    `PASS_BACKOFF_MAX_S` apart) until one succeeds: a fast pass does not log five lines a
    second through an outage.
    """
    failures = 0
    while True:
        try:
            if inspect.iscoroutinefunction(work):
                await work()
            else:
                await to_thread.run_sync(work)
            if failures:
                log.info("%s works again after %d failed pass(es)", what, failures)
            failures = 0
        except Exception as exc:
            if not failures:
                log.warning("%s failed: %s", what, exc)
            failures += 1
        backoff = min(interval * 2**failures, max(interval, PASS_BACKOFF_MAX_S))
        await asyncio.sleep(backoff if failures else interval)


async def _move_due(mover: DueMover, wake: asyncio.Event) -> None:
    """The due mover's loop (shared/due.py): a pass, then sleep until the index's first
    time (at most `due.IDLE_S`) or until the event hub says an entry was added (`wake`);
    never two passes closer than `due.INTERVAL_S`, so a burst of wake-ups costs one pass.
    Failures back off as `_every`'s do."""
    failures = 0
    while True:
        wake.clear()
        try:
            await to_thread.run_sync(mover)
            first = await to_thread.run_sync(mover.next_due)
            if failures:
                log.info("publishing due jobs works again after %d failed pass(es)", failures)
            failures = 0
        except Exception as exc:
            if not failures:
                log.warning("publishing due jobs failed: %s", exc)
            failures += 1
            await asyncio.sleep(min(due.INTERVAL_S * 2**failures, PASS_BACKOFF_MAX_S))
            continue
        await asyncio.sleep(due.INTERVAL_S)
        wait = due.IDLE_S if first is None else first - time.time()
        if wait > 0 and not wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(wait, due.IDLE_S))


@contextlib.contextmanager
def _on_shutdown_signal(action: Callable[[], None]) -> Iterator[None]:
    """Run `action` on the event loop when SIGTERM/SIGINT arrives, then the server's handler.

    uvicorn waits for open connections before it runs the lifespan's shutdown, so event
    streams and long-polls must hear of the shutdown from the signal itself. Chained in
    front of whatever handler the server installed (uvicorn's), which still does the rest.
    """
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(action)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        else:  # no server handler: what the signal did before (terminate, or nothing)
            signal.signal(signum, before if before is not None else signal.SIG_DFL)
            signal.raise_signal(signum)

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread (a test client): no signals to chain
        pass
    try:
        yield
    finally:
        for signum, before in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                if signal.getsignal(signum) is handler:
                    signal.signal(signum, before)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    load_job_modules(settings.all_job_modules)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging(settings, "api")
        if not settings.api_keys:
            log.warning(
                "FORKLIFT_API_KEYS is not set: the API is open to anyone who reaches it%s",
                "; loopback clients only"
                if refused(settings)
                else " (FORKLIFT_ALLOW_OPEN, or published on loopback only)",
            )
        client = async_redis(settings)
        hub = JobEventHub(settings)
        await hub.start()
        app.state.forklift = AppState(
            settings=settings,
            redis=client,
            jobs=JobStore(client, settings),
            arrays=ArrayStore(client, settings),
            hub=hub,
            limits=KeyLimits(settings),
        )
        launcher = pipelines.Launcher(app.state.forklift)
        hub.on_ready = launcher  # waiting jobs announced ready are launched here
        with contextlib.suppress(*REDIS_ERRORS):  # Redis down: /cluster finds it via workers
            await announce_domain(client, settings)
        bind_check = asyncio.create_task(check_bind(settings), name="forklift-bind-check")
        janitor_redis, reaper_redis = sync_redis(settings), sync_redis(settings)
        move_due = DueMover(sync_redis(settings), settings, lambda p: publish(settings, p))
        due_added = asyncio.Event()
        hub.on_due = due_added.set
        state = app.state.forklift
        scheduler = scheduling.Scheduler(
            state.schedules, lambda record: schedules.fire(state, record)
        )
        passes = [
            _move_due(move_due, due_added),
            # Every API runs it; only the holder of the scheduler lock fires.
            _every(scheduling.INTERVAL_S, scheduler.tick, "scheduler pass"),
            _every(
                settings.janitor_interval,
                lambda: sweep(janitor_redis, settings),
                "janitor pass",
            ),
            _every(
                reaper_interval(settings),
                lambda: reap(reaper_redis, settings, lambda p: publish(settings, p)),
                "job reaper pass",
            ),
            # A mapping of an unlinked segment keeps its memory: swept more often than the
            # janitor runs (an fstat per entry), by every API, whichever holds the janitor lock.
            _every(
                min(mappings.SWEEP_INTERVAL_S, settings.janitor_interval),
                mappings.sweep,
                "sweeping kept mappings",
            ),
        ]
        background = [asyncio.create_task(p) for p in passes]
        try:
            with _on_shutdown_signal(hub.close):
                yield
        finally:
            hub.close()
            await launcher.close()
            for task in (bind_check, *background):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(*REDIS_ERRORS):  # another API takes over at once
                await scheduler.close()
            await hub.stop()
            await client.aclose()
            await to_thread.run_sync(pool.drain, settings)  # give recycled memory back

    app = FastAPI(
        title="forklift",
        summary="CPU-heavy Python and NumPy jobs behind an HTTP API",
        version="0.1.0",
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
    )
    # Inner to outer: body cap, body deadline, per-key counts, open-API guard, metrics.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_json_bytes,
        exempt=frozenset({("POST", "/arrays")}),  # streamed into shm, FORKLIFT_MAX_UPLOAD_BYTES
    )
    app.add_middleware(
        BodyTimeoutMiddleware, idle_s=settings.body_timeout, min_rate=settings.body_min_rate
    )
    app.add_middleware(KeyLimitMiddleware, settings=settings)
    app.add_middleware(OpenBindGuard, settings=settings)
    errors.install(app)
    openapi.curate(app, secured=bool(settings.api_keys))
    for module in (jobs, schedules, events, arrays, tasks, health, dashboard, cluster, internal):
        app.include_router(module.router)
    metrics.install(app)  # /metrics, and the outermost middleware: times every request
    return app


app = create_app()

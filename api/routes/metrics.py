"""/metrics: Prometheus text format, read from Redis's kept counters on every scrape.

Job, worker, queue and shared-memory figures live in Redis (`shared/metrics.py`), so every
API process renders the same numbers and a scrape of any replica is complete. Only the HTTP
latency histogram is this process's own (label it by instance in Prometheus).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import State
from shared.metrics import DURATION_BUCKETS, Snapshot, count_array_bytes, read_snapshot
from shared.redis_io import REDIS_ERRORS
from shared.workers import STALE_AFTER_S

log = logging.getLogger("forklift.api")

router = APIRouter(tags=["health"])

NPY_MEDIA_TYPE = b"application/x-npy"
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def snapshot_families(snap: Snapshot, shm_limit: dict[str, int]) -> Iterator[Metric]:
    """Prometheus metric families for one snapshot of the Redis-held figures."""
    submitted = CounterMetricFamily(
        "forklift_jobs_submitted", "Jobs accepted by POST /jobs, by task.", labels=["task"]
    )
    for task, n in sorted(snap.submitted.items()):
        submitted.add_metric([task], n)
    yield submitted

    finished = CounterMetricFamily(
        "forklift_jobs_finished",
        "Jobs that reached a final state (succeeded, failed, cancelled), by task and state.",
        labels=["task", "state"],
    )
    for (task, state), n in sorted(snap.finished.items()):
        finished.add_metric([task, state], n)
    yield finished

    duration = HistogramMetricFamily(
        "forklift_job_duration_seconds",
        "Run time of jobs that ran (started to finished), by task.",
        labels=["task"],
    )
    for task, (buckets, total, count) in sorted(snap.durations.items()):
        cumulative, acc = [], 0
        for bound, n in zip((*DURATION_BUCKETS, float("inf")), buckets, strict=True):
            acc += n
            cumulative.append((_bound(bound), acc))
        duration.add_metric([task], cumulative, total)
        if acc != count:  # a torn read cannot happen (one Lua script), but say so if it did
            log.debug("duration histogram of %s: %d in buckets, count %d", task, acc, count)
    yield duration

    queue = GaugeMetricFamily(
        "forklift_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"]
    )
    for name, depth in sorted(snap.queues.items()):
        queue.add_metric([name], depth)
    yield queue

    online = GaugeMetricFamily(
        "forklift_workers_online", "Worker pools with a recent heartbeat.", labels=["domain"]
    )
    slots = GaugeMetricFamily(
        "forklift_worker_slots",
        "Job slots (prefork children) of the online workers.",
        labels=["domain"],
    )
    busy = GaugeMetricFamily(
        "forklift_workers_busy",
        "Jobs in the running state, i.e. busy worker children.",
        labels=["domain"],
    )
    running = snap.busy()
    for domain in snap.domains():
        live = [w for w in snap.workers if w.online and w.domain == domain]
        online.add_metric([domain], len(live))
        slots.add_metric([domain], sum(w.concurrency for w in live))
        busy.add_metric([domain], running.get(domain, 0))
    yield online
    yield slots
    yield busy

    shm_bytes = GaugeMetricFamily(
        "forklift_shm_bytes",
        "Bytes of array segments held in shared memory (counted against the cap).",
        labels=["domain"],
    )
    for domain, n in sorted(snap.shm_bytes.items()):
        shm_bytes.add_metric([domain], n)
    yield shm_bytes

    segments = GaugeMetricFamily(
        "forklift_shm_segments",
        "Segments counted against the cap: arrays, replicas and uploads in flight.",
        labels=["domain"],
    )
    for domain in sorted(set(snap.shm_bytes) | set(snap.shm_segments)):
        segments.add_metric([domain], snap.shm_segments.get(domain, 0))
    yield segments

    limit = GaugeMetricFamily(
        "forklift_shm_limit_bytes",
        "The shared-memory cap (FORKLIFT_SHM_LIMIT_BYTES) as this API sees it.",
        labels=["domain"],
    )
    for domain, n in shm_limit.items():
        limit.add_metric([domain], n)
    yield limit

    for direction, what in (
        ("upload", "received by POST /arrays"),
        ("download", "sent by array and array-result downloads"),
    ):
        family = CounterMetricFamily(
            f"forklift_array_{direction}_bytes", f"Bytes of .npy bodies {what}."
        )
        family.add_metric([], snap.array_bytes.get(direction, 0))
        yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, state: State) -> Response:
    """Prometheus text format; Redis-held figures are read afresh on each scrape."""
    families: list[Metric] = []
    up = GaugeMetricFamily("forklift_redis_up", "1 when this scrape could read Redis.")
    try:
        snap = await read_snapshot(state.redis, state.settings, stale_after=STALE_AFTER_S)
    except REDIS_ERRORS as exc:
        log.warning("metrics: Redis unavailable: %s", exc)
        up.add_metric([], 0)
    else:
        up.add_metric([], 1)
        limit = {state.settings.shm_domain: state.settings.shm_limit_bytes}
        families.extend(snapshot_families(snap, limit))
    families.append(up)
    http: Histogram | None = getattr(request.app.state, "http_latency", None)
    if http is not None:
        families.extend(http.collect())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class HttpMetricsMiddleware:
    """Times each request by route template and counts `.npy` bytes in and out.

    Array upload bytes are the bodies of successful `POST /arrays`; download bytes are every
    `application/x-npy` response body sent (arrays and array results). Both go to Redis, so
    they add up across API processes.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        received = sent = 0
        npy = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent, npy
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        npy = value.split(b";")[0].strip().lower() == NPY_MEDIA_TYPE
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = _route_template(scope)
            method = scope.get("method", "")
            self.histogram.labels(method, route, str(status)).observe(time.perf_counter() - start)
            if method == "POST" and route == "/arrays" and status == 201:
                await self._count(scope, "upload", received)
            elif npy and method == "GET" and sent:
                await self._count(scope, "download", sent)

    async def _count(self, scope: Scope, direction: str, n: int) -> None:
        state: Any = getattr(scope["app"].state, "forklift", None)
        if state is None:
            return
        try:
            await count_array_bytes(state.redis, state.settings, direction, n)
        except REDIS_ERRORS as exc:
            log.debug("array byte counter not updated: %s", exc)


def _route_template(scope: Scope) -> str:
    """The matched route's path template ('/jobs/{job_id}'), never the raw path."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(template) if template else "<unmatched>"


def install(app: FastAPI) -> None:
    """Mount /metrics and time every request (outermost middleware: call it last)."""
    histogram = Histogram(
        "forklift_http_request_duration_seconds",
        "HTTP request latency in this API process, by method, route template and status.",
        ["method", "route", "status"],
        buckets=HTTP_BUCKETS,
        registry=None,
    )
    app.state.http_latency = histogram
    app.include_router(router)
    app.add_middleware(HttpMetricsMiddleware, histogram=histogram)

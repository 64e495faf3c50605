"""/dashboard: a live page of forklift's own, and the JSON it polls (`/dashboard/state`).

Plain HTML, CSS and JavaScript from `api/static/`, served by the API itself: no build step,
no CDN. The page polls `/dashboard/state` once a second. The page itself is public; its state
shows tasks, states and timings, never params or results. With `FORKLIFT_API_KEYS` set, the
state needs a key (the page asks for one) and lists only that key's jobs with their ids, so
another key's job ids are never told; the aggregate figures (queues, workers, memory) are
shown to any valid key. Open (no keys) anyone may read the state, so it shows counts, never a
job id: recent jobs by state (`recent_counts`, `jobs` empty, `jobs_hidden` true) and running
jobs by task under their workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from api.deps import Owner, State
from shared.joblist import JobFilter
from shared.metrics import THROUGHPUT_SLOT_S, read_snapshot, read_throughput
from shared.redis_io import REDIS_ERRORS
from shared.workers import STALE_AFTER_S

STATIC = Path(__file__).resolve().parent.parent / "static"
RECENT_JOBS = 25
THROUGHPUT_SLOTS = 60
_ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
_NO_STORE = {"Cache-Control": "no-store"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("dashboard", status_code=307)  # relative: keeps a proxy's prefix


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=_NO_STORE)


@router.get("/dashboard/static/{name}")
async def dashboard_asset(name: str) -> Any:
    media_type = _ASSETS.get(name)
    if media_type is None:
        return JSONResponse(
            {"error": {"code": "not_found", "message": f"no asset '{name}'", "detail": None}},
            status_code=404,
        )
    return FileResponse(STATIC / name, media_type=media_type, headers=_NO_STORE)


async def _recent_jobs(state: Any, now: float, owner: str) -> list[dict[str, Any]]:
    """The owner's newest jobs (GET /jobs's listing: filtered by owner before the limit).
    What the page shows of a job: never params or results (the state may be public)."""
    page = await state.listing.page(owner, JobFilter(), RECENT_JOBS)
    out = []
    for record in page.records:
        start, end = record.started_at, record.finished_at
        duration = None
        if start is not None:
            duration = (end if end is not None else now) - start
        fraction = None
        if record.progress is not None and record.status == "running":
            fraction = record.progress.fraction
        worker = f"{record.hostname}:{record.pid}" if record.hostname and record.pid else None
        out.append(
            {
                "id": record.id,
                "task": record.task,
                "status": record.status.value,
                "created_at": record.created_at,
                "started_at": start,
                "finished_at": end,
                "duration": duration,
                "progress": fraction,
                "error": (record.error or "")[:300] or None,
                "worker": worker,
                "domain": record.domain or None,
            }
        )
    return out


async def _visible_running(
    state: Any, running: dict[str, dict[str, Any]], owner: str | None
) -> dict[str, dict[str, Any]]:
    if owner is None or not running:
        return running
    rows = await state.jobs.fields(list(running), ("owner",))
    return {
        job_id: entry
        for (job_id, entry), row in zip(running.items(), rows, strict=True)
        if (row["owner"] or "") == owner
    }


@router.get("/dashboard/state")
async def dashboard_state(state: State, owner: Owner) -> Any:
    """What the page shows, in one JSON document."""
    settings = state.settings
    only = owner if settings.api_keys else None
    try:
        snap = await read_snapshot(state.redis, settings, stale_after=STALE_AFTER_S)
        jobs = await _recent_jobs(state, snap.now, owner)
        running = await _visible_running(state, snap.running, only)
        throughput = await read_throughput(state.redis, settings, THROUGHPUT_SLOTS)
    except REDIS_ERRORS as exc:
        return JSONResponse(
            {"redis": False, "error": f"Redis unavailable: {exc}"},
            status_code=503,
            headers={"Retry-After": "2", **_NO_STORE},
        )
    show_ids = bool(settings.api_keys)
    by_node: dict[str, list[dict[str, Any]]] = {}
    for job_id, entry in running.items():
        job = {
            "task": entry.get("task"),
            "started_at": entry.get("started_at"),
            "pid": entry.get("pid"),
        }
        if show_ids:
            job["id"] = job_id
        by_node.setdefault(str(entry.get("node") or ""), []).append(job)
    workers = []
    for w in sorted(snap.workers, key=lambda w: w.name):
        workers.append(
            {
                "name": w.name,
                "domain": w.domain,
                "concurrency": w.concurrency,
                "pid": w.pid,
                "online": w.online,
                "last_seen_s": round(snap.now - w.last_seen, 1),
                "up_s": round(snap.now - w.started_at, 1) if w.started_at else None,
                "jobs": sorted(by_node.pop(w.name, []), key=lambda j: j["started_at"] or 0),
            }
        )
    unplaced = [job for jobs in by_node.values() for job in jobs]
    busy = snap.busy()
    body = {
        "redis": True,
        "now": snap.now,
        "domain": settings.shm_domain,
        "queues": [{"name": n, "depth": d} for n, d in sorted(snap.queues.items())],
        "workers": workers,
        "running_elsewhere": unplaced,
        "busy": busy,
        "jobs": jobs if show_ids else [],
        "jobs_hidden": not show_ids,
        "recent_counts": _count_states(jobs),
        "shm": [
            {
                "domain": domain,
                "bytes": snap.shm_bytes.get(domain, 0),
                "segments": snap.shm_segments.get(domain, 0),
                "limit": settings.shm_limit_bytes if domain == settings.shm_domain else None,
            }
            for domain in sorted(set(snap.shm_bytes) | {settings.shm_domain})
        ],
        "totals": {
            "submitted": sum(snap.submitted.values()),
            "finished": _by_state(snap.finished),
            "running": sum(busy.values()),
        },
        "throughput": {"slot_s": THROUGHPUT_SLOT_S, "counts": throughput},
    }
    return JSONResponse(body, headers=_NO_STORE)


def _count_states(jobs: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for job in jobs:
        out[job["status"]] = out.get(job["status"], 0) + 1
    return out


def _by_state(finished: dict[tuple[str, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, state), n in finished.items():
        out[state] = out.get(state, 0) + 1 * n
    return out

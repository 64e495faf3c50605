"""/jobs/{id}/events: state and progress changes as Server-Sent Events.

The stream starts with the job's current state, sends one event per change and ends after
the final state:

    event: status                          event: progress
    data: {JobView}                        data: {"status": "running", "progress": {...}}

`status` carries the whole job view (so the last one holds the result or the error);
`progress` only the new progress. Comment lines (`: keep-alive`) every 15 s keep proxies
and clients from timing out an idle stream. Woken by the job's events (the API's one Redis
subscription), each wake-up re-reads the record, so lost or coalesced messages and
reconnects of the subscription (`resync`) cost nothing but a re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import AppState, Owner, State, load_job
from shared.jobstore import JobRecord
from shared.redis_io import REDIS_ERRORS

router = APIRouter(prefix="/jobs", tags=["jobs"])

KEEPALIVE_S = 15.0
RETRY_MS = 2000
EVENT_STREAM = "text/event-stream"


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


def _progress_data(record: JobRecord) -> str:
    progress = record.progress.model_dump() if record.progress else None
    return json.dumps({"status": record.status.value, "progress": progress})


async def _stream(state: AppState, job_id: str, first: JobRecord) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    with state.hub.subscribe(job_id) as queue:
        # Re-read after subscribing: a change between the 404 check and now is not lost.
        record: JobRecord | None = first
        with contextlib.suppress(*REDIS_ERRORS):
            record = await state.jobs.get(job_id)
        last: tuple[Any, Any] | None = None
        while True:
            if record is None:  # expired under us; nothing more will come
                gone = {"error": {"code": "job_not_found", "message": "the job record is gone"}}
                yield _event("error", json.dumps(gone))
                return
            if last is None or record.status != last[0]:
                yield _event("status", record.view().model_dump_json())
            elif record.progress != last[1]:
                yield _event("progress", _progress_data(record))
            last = (record.status, record.progress)
            if record.status.is_final or state.hub.closing:
                return
            try:
                await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
            while not queue.empty():  # a burst of progress reports: one re-read is enough
                queue.get_nowait()
            if state.hub.closing:
                return
            try:
                record = await state.jobs.get(job_id)
            except REDIS_ERRORS:  # keep the last state; the hub resyncs when Redis is back
                continue


@router.get(
    "/{job_id}/events",
    summary="Follow a job's events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`status` and `progress` events until the job ends",
            "content": {EVENT_STREAM: {}},
        },
        404: {"description": "unknown job"},
    },
)
async def job_events(job_id: str, state: State, owner: Owner) -> StreamingResponse:
    """Server-Sent Events: the current state, then every change, until the final state."""
    record = await load_job(state, job_id, owner)
    return StreamingResponse(
        _stream(state, job_id, record),
        media_type=EVENT_STREAM,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

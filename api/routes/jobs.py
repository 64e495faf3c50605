"""/jobs: submit, inspect, wait for, fetch the result of, and cancel jobs."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from api import pipelines, submissions
from api.arrays_io import npy_response
from api.deps import AppState, Owner, State, load_job
from api.errors import ApiError, not_found
from api.openapi import LOCATION
from shared.arrays import lifecycle
from shared.jobstore import JobRecord
from shared.schemas import JobBatch, JobBatchView, JobStatus, JobSubmission, JobView, JobWait, is_id

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post(
    "",
    summary="Submit a job",
    status_code=202,
    response_model=JobView,
    responses={
        202: {"description": "queued; `Location` is the job's path", "headers": LOCATION},
        422: {
            "description": "unknown task, bad params, inputs or timeout, unknown array or"
            " job, a failed upstream, `parallel` on a job that does not split"
        },
    },
)
async def submit_job(body: JobSubmission, state: State, owner: Owner, response: Response) -> Any:
    """Validate a job, queue it, and answer at once with its id (`Location: /jobs/{id}`)."""
    resolved = await pipelines.resolve(state, body, owner)
    job = await submissions.prepare(state, resolved.body, owner, resolved.upstream)
    (view,) = await submissions.submit(state, [job], owner)
    response.headers["Location"] = f"/jobs/{job.job_id}"
    return view


@router.post(
    "/batch",
    summary="Submit many jobs at once",
    status_code=202,
    response_model=JobBatchView,
    responses={422: {"description": "an invalid job: none is queued"}},
)
async def submit_jobs(body: JobBatch, state: State, owner: Owner) -> Any:
    """Queue many jobs in one request: all are validated first, and none is queued unless
    every one is valid (the error's `detail.index` names the first bad one). An input
    `{"job": "#i"}` takes the result of entry i, an earlier one (api/pipelines.py)."""
    prepared: list[submissions.Prepared] = []
    ids: list[str] = []  # of the entries so far, which `#i` names
    for index, submission in enumerate(body.jobs):
        try:
            resolved = await pipelines.resolve(state, submission, owner, ids, index)
            job = await submissions.prepare(state, resolved.body, owner, resolved.upstream)
            prepared.append(job)
            ids.append(job.job_id)
        except ApiError as exc:
            exc.message = f"jobs[{index}]: {exc.message}"
            exc.detail = {"index": index, "error": exc.detail}
            raise
    return JobBatchView(jobs=await submissions.submit(state, prepared, owner))


@router.post(
    "/wait",
    summary="Wait for many jobs",
    response_model=JobBatchView,
    responses={404: {"description": "unknown job"}},
)
async def wait_for_jobs(body: JobWait, state: State, owner: Owner) -> Any:
    """Long-poll many jobs at once: answers when all (or, with `any`, one) have ended, or
    after `wait` seconds, with every job's current view in the order asked."""
    wait = min(body.wait, state.settings.max_wait)
    deadline = time.monotonic() + wait
    with state.hub.subscribe(None) as events:
        records = await _load_many(state, body.ids, owner)
        pending = {r.id for r in records if not r.status.is_final}
        while pending and not (body.any and len(pending) < len(set(body.ids))):
            if state.hub.closing:  # shutting down: answer with what there is
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                event = await asyncio.wait_for(events.get(), timeout=remaining)
            except TimeoutError:
                break
            if event.get("resync"):
                records = await _load_many(state, body.ids, owner)
                pending = {r.id for r in records if not r.status.is_final}
            elif event.get("id") in pending and event.get("status") in _FINAL:
                pending.discard(event["id"])
        records = await _load_many(state, body.ids, owner)
    return JobBatchView(jobs=[r.view() for r in records])


_FINAL = {s.value for s in JobStatus if s.is_final}


async def _load_many(state: AppState, ids: list[str], owner: str) -> list[JobRecord]:
    for job_id in ids:
        if not is_id(job_id):
            raise not_found("job", job_id)
    records = []
    for job_id, record in zip(ids, await state.jobs.get_many(ids), strict=True):
        if record is None or record.owner != owner:
            raise not_found("job", job_id)
        records.append(record)
    return records


async def _wait_for_end(state: AppState, job_id: str, owner: str, wait: float) -> JobRecord:
    """Long-poll: woken by the job's events, never by polling Redis in a loop."""
    deadline = time.monotonic() + wait
    with state.hub.subscribe(job_id) as events:
        record = await load_job(state, job_id, owner)
        while not record.status.is_final and not state.hub.closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(events.get(), timeout=remaining)
            except TimeoutError:
                break
            while not events.empty():
                events.get_nowait()
            record = await load_job(state, job_id, owner)
    return record


@router.get(
    "/{job_id}",
    summary="Get a job's status",
    response_model=JobView,
    responses={404: {"description": "unknown job"}},
)
async def get_job_status(
    job_id: str,
    state: State,
    owner: Owner,
    wait: Annotated[float, Query(ge=0, description="seconds to wait for the job to end")] = 0,
) -> Any:
    """The job's status, timings, progress, error and result; `?wait=S` long-polls."""
    wait = min(wait, state.settings.max_wait)
    if wait > 0:
        return (await _wait_for_end(state, job_id, owner, wait)).view()
    return (await load_job(state, job_id, owner)).view()


@router.get(
    "/{job_id}/result",
    summary="Get a job's result",
    responses={
        200: {
            "description": "the JSON result, or the .npy stream of an array result",
            "content": {"application/json": {}, "application/x-npy": {}},
        },
        404: {"description": "unknown job"},
        409: {"description": "the job has not succeeded"},
    },
)
async def get_job_result(
    job_id: str,
    state: State,
    owner: Owner,
    wait: Annotated[float, Query(ge=0, description="seconds to wait for the job to end")] = 0,
) -> Response:
    """The result itself: JSON, or the array as `.npy` when the job returned one array."""
    wait = min(wait, state.settings.max_wait)
    record = await _wait_for_end(state, job_id, owner, wait)
    if record.status is not JobStatus.succeeded:
        message = f"job is {record.status.value}"
        if record.error:
            message += f": {record.error}"
        elif not record.status.is_final:
            message += f"; GET /jobs/{job_id}?wait=30 waits for it"
        raise ApiError(409, f"job_{record.status.value}", message, {"status": record.status})
    result = record.result
    if isinstance(result, dict) and set(result) == {"array"}:
        return await npy_response(state, result["array"]["id"], owner, head=False)
    return JSONResponse(result)


@router.delete(
    "/{job_id}",
    summary="Cancel a job",
    response_model=JobView,
    responses={404: {"description": "unknown job"}, 409: {"description": "already ended"}},
)
async def cancel_job(job_id: str, state: State, owner: Owner) -> Any:
    """Cancel a queued job, or stop a running one (its worker process is interrupted)."""
    record = await load_job(state, job_id, owner)
    if record.parent:
        raise ApiError(
            409,
            "job_part",
            f"job {job_id} is part {(record.part_index or 0) + 1} of job {record.parent};"
            f" DELETE /jobs/{record.parent} cancels the job and all its parts",
            {"parent": record.parent},
        )
    before, due = await state.jobs.cancel(job_id)
    await lifecycle.free_async(state.arrays, due)
    if before in ("queued", "waiting"):
        await lifecycle.free_async(state.arrays, await state.jobs.release_inputs(job_id))
    elif before != "running":
        raise ApiError(
            409, "job_finished", f"job already {record.status.value}", {"status": before}
        )
    record = await load_job(state, job_id, owner)
    return record.view()

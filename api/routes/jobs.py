"""/jobs: submit, inspect, wait for, fetch the result of, and cancel jobs."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from api import idempotency, pipelines, submissions
from api.arrays_io import npy_response
from api.deps import AppState, Owner, State, load_job, only_query
from api.errors import ApiError, not_found
from api.openapi import LOCATION
from shared.arrays import lifecycle
from shared.joblist import (
    BadCursor,
    JobFilter,
    Position,
    decode_cursor,
    encode_cursor,
    result_arrays,
    statuses_of,
)
from shared.jobstore import JobRecord
from shared.schemas import (
    MAX_CANCEL,
    CancelReply,
    CancelSkipped,
    JobBatch,
    JobBatchView,
    JobCancel,
    JobList,
    JobStatus,
    JobSubmission,
    JobView,
    JobWait,
    is_id,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post(
    "",
    summary="Submit a job",
    status_code=202,
    response_model=JobView,
    responses={
        200: {**idempotency.REPLAY_RESPONSE, "model": JobView},
        202: {"description": "queued; `Location` is the job's path", "headers": LOCATION},
        409: idempotency.CONFLICT_RESPONSE,
        422: {
            "description": "unknown task, bad params, inputs or timeout, unknown array or"
            " job, a failed upstream, `parallel` on a job that does not split, an"
            " `Idempotency-Key` sent before with another body (`idempotency_key_reused`)"
        },
    },
)
async def submit_job(
    body: JobSubmission,
    state: State,
    owner: Owner,
    response: Response,
    idempotency_key: idempotency.IdempotencyKey = None,
) -> Any:
    """Validate a job, queue it, and answer at once with its id (`Location: /jobs/{id}`).
    With an `Idempotency-Key`, sending it again is safe (api/idempotency.py)."""

    async def prepare() -> list[submissions.Prepared]:
        resolved = await pipelines.resolve(state, body, owner)
        return [await submissions.prepare(state, resolved.body, owner, resolved.upstream)]

    (view,) = await idempotency.submit(state, owner, idempotency_key, body, prepare, response)
    response.headers["Location"] = f"/jobs/{view.id}"
    return view


@router.post(
    "/batch",
    summary="Submit many jobs at once",
    status_code=202,
    response_model=JobBatchView,
    responses={
        200: {**idempotency.REPLAY_RESPONSE, "model": JobBatchView},
        409: idempotency.CONFLICT_RESPONSE,
        422: {"description": "an invalid job: none is queued"},
    },
)
async def submit_jobs(
    body: JobBatch,
    state: State,
    owner: Owner,
    response: Response,
    idempotency_key: idempotency.IdempotencyKey = None,
) -> Any:
    """Queue many jobs in one request: all are validated first, and none is queued unless
    every one is valid (the error's `detail.index` names the first bad one). An input
    `{"job": "#i"}` takes the result of entry i, an earlier one (api/pipelines.py). With an
    `Idempotency-Key`, sending it again gives the same jobs, in order."""

    async def prepare() -> list[submissions.Prepared]:
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
        return prepared

    views = await idempotency.submit(state, owner, idempotency_key, body, prepare, response)
    return JobBatchView(jobs=views)


MAX_LIST = 1000  # jobs one GET /jobs page holds at most
_UNFINISHED = frozenset({JobStatus.queued, JobStatus.waiting, JobStatus.running})


def _when(value: str | None, name: str) -> float | None:
    """Unix seconds or ISO 8601 (naive = UTC) -> unix seconds."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ApiError(422, "bad_time", f"{name}: a finite number of seconds")
        return seconds
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(
            422, "bad_time", f"{name}: unix seconds or ISO 8601, not {value[:60]!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _tags(values: list[str] | str | None) -> dict[str, str]:
    """`k:v` filters (all must match) -> {k: v}; 422 for one without a colon."""
    if values is None:
        return {}
    out: dict[str, str] = {}
    for value in [values] if isinstance(values, str) else values:
        key, colon, wanted = value.partition(":")
        if not colon or not key:
            raise ApiError(422, "bad_tag", f"tag filter {value[:80]!r}: write it key:value")
        if key in out and out[key] != wanted:
            raise ApiError(422, "bad_tag", f"tag {key[:64]!r} asked with two values")
        out[key] = wanted
    if len(out) > 16:
        raise ApiError(422, "bad_tag", "at most 16 tag filters")
    return out


def _statuses(values: list[str]) -> frozenset[JobStatus]:
    try:
        return statuses_of(values)
    except ValueError as exc:
        raise ApiError(422, "bad_status", str(exc)) from None


@router.get(
    "",
    summary="List jobs",
    response_model=JobList,
    responses={422: {"description": "a bad or unknown filter, cursor or limit"}},
    dependencies=[only_query("status", "task", "tag", "since", "until", "limit", "cursor")],
)
async def list_jobs(
    state: State,
    owner: Owner,
    status: Annotated[list[str], Query(description="repeat or comma-separate")] = [],  # noqa: B006
    task: str | None = None,
    tag: Annotated[list[str], Query(description="`key:value`; repeated: all match")] = [],  # noqa: B006
    since: Annotated[str | None, Query(description="created at or after: unix s or ISO")] = None,
    until: Annotated[str | None, Query(description="created at or before")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
    cursor: Annotated[str | None, Query(description="`next` of the page before")] = None,
) -> Any:
    """The caller's jobs, newest first (parts of parallel jobs are not listed). A page may
    hold fewer than `limit` jobs and still have a `next` (one request scans a bounded number
    of records); follow `next` until it is null. Stable under concurrent submissions: a
    job created after the first page is never listed by the pages after it."""
    flt = JobFilter(
        statuses=_statuses(status),
        task=task,
        tags=_tags(tag),
        since=_when(since, "since"),
        until=_when(until, "until"),
    )
    after: Position | None = None
    if cursor:
        try:
            after = decode_cursor(cursor)
        except BadCursor as exc:
            raise ApiError(422, "bad_cursor", str(exc)) from None
    page = await state.listing.page(owner, flt, limit, after)
    return JobList(
        jobs=[r.view() for r in page.records],
        next=encode_cursor(page.next) if page.next else None,
    )


@router.post(
    "/cancel",
    summary="Cancel many jobs",
    response_model=CancelReply,
    responses={422: {"description": "neither or both of ids and a filter, a bad filter"}},
)
async def cancel_jobs(body: JobCancel, state: State, owner: Owner) -> Any:
    """Cancel the jobs of `ids`, or the caller's unfinished jobs matching a filter (`tag`,
    `task`, `status`: at most 10,000 per request; `more` says to send it again). Each is
    cancelled as `DELETE /jobs/{id}` cancels it; finished ones are skipped with their
    status, ids that are not the caller's jobs are skipped as `not_found`."""
    cancelled: list[str] = []
    skipped: list[CancelSkipped] = []
    more = False
    if body.ids is not None:
        ids = list(dict.fromkeys(body.ids))
        known = [i for i in ids if is_id(i)]
        found = dict(zip(known, await state.jobs.get_many(known), strict=True))
        for job_id in ids:
            record = found.get(job_id)
            if record is None or record.owner != owner:
                skipped.append(CancelSkipped(id=job_id, status="not_found"))
            elif record.parent:
                skipped.append(CancelSkipped(id=job_id, status="part"))
            else:
                await _cancel_one(state, record, cancelled, skipped)
    else:
        wanted = _UNFINISHED & frozenset(body.status or _UNFINISHED)
        flt = JobFilter(statuses=wanted, task=body.task, tags=_tags(body.tag))
        if wanted:
            page = await state.listing.page(owner, flt, MAX_CANCEL, scan=10 * MAX_CANCEL)
            more = page.next is not None
            for record in page.records:
                await _cancel_one(state, record, cancelled, skipped)
    return CancelReply(cancelled=cancelled, skipped=skipped, more=more)


async def _cancel_one(
    state: AppState, record: JobRecord, cancelled: list[str], skipped: list[CancelSkipped]
) -> None:
    before = await cancel_record(state, record.id)
    if before in _UNFINISHED:
        cancelled.append(record.id)
    else:
        skipped.append(CancelSkipped(id=record.id, status=before))


async def cancel_record(state: AppState, job_id: str) -> str:
    """Cancel a job (not a part) and free what that leaves due: the one cancel path of
    `DELETE /jobs/{id}` and `POST /jobs/cancel`. Returns the status before ('queued',
    'waiting', 'running': cancelled now), else the final status it already had."""
    before, due = await state.jobs.cancel(job_id)
    await lifecycle.free_async(state.arrays, due)
    if before in ("queued", "waiting"):
        await lifecycle.free_async(state.arrays, await state.jobs.release_inputs(job_id))
    return before


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
                event = await asyncio.wait_for(events.get(), timeout=remaining)
            except TimeoutError:
                break
            moved = _may_have_ended(event)
            while not events.empty():
                moved |= _may_have_ended(events.get_nowait())
            if moved:  # a start or progress event says the job still runs: no reload
                record = await load_job(state, job_id, owner)
    return record


_LIVE_EVENTS = frozenset({"queued", "running", "waiting"})


def _may_have_ended(event: dict[str, Any]) -> bool:
    """Anything but an event naming a live status (a resync, a shutdown, an ending)."""
    return event.get("status") not in _LIVE_EVENTS


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
    summary="Cancel a job, or remove a finished one",
    response_model=JobView,
    responses={
        200: {"description": "cancelled (the view now), or removed (the view it had)"},
        404: {"description": "unknown job"},
        409: {"description": "a part of a parallel job, or ended but still stopping"},
    },
)
async def cancel_job(job_id: str, state: State, owner: Owner) -> Any:
    """Cancel a queued or waiting job, or stop a running one (its worker process is
    interrupted). A finished job (succeeded, failed or cancelled, and stopped) is removed:
    its record goes (`GET` is then 404) and its result arrays are deleted as
    `DELETE /arrays/{id}` deletes them (one pinned as another job's input is freed when that
    job ends); the answer is the view it had."""
    record = await load_job(state, job_id, owner)
    if record.parent:
        raise ApiError(
            409,
            "job_part",
            f"job {job_id} is part {(record.part_index or 0) + 1} of job {record.parent};"
            f" DELETE /jobs/{record.parent} cancels the job and all its parts",
            {"parent": record.parent},
        )
    if record.status.is_final and record.released:
        outcome, result = await state.listing.remove(record)
        if outcome == "missing":
            raise not_found("job", job_id)
        if outcome == "removed":
            for array_id in result_arrays(result):
                if await state.arrays.request_delete(array_id, owner) == "free":
                    await lifecycle.free_async(state.arrays, [array_id])
            return record.view()
    before = await cancel_record(state, job_id)
    if before not in _UNFINISHED:
        raise ApiError(
            409,
            "job_finished",
            f"job already {before}; it is still stopping: DELETE again removes it once stopped",
            {"status": before},
        )
    record = await load_job(state, job_id, owner)
    return record.view()

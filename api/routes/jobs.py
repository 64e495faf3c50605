"""/jobs: submit, inspect, wait for, fetch the result of, and cancel jobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.arrays_io import free_arrays, npy_response
from api.deps import AppState, Owner, State
from api.enqueue import enqueue
from api.errors import ApiError, not_found
from shared.jobstore import JobRecord
from shared.registry import InputError, get_job
from shared.schemas import ID_PATTERN, JobStatus, JobSubmission, JobView, TaskPayload

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Query(pattern=ID_PATTERN)]


@dataclass(frozen=True)
class _ArrayInfo:
    shape: tuple[int, ...]
    dtype: np.dtype


async def _load(state: AppState, job_id: str, owner: str) -> JobRecord:
    record = await state.jobs.get(job_id) if _valid_id(job_id) else None
    if record is None or record.owner != owner:
        raise not_found("job", job_id)
    return record


def _valid_id(ident: str) -> bool:
    return len(ident) == 32 and all(c in "0123456789abcdef" for c in ident)


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


@router.post(
    "",
    status_code=202,
    response_model=JobView,
    responses={404: {"description": "unknown array"}, 422: {"description": "invalid job"}},
)
async def submit_job(body: JobSubmission, state: State, owner: Owner, response: Response) -> Any:
    """Validate a job, queue it, and answer at once with its id (`Location: /jobs/{id}`)."""
    spec = get_job(body.task)
    if spec is None:
        raise ApiError(
            422, "unknown_task", f"unknown task '{body.task}'; GET /tasks lists the tasks"
        )
    try:
        params = spec.validate_params(body.params)
    except ValidationError as exc:
        parts = [f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors()]
        raise ApiError(
            422, "invalid_params", f"{body.task}: " + "; ".join(parts), _validation_detail(exc)
        ) from None
    limit = state.settings.job_time_limit
    if body.timeout is not None and body.timeout > limit:
        raise ApiError(
            422, "invalid_timeout", f"timeout may only lower the job time limit of {limit:g} s"
        )
    input_ids = {name: ref.array for name, ref in body.inputs.items()}
    records = await state.arrays.get_many(list(input_ids.values())) if input_ids else []
    refs = {}
    for (name, array_id), record in zip(input_ids.items(), records, strict=True):
        if record is None or not record.visible or record.owner != owner:
            raise ApiError(422, "unknown_array", f"input '{name}': no array with id '{array_id}'")
        refs[name] = record
    try:
        infos = {n: _ArrayInfo(tuple(r.shape), np.dtype(r.dtype)) for n, r in refs.items()}
        spec.check_inputs(infos, params)
    except InputError as exc:
        raise ApiError(422, "invalid_inputs", f"{body.task}: {exc}") from None

    job_id = uuid.uuid4().hex
    clean_params = params.model_dump(mode="json")
    missing = await state.jobs.create(
        job_id, body.task, clean_params, input_ids, owner, body.timeout
    )
    if missing is not None:  # deleted between the check and the pin
        raise ApiError(422, "unknown_array", f"input '{missing}': array is gone")
    payload = TaskPayload(
        job_id=job_id,
        task=body.task,
        params=clean_params,
        inputs={name: record.ref() for name, record in refs.items()},
        timeout=body.timeout,
        owner=owner,
    )
    try:
        await enqueue(state.settings, payload)
    except BaseException:
        await state.redis.delete(state.jobs.key(job_id))
        await state.redis.zrem(state.jobs.index_key, job_id)
        await free_arrays(state, await state.jobs.release_inputs(job_id))
        raise
    record = await state.jobs.get(job_id)
    response.headers["Location"] = f"/jobs/{job_id}"
    return record.view() if record else None


async def _wait_for_end(state: AppState, job_id: str, owner: str, wait: float) -> JobRecord:
    """Long-poll: woken by the job's events, never by polling Redis in a loop."""
    deadline = time.monotonic() + wait
    with state.hub.subscribe(job_id) as events:
        record = await _load(state, job_id, owner)
        while not record.status.is_final:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(events.get(), timeout=remaining)
            except TimeoutError:
                break
            while not events.empty():
                events.get_nowait()
            record = await _load(state, job_id, owner)
    return record


@router.get("/{job_id}", response_model=JobView, responses={404: {"description": "unknown job"}})
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
    return (await _load(state, job_id, owner)).view()


@router.get(
    "/{job_id}/result",
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
    response_model=JobView,
    responses={404: {"description": "unknown job"}, 409: {"description": "already ended"}},
)
async def cancel_job(job_id: str, state: State, owner: Owner) -> Any:
    """Cancel a queued job, or stop a running one (its worker process is interrupted)."""
    record = await _load(state, job_id, owner)
    before = await state.jobs.cancel(job_id)
    if before == "queued":
        await free_arrays(state, await state.jobs.release_inputs(job_id))
    elif before != "running":
        raise ApiError(
            409, "job_finished", f"job already {record.status.value}", {"status": before}
        )
    record = await _load(state, job_id, owner)
    return record.view()

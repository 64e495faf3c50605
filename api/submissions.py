"""Submissions: every check before anything is written, then the records and the messages.

The jobs router calls these; so does anything else that starts a job from the API process
(a waiting job whose upstream has succeeded). Nothing is queued unless it is valid, and a
submission whose publish fails leaves nothing behind (`_undo`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api.deps import AppState
from api.enqueue import enqueue_many
from api.errors import ApiError
from shared.arrays import lifecycle
from shared.arrays.store import ArrayRecord
from shared.registry import InputError, LimitError, get_job
from shared.schemas import JobStatus, JobSubmission, JobView, TaskPayload


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


@dataclass
class Prepared:
    """A validated submission, ready to be recorded and published."""

    body: JobSubmission
    params: dict[str, Any]
    inputs: dict[str, ArrayRecord]
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def payload(self, owner: str) -> TaskPayload:
        return TaskPayload(
            job_id=self.job_id,
            task=self.body.task,
            params=self.params,
            inputs={name: record.ref() for name, record in self.inputs.items()},
            timeout=self.body.timeout,
            owner=owner,
        )


async def prepare(state: AppState, body: JobSubmission, owner: str) -> Prepared:
    """Every check that can be made before anything is written; raises ApiError (4xx)."""
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
        infos = {n: r.info() for n, r in refs.items()}
        spec.check_inputs(infos, params)
        spec.check_memory(infos, params, *state.settings.job_memory_budget)
    except LimitError as exc:
        detail = {"estimate_bytes": exc.estimate, "limit_bytes": exc.limit, "setting": exc.setting}
        raise ApiError(422, "job_too_large", f"{body.task}: {exc}", detail) from None
    except InputError as exc:
        raise ApiError(422, "invalid_inputs", f"{body.task}: {exc}") from None
    return Prepared(body=body, params=params.model_dump(mode="json"), inputs=refs)


async def _record(state: AppState, job: Prepared, owner: str) -> JobView:
    """Create the queued record and pin the inputs; the view is built, not read back."""
    body = job.body
    input_ids = {name: record.id for name, record in job.inputs.items()}
    missing = await state.jobs.create(
        job.job_id, body.task, job.params, input_ids, owner, body.timeout
    )
    if missing is not None:  # deleted between the check and the pin
        raise ApiError(422, "unknown_array", f"input '{missing}': array is gone")
    return JobView(
        id=job.job_id,
        task=body.task,
        status=JobStatus.queued,
        params=job.params,
        inputs=input_ids,
        created_at=time.time(),
    )


async def _undo(state: AppState, jobs: list[Prepared]) -> None:
    """Remove records whose messages could not be published: nothing is left behind."""
    for job in jobs:
        released = await state.jobs.release_inputs(job.job_id)
        await state.jobs.discard(job.job_id, job.body.task)
        await lifecycle.free_async(state.arrays, released)


async def submit(state: AppState, jobs: list[Prepared], owner: str) -> list[JobView]:
    views: list[JobView] = []
    try:
        for job in jobs:
            views.append(await _record(state, job, owner))
        await enqueue_many(state.settings, [job.payload(owner) for job in jobs])
    except BaseException:
        await _undo(state, jobs[: len(views)])
        raise
    return views

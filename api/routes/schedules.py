"""/schedules: periodic jobs (cron expressions or fixed intervals), each run a normal job.

The store and the scheduler pass are in shared/schedules.py; here are the HTTP side and
`fire`, the pass's way of submitting one run (as `POST /jobs` would, for the schedule's owner).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Response

from api import submissions
from api.deps import AppState, Owner, State
from api.errors import ApiError, not_found
from api.openapi import LOCATION
from shared.schedules import CronError, RunRefused, ScheduleRecord, first_run, parse_cron
from shared.schemas import (
    MAX_SCHEDULE_PARAMS,
    MAX_SCHEDULES,
    SCHEDULE_TAG,
    JobSubmission,
    ScheduleCreate,
    ScheduleList,
    ScheduleSpec,
    ScheduleView,
    is_id,
)

router = APIRouter(prefix="/schedules", tags=["schedules"])


def submission_of(spec: ScheduleSpec, schedule_id: str) -> JobSubmission:
    """One run's submission: the schedule's job part, tagged with the schedule's id."""
    return JobSubmission(
        task=spec.task,
        params=spec.params,
        inputs=dict(spec.inputs),
        timeout=spec.timeout,
        parallel=spec.parallel,
        priority=spec.priority,
        retries=spec.retries,
        tags={**spec.tags, SCHEDULE_TAG: schedule_id},
    )


async def fire(state: AppState, record: ScheduleRecord) -> str:
    """Submit one run of `record` for its owner; RunRefused (its message recorded on the
    schedule) when the submission is refused, e.g. an input array expired or was deleted."""
    body = submission_of(record.spec, record.id)
    try:
        job = await submissions.prepare(state, body, record.owner)
        (view,) = await submissions.submit(state, [job], record.owner)
    except ApiError as exc:
        raise RunRefused(f"{exc.code}: {exc.message}") from None
    return view.id


async def _load(state: AppState, schedule_id: str, owner: str) -> ScheduleRecord:
    """The caller's schedule, or 404 (also for another owner's)."""
    record = await state.schedules.get(schedule_id) if is_id(schedule_id) else None
    if record is None or record.owner != owner:
        raise not_found("schedule", schedule_id)
    return record


@router.post(
    "",
    summary="Create a schedule",
    status_code=201,
    response_model=ScheduleView,
    responses={
        201: {"description": "created; `Location` is the schedule's path", "headers": LOCATION},
        409: {"description": f"the caller has {MAX_SCHEDULES} schedules already"},
        422: {"description": "a bad cron expression, or a job part POST /jobs would refuse"},
    },
)
async def create_schedule(
    body: ScheduleCreate, state: State, owner: Owner, response: Response
) -> Any:
    """Run a job periodically: every `every` seconds (the first run one interval from now)
    or at the times of a 5-field `cron` expression (UTC). The job part is validated as
    `POST /jobs` validates it; each run is a job tagged `schedule: <id>` (list them with
    `GET /jobs?tag=schedule:<id>`). Ticks missed while no scheduler ran give one catch-up run."""
    if len(json.dumps(body.params)) > MAX_SCHEDULE_PARAMS:
        raise ApiError(
            422, "invalid_params", f"a schedule's params are at most {MAX_SCHEDULE_PARAMS} bytes"
        )
    if body.cron is not None:
        try:
            parse_cron(body.cron)
        except CronError as exc:
            raise ApiError(422, "invalid_cron", str(exc)) from None
    schedule_id = uuid.uuid4().hex
    await submissions.prepare(state, submission_of(body, schedule_id), owner)
    now = time.time()
    spec = ScheduleSpec.model_validate(body.model_dump())
    record = ScheduleRecord(id=schedule_id, owner=owner, spec=spec, created_at=now)
    at = first_run(spec, now)
    if not await state.schedules.create(record, at, MAX_SCHEDULES):
        raise ApiError(
            409,
            "too_many_schedules",
            f"at most {MAX_SCHEDULES} schedules per key: DELETE /schedules/{{id}} one first",
        )
    record.next_run = at
    response.headers["Location"] = f"/schedules/{schedule_id}"
    return record.view()


@router.get("", summary="List your schedules", response_model=ScheduleList)
async def list_schedules(state: State, owner: Owner) -> Any:
    """The caller's schedules, oldest first (at most MAX_SCHEDULES of them)."""
    records = await state.schedules.of_owner(owner)
    return ScheduleList(schedules=[r.view() for r in records])


@router.get(
    "/{schedule_id}",
    summary="Get a schedule",
    response_model=ScheduleView,
    responses={404: {"description": "unknown schedule"}},
)
async def get_schedule(schedule_id: str, state: State, owner: Owner) -> Any:
    """A schedule with its next run, last run and job, run count and last refusal."""
    return (await _load(state, schedule_id, owner)).view()


@router.delete(
    "/{schedule_id}",
    summary="Delete a schedule",
    status_code=204,
    responses={204: {"description": "deleted"}, 404: {"description": "unknown schedule"}},
)
async def delete_schedule(schedule_id: str, state: State, owner: Owner) -> Response:
    """Stop a schedule: no tick fires after this answers (a run the scheduler was submitting
    at that very moment still is). Its past runs are jobs and stay."""
    if not is_id(schedule_id) or not await state.schedules.delete(schedule_id, owner):
        raise not_found("schedule", schedule_id)
    return Response(status_code=204)

"""Submissions: every check before anything is written, then the records and the messages.

The jobs router calls these; so does anything else that starts a job from the API process
(a waiting job whose upstream has succeeded). Nothing is queued unless it is valid, and a
submission whose publish fails leaves nothing behind (`_undo`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import numpy as np
from anyio import to_thread
from pydantic import BaseModel, ValidationError

from api.deps import AppState
from api.enqueue import enqueue_many
from api.errors import ApiError
from shared import splits
from shared.arrays import lifecycle
from shared.arrays.store import ArrayRecord
from shared.registry import HasShapeAndDtype, InputError, JobSpec, LimitError, get_job
from shared.schemas import (
    MAX_DELAY_S,
    ArrayInput,
    ArrayRef,
    JobInput,
    JobStatus,
    JobSubmission,
    JobView,
    PartRef,
    Parts,
    TaskPayload,
)
from shared.workers import WorkerStore


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


@dataclass
class Prepared:
    """A validated submission, ready to be recorded and published."""

    body: JobSubmission
    params: dict[str, Any]
    inputs: dict[str, ArrayRecord]
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # A parallel job: its parts' ranges, ids, and the in-place output they write (if any).
    parts: list[splits.PartInfo] = field(default_factory=list)
    part_ids: list[str] = field(default_factory=list)
    output: splits.Output | None = None
    output_ref: ArrayRef | None = None
    # Inputs from jobs not ended yet (api/pipelines.py): the job is recorded `waiting`.
    upstream: dict[str, JobInput] = field(default_factory=dict)
    # The launch of a waiting job (its claim token): the record exists and is promoted.
    claim: str = ""
    # Retries allowed (the job's, lowered by the submission's); the start time of a delayed
    # job (unix time; None: now).
    retries: int = 0
    not_before: float | None = None

    def queue_fields(self) -> dict[str, str]:
        """The record's fields for the queue features (priority, tags, retries, delay)."""
        body = self.body
        fields = {"priority": str(body.priority), "retries": str(self.retries)}
        if body.tags:
            fields["tags"] = json.dumps(body.tags)
        if self.not_before is not None:
            fields["not_before"] = repr(self.not_before)
        return fields

    @property
    def due(self) -> float | None:
        """When a delayed job is to be published (None: at once)."""
        if self.not_before is None or self.not_before <= time.time():
            return None
        return self.not_before

    def payloads(self, owner: str) -> list[TaskPayload]:
        """The job's message, or one per part."""
        whole = TaskPayload(
            job_id=self.job_id,
            task=self.body.task,
            params=self.params,
            inputs={name: record.ref() for name, record in self.inputs.items()},
            timeout=self.body.timeout,
            owner=owner,
            priority=self.body.priority,
            retries=self.retries,
        )
        if not self.parts:
            return [whole]
        return [
            whole.model_copy(
                update={
                    "job_id": part_id,
                    "part": _part_ref(self.job_id, info),
                    "output": self.output_ref,
                    "retries": 0,  # a part is not retried: its failure fails the job
                }
            )
            for part_id, info in zip(self.part_ids, self.parts, strict=True)
        ]


def _part_ref(job_id: str, info: splits.PartInfo) -> PartRef:
    return PartRef(
        parent=job_id,
        index=info.index,
        total=info.total,
        start=info.start,
        stop=info.stop,
        length=info.length,
    )


async def prepare(
    state: AppState,
    body: JobSubmission,
    owner: str,
    upstream: dict[str, JobInput] | None = None,
) -> Prepared:
    """Every check that can be made before anything is written; raises ApiError (4xx).

    With `upstream` (inputs from jobs not ended yet, api/pipelines.py:resolve), the checks
    that need every input's shape wait for the job's launch; the rest are made now."""
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
    retries = spec.retries if body.retries is None else min(spec.retries, body.retries)
    not_before = _start_time(body)
    input_ids = {}
    for name, ref in body.inputs.items():
        if not isinstance(ref, ArrayInput):
            raise ApiError(422, "unknown_array", f"input '{name}': job inputs are not supported")
        input_ids[name] = ref.array
    records = await state.arrays.get_many(list(input_ids.values())) if input_ids else []
    refs = {}
    for (name, array_id), record in zip(input_ids.items(), records, strict=True):
        if record is None or not record.visible or record.owner != owner:
            raise ApiError(422, "unknown_array", f"input '{name}': no array with id '{array_id}'")
        refs[name] = record
    if upstream:
        return Prepared(
            body=body,
            params=params.model_dump(mode="json"),
            inputs=refs,
            upstream=upstream,
            retries=retries,
            not_before=not_before,
        )
    try:
        infos = {n: r.info() for n, r in refs.items()}
        spec.check_inputs(infos, params)
        spec.check_memory(infos, params, *state.settings.job_memory_budget)
    except LimitError as exc:
        detail = {"estimate_bytes": exc.estimate, "limit_bytes": exc.limit, "setting": exc.setting}
        raise ApiError(422, "job_too_large", f"{body.task}: {exc}", detail) from None
    except InputError as exc:
        raise ApiError(422, "invalid_inputs", f"{body.task}: {exc}") from None
    job = Prepared(
        body=body,
        params=params.model_dump(mode="json"),
        inputs=refs,
        retries=retries,
        not_before=not_before,
    )
    if body.parallel != 1:
        await _plan_parts(state, job, spec, infos, params)
    return job


def _start_time(body: JobSubmission) -> float | None:
    """A delayed job's start (unix time), from `delay` or `not_before` (naive = UTC)."""
    if body.delay is not None:
        return time.time() + body.delay
    if body.not_before is None:
        return None
    when = body.not_before
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    at = when.timestamp()
    if at > time.time() + MAX_DELAY_S:
        raise ApiError(
            422, "invalid_delay", f"not_before may be at most {MAX_DELAY_S:g} s from now"
        )
    return at


async def _plan_parts(
    state: AppState,
    job: Prepared,
    spec: JobSpec,
    infos: Mapping[str, HasShapeAndDtype],
    params: BaseModel,
) -> None:
    """Cut a parallel job into parts (`parallel` N, or `auto`: this domain's live worker
    processes, each part at least `parallel_min_part_bytes` of its split input). One part
    leaves it an ordinary job; `auto` never refuses, N > 1 on a job that cannot split is 422."""
    auto = job.body.parallel == "auto"
    try:
        split = spec.split_for(infos, params)
    except splits.NotSplittable as exc:
        if auto:
            return
        raise ApiError(422, "not_splittable", f"{spec.name}: {exc}") from None
    if split.partial_bytes > splits.MAX_PARTIAL_BYTES:
        if auto:
            return
        raise ApiError(
            422,
            "not_splittable",
            f"{spec.name}: each part would return about {split.partial_bytes} bytes to combine;"
            f" the limit is {splits.MAX_PARTIAL_BYTES}: run it as one job",
        )
    length = split.length(infos)
    if auto:
        settings = state.settings
        workers = await WorkerStore(state.redis, settings).live()
        slots = sum(w.concurrency for w in workers if w.domain == settings.shm_domain)
        split_bytes = max(job.inputs[name].nbytes for name in split.inputs)
        wanted = min(max(1, slots), max(1, split_bytes // settings.parallel_min_part_bytes))
    else:
        assert isinstance(job.body.parallel, int)
        wanted = job.body.parallel
    parts = splits.plan(length, wanted, split.axis())
    if len(parts) < 2:
        return
    job.parts = parts
    job.part_ids = [uuid.uuid4().hex for _ in parts]
    job.output = split.output
    job.retries = 0  # a part's failure fails the job: a parallel job is not retried


async def _reserve_output(state: AppState, job: Prepared, owner: str) -> None:
    """Reserve a parallel job's output and create its segment (pooled pages if any fit), so
    every part can attach it by name; it becomes visible only when the job succeeds."""
    output = job.output
    assert output is not None
    output_id = uuid.uuid4().hex
    dtype = np.dtype(output.dtype)
    write = lifecycle.ArrayWrite(state.arrays, output_id, output.nbytes, owner)
    await write.begin(output.shape, dtype.str, output.order, job.job_id)
    try:
        await to_thread.run_sync(write.open)
        write.close()
    except BaseException:
        await lifecycle.abandon_async(write)
        raise
    job.output_ref = ArrayRef(
        id=output_id,
        segment=write.name,
        shape=output.shape,
        dtype=dtype.str,
        order=output.order,
        nbytes=output.nbytes,
        domain=state.settings.shm_domain,
    )


async def _free_output(state: AppState, job: Prepared) -> None:
    """The reserved output of a job whose record was not written (nothing else holds it)."""
    if job.output_ref is not None:
        await lifecycle.free_async(state.arrays, [job.output_ref.id])


async def _record(state: AppState, job: Prepared, owner: str) -> JobView:
    """Create the queued record (and a parallel job's parts) and pin the inputs; the view is
    built, not read back."""
    body = job.body
    if job.upstream:
        return await _record_waiting(state, job, owner)
    input_ids = {name: record.id for name, record in job.inputs.items()}
    extra: dict[str, str] = job.queue_fields()
    parts: list[dict[str, str]] = []
    if job.parts:
        if job.output is not None:
            await _reserve_output(state, job, owner)
        output_id = job.output_ref.id if job.output_ref else ""
        extra |= {
            "parts_total": str(len(job.parts)),
            "part_ids": " ".join(job.part_ids),
            "output_id": output_id,
            "parallel": str(body.parallel),
        }
        common = {  # what every part's record holds alike
            "task": body.task,
            "owner": owner,
            "params": json.dumps(job.params),
            "inputs": json.dumps(input_ids),
            "timeout": "" if body.timeout is None else repr(body.timeout),
            "parent": job.job_id,
            "output": job.output_ref.model_dump_json() if job.output_ref else "",
            "priority": str(body.priority),
        }
        for part_id, info in zip(job.part_ids, job.parts, strict=True):
            part = _part_ref(job.job_id, info)
            parts.append(
                {
                    **common,
                    "id": part_id,
                    "part_index": str(part.index),
                    "part": part.model_dump_json(),
                }
            )
    if job.claim:  # a waiting job's launch: its record (and pins) exist
        fields = {"params": json.dumps(job.params), **extra}
        output_id = extra.get("output_id", "")
        outcome = await state.dependencies.launch(
            job.job_id, job.claim, fields, parts=parts, output_id=output_id
        )
        if outcome != "ok":  # cancelled meanwhile
            await _free_output(state, job)
            raise ApiError(409, "job_finished", f"job {job.job_id} is {outcome}")
        missing = None
    else:
        missing = await state.jobs.create(
            job.job_id,
            body.task,
            job.params,
            input_ids,
            owner,
            body.timeout,
            extra=extra,
            parts=parts,
            output_id=extra.get("output_id", ""),
            due=job.due,
        )
    if missing is not None:  # deleted between the check and the pin
        await _free_output(state, job)
        raise ApiError(422, "unknown_array", f"input '{missing}': array is gone")
    return JobView(
        id=job.job_id,
        task=body.task,
        status=JobStatus.queued,
        params=job.params,
        inputs=input_ids,
        created_at=time.time(),
        parts=Parts(total=len(job.parts), ids=job.part_ids) if job.parts else None,
        priority=body.priority,
        tags=body.tags,
        retries=job.retries,
        not_before=job.not_before,
    )


_REFUSED = {
    "missing": ("unknown_array", "array is gone"),
    "unknown_job": ("unknown_job", "no job with id '{job}'"),
    "upstream_failed": ("upstream_failed", "upstream job {job} {status}"),
    "no_array": ("invalid_inputs", "the result of job {job} has no array{where}"),
    "gone": ("unknown_array", "the result array of job {job} is gone"),
}


async def _record_waiting(state: AppState, job: Prepared, owner: str) -> JobView:
    """Create the waiting record, linked to its upstreams (an upstream that ended since
    `prepare` looked is resolved, or refuses the job, in the same script)."""
    body = job.body
    input_ids = {name: record.id for name, record in job.inputs.items()}
    outcome, name, status = await state.dependencies.create(
        job.job_id,
        body.task,
        owner,
        job.params,
        input_ids,
        job.upstream,
        timeout=body.timeout,
        extra={"parallel": str(body.parallel), **job.queue_fields()},
    )
    if outcome != "ok":
        code, text = _REFUSED[outcome]
        ref = job.upstream.get(name)
        where = f" under key '{ref.key}'" if ref is not None and ref.key else ""
        text = text.format(job=ref.job if ref else "", status=status, where=where)
        raise ApiError(422, code, f"input '{name}': {text}")
    return JobView(
        id=job.job_id,
        task=body.task,
        status=JobStatus.waiting,
        params=job.params,
        inputs=input_ids,
        created_at=time.time(),
        upstream=job.upstream,
        priority=body.priority,
        tags=body.tags,
        retries=job.retries,
        not_before=job.not_before,
    )


async def _undo(state: AppState, jobs: list[Prepared], owner: str) -> None:
    """Remove records whose messages could not be published: nothing is left behind (a
    waiting job's launch that could not be published ends it failed instead)."""
    for job in jobs:
        if job.claim:
            _, released = await state.dependencies.abort(
                job.job_id, job.claim, "the job could not be queued (its message was not sent)"
            )
        else:
            released = await state.jobs.release_inputs(job.job_id, mode="discard")
            await state.jobs.discard(job.job_id, job.body.task, owner)
        await lifecycle.free_async(state.arrays, released)
    discarded = [job.job_id for job in jobs if not job.claim]
    if discarded:  # a batch's links to its own entries
        await state.dependencies.unlink(discarded)


async def submit(state: AppState, jobs: list[Prepared], owner: str) -> list[JobView]:
    views: list[JobView] = []
    try:
        for job in jobs:
            views.append(await _record(state, job, owner))
        # Waiting jobs have no message until their launch, delayed ones until they are due
        # (the create script put them in the due index; shared/due.py publishes them).
        for job in jobs:
            if job.claim and (at := job.due) is not None:
                await state.due.put(job.job_id, at)
        payloads = [
            p for job in jobs if not job.upstream and job.due is None for p in job.payloads(owner)
        ]
        if payloads:
            await enqueue_many(state.settings, payloads)
    except BaseException:
        await _undo(state, jobs[: len(views)], owner)
        raise
    return views

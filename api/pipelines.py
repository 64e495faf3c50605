"""Jobs that feed jobs, the API's side: job inputs resolved at submission, ready jobs launched.

An input `{"job": id}` (`{"job": id, "key": k}`) names an upstream job of the same owner;
in `POST /jobs/batch` also `{"job": "#i"}`, entry i of the batch, which must come before the
entry naming it. Ids of existing jobs cannot name a job not yet made, and `#` refs only point
backwards, so no submission can make a cycle. An upstream that has succeeded is resolved now to
its array result (an ordinary array input from then on); one that has not ended makes the job
`waiting` (shared/dependencies.py keeps its records); one that failed refuses the submission.

A waiting job whose inputs are all resolved is announced `ready` on the events channel; every
API process hears it (api/events.py), one claims it, and `launch` runs the same submission
steps as a fresh job (api/submissions.py) on the record that waited. A launch whose checks
fail ends the job `failed` with their message.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from api import submissions
from api.deps import AppState
from api.errors import ApiError
from shared.arrays import lifecycle
from shared.schemas import (
    ArrayInput,
    JobInput,
    JobStatus,
    JobSubmission,
    Parallel,
    is_id,
)

log = logging.getLogger("forklift.api")


@dataclass
class Resolved:
    """A submission whose job inputs are resolved: `body` has array inputs only, `upstream`
    the inputs still to come from jobs that have not ended (empty: an ordinary job)."""

    body: JobSubmission
    upstream: dict[str, JobInput] = field(default_factory=dict)


def array_of(result: object, key: str | None) -> str | None:
    """The array id of a result `{"array": meta}` (of `result[key]` with a key), else None."""
    value = result
    if key is not None:
        value = result.get(key) if isinstance(result, dict) else None
    if not isinstance(value, dict) or set(value) != {"array"}:
        return None
    meta = value["array"]
    array_id = meta.get("id") if isinstance(meta, dict) else None
    return array_id if isinstance(array_id, str) else None


def _unknown(name: str, job: str) -> ApiError:
    return ApiError(422, "unknown_job", f"input '{name}': no job with id '{job}'")


def _batch_ref(name: str, ref: str, batch: Sequence[str] | None, index: int) -> str:
    """The id of the batch entry `#i` names; it must be an earlier one."""
    if batch is None:
        raise ApiError(
            422,
            "invalid_inputs",
            f"input '{name}': '{ref}' names an entry of the same batch; only POST /jobs/batch"
            " takes it (here give the job's id)",
        )
    text = ref[1:]
    i = int(text) if text.isdigit() else -1
    if not 0 <= i < index:
        which = "this entry itself" if i == index else "no earlier entry"
        allowed = f"#0 to #{index - 1}" if index else "none, for the first entry"
        raise ApiError(
            422,
            "invalid_reference",
            f"input '{name}': '{ref}' names {which}; a job may only take the result of an"
            f" earlier entry of the batch ({allowed}), so a batch cannot hold a cycle",
            {"reference": ref, "entry": index},
        )
    return batch[i]


async def resolve(
    state: AppState,
    body: JobSubmission,
    owner: str,
    batch: Sequence[str] | None = None,
    index: int = 0,
) -> Resolved:
    """Resolve `body`'s job inputs; raises ApiError (422) for an unknown or another key's job
    (the same answer), a bad `#` ref, an upstream that failed, a result without that array.

    `batch`: the ids of the batch's entries before this one (`index`), which `#i` names.
    """
    jobs = {n: ref for n, ref in body.inputs.items() if isinstance(ref, JobInput)}
    if not jobs:
        return Resolved(body)
    upstream: dict[str, JobInput] = {}
    looked_up: dict[str, str] = {}  # input name -> id of an existing job
    for name, ref in jobs.items():
        if ref.job.startswith("#"):
            upstream[name] = JobInput(job=_batch_ref(name, ref.job, batch, index), key=ref.key)
        elif not is_id(ref.job):
            raise _unknown(name, ref.job)
        else:
            looked_up[name] = ref.job
    records = await state.jobs.get_many(list(looked_up.values())) if looked_up else []
    arrays: dict[str, str] = {}
    for (name, job_id), record in zip(looked_up.items(), records, strict=True):
        key = jobs[name].key
        if record is None or record.owner != owner or record.parent:
            raise _unknown(name, job_id)
        if record.status is JobStatus.succeeded:
            array_id = array_of(record.result, key)
            if array_id is None:
                where = f" under key '{key}'" if key is not None else ""
                hint = "" if key is not None else ' (a dict result: name one with "key")'
                raise ApiError(
                    422,
                    "invalid_inputs",
                    f"input '{name}': the result of job {job_id} has no array{where}{hint}",
                )
            arrays[name] = array_id
        elif record.status in (JobStatus.failed, JobStatus.cancelled):
            raise ApiError(
                422,
                "upstream_failed",
                f"input '{name}': upstream job {job_id} {record.status.value}"
                + (f": {record.error}" if record.error else ""),
                {"upstream": job_id, "status": record.status.value},
            )
        else:
            upstream[name] = JobInput(job=job_id, key=key)
    inputs: dict[str, ArrayInput | JobInput] = {}
    for name, given in body.inputs.items():
        if isinstance(given, ArrayInput):
            inputs[name] = given
        elif name in arrays:
            inputs[name] = ArrayInput(array=arrays[name])
    return Resolved(body.model_copy(update={"inputs": inputs}), upstream)


def _parallel(value: object) -> Parallel:
    if isinstance(value, int) and value >= 1:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return "auto" if value == "auto" else 1


async def launch(state: AppState, job_id: str) -> bool:
    """Claim a ready waiting job and queue it through the submission steps; a launch whose
    checks fail ends it failed. Returns whether this call launched (or ended) it."""
    store = state.dependencies
    token = uuid.uuid4().hex
    if not await store.claim(job_id, token):
        return False  # not ready, launched already, or another API launches it
    record = await state.jobs.get(job_id)
    if record is None or record.status is not JobStatus.waiting:
        return False
    body = JobSubmission(
        task=record.task,
        params=record.params,
        inputs={name: ArrayInput(array=a) for name, a in record.inputs.items()},
        timeout=record.timeout,
        parallel=_parallel(record.parallel),
        priority=record.priority,
        retries=record.retries,
        tags=record.tags,
    )
    try:
        job = await submissions.prepare(state, body, record.owner)
        job.job_id, job.claim = job_id, token
        job.not_before = record.not_before  # a delay counts from the submission
        await submissions.submit(state, [job], record.owner)
    except ApiError as exc:  # its checks failed on the arrays it got: it ends here
        outcome, due = await store.abort(job_id, token, exc.message)
        await lifecycle.free_async(state.arrays, due)
        if outcome == "ok":
            log.info("job %s: not launched: %s", job_id, exc.message)
    return True


class Launcher:
    """What the event hub calls on a `ready` event: the launch runs in a task of its own
    (kept referenced until it ends), never in the hub's read loop."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.tasks: set[asyncio.Task[bool]] = set()

    def __call__(self, job_id: str) -> None:
        if not is_id(job_id):
            return
        task = asyncio.create_task(self._run(job_id), name=f"forklift-launch-{job_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job_id: str) -> bool:
        try:
            return await launch(self.state, job_id)
        except Exception as exc:  # Redis down, a publish that failed: the reaper re-announces
            log.warning("job %s: launch failed (%s); retried once its claim lapses", job_id, exc)
            return False

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

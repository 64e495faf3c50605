"""Runs one job in a worker child: start, attach inputs, call, store the result, finish.

Celery-free on purpose (only its time-limit exception is named), so the job lifecycle reads
top to bottom in one place. Every path ends the record and releases the inputs exactly once;
the attempt that ends the record releases them in the same script (shared/jobstore.py).
A job that raised with retries left (worker/retrying.py) does not end: its record goes back
to `queued`, due again later, its inputs still pinned for the next run.

A part of a parallel job (shared/splits.py) runs the same way over its slice, writing into
its slice of the job's reserved output; the part whose success completes the job (its finish
says so) then runs the combine and ends the job. A splittable job runs as one part even when
not parallel: an in-place output is written straight into its result segment, and partials
are computed the split's way (blockwise, without the plain function's temporaries).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import numpy as np
from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError

from shared import splits, trust
from shared.arrays import lifecycle, mappings, replicas
from shared.arrays.copying import copy_into
from shared.arrays.npy import check_dtype
from shared.arrays.segments import Segment, ShmFullError, ndarray_view
from shared.arrays.store import ArrayRecord
from shared.jobstore import Due
from shared.redis_io import REDIS_ERRORS
from shared.registry import InputError, JobSpec, get_job
from shared.schemas import ArrayRef, JobStatus, TaskPayload
from worker import cancel, retrying
from worker.runtime import Runtime, runtime

log = logging.getLogger("forklift.worker")

T = TypeVar("T")


class JobFailure(Exception):
    """A failure whose message is meant for the client as is."""


class RedisUnavailable(Exception):
    """Redis stayed unreachable while the job's record had to change: do not ack."""


class Ended(NamedTuple):
    """How a delivery ended, for the Celery task (worker/tasks.py): `outcome` is the job's
    final status, 'retrying' (a retry is scheduled), 'moved' (another attempt holds it) or
    why it did not start ('missing', a status); `error` the job's error, if any."""

    outcome: str
    error: str | None = None


# How long a start or finish waits for Redis (a restart, a failover) before giving up and
# handing the message back instead of acking it.
REDIS_RETRY_S = 60.0


def redis_retrying(call: Callable[[], T], what: str, budget: float = REDIS_RETRY_S) -> T:
    """`call()`, retried with backoff on transient Redis errors for up to `budget` seconds.

    The scripts it wraps are idempotent for their caller (an attempt token, the `released`
    flag), so one that ran before its reply was lost may run again.
    """
    deadline = time.monotonic() + budget
    delay = 0.05
    while True:
        try:
            return call()
        except REDIS_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise RedisUnavailable(
                    f"{what}: Redis unreachable for {budget:g} s: {exc}"
                ) from exc
            log.warning("%s: Redis error (%s); retrying in %.2f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def run(payload: TaskPayload, node: str = "") -> Ended:
    """Run the job; returns how it ended (or why it was skipped).

    `node` is the Celery worker's name (for the dashboard's workers and their jobs, and for
    the reaper's check that this worker still holds the job). Returns only once the record
    is no longer running on this attempt's behalf; raises RedisUnavailable otherwise.
    """
    with cancel.watching(payload.job_id):
        return _run(runtime(), payload, node)


def _free(rt: Runtime, array_ids: list[str]) -> None:
    """Free what a release made due; a failure leaves them to the janitor (they expire)."""
    try:
        lifecycle.free(rt.arrays, array_ids)
    except REDIS_ERRORS as exc:
        log.warning("freeing %d arrays failed (the janitor will): %s", len(array_ids), exc)


def _run(rt: Runtime, payload: TaskPayload, node: str) -> Ended:
    pid = os.getpid()
    domain = rt.settings.shm_domain
    job_id = payload.job_id
    token = uuid.uuid4().hex  # this attempt: only its holder may finish the record
    outcome, attempts, due = redis_retrying(
        lambda: rt.jobs.start(job_id, rt.hostname, pid, domain, node, token), f"job {job_id} start"
    )
    _free(rt, due)
    began = time.monotonic()
    if outcome == "missing" and payload.inputs and payload.part is None:
        # The record is gone (deleted by hand): release what the message says it pinned,
        # once per job id. (A part pins nothing: its job holds the inputs.)
        ids = [ref.id for ref in payload.inputs.values()]
        _free(
            rt,
            redis_retrying(
                lambda: rt.jobs.release_inputs(job_id, mode="missing", input_ids=ids),
                f"job {job_id} release",
            ),
        )
    if outcome != "started":
        log.info("job %s not started: %s", job_id, outcome)
        return Ended(outcome)
    log.debug("job %s (%s) started, attempt %d", job_id, payload.task, attempts)
    created: list[str] = []
    status, error, result = JobStatus.failed, None, None
    retry_in: float | None = None  # the job raised and runs again after this many seconds
    try:
        result = _execute(rt, payload, created)
        status = JobStatus.succeeded
    except cancel.JobCancelled:
        status, error = JobStatus.cancelled, "cancelled by the client"
    except SoftTimeLimitExceeded:
        limit = payload.timeout or rt.settings.job_time_limit
        error = f"time limit exceeded: the job ran longer than its limit of {limit:g} s"
    except MemoryError:
        cap = rt.settings.child_memory_limit_bytes
        error = "memory limit: the job ran out of memory" + (
            f" (it may add at most {cap} bytes; FORKLIFT_CHILD_MEMORY_LIMIT_BYTES)" if cap else ""
        )
    except JobFailure as exc:
        error = str(exc)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        retry_in = retrying.retry_delay(exc, get_job(payload.task), payload)
        if retry_in is None:
            log.info("job %s failed: %s", job_id, error)
    final = status
    ending = Due([], [])
    ended = status.value  # what this attempt logs: a status, or 'moved' (another one holds it)
    if status is JobStatus.cancelled:
        # The record turned final when the client cancelled; this attempt has stopped
        # reading its inputs, so it releases them (unless a newer attempt holds the job).
        due = redis_retrying(
            lambda: rt.jobs.release_inputs(job_id, mode="owner", token=token),
            f"job {job_id} release",
        )
    elif retry_in is not None:
        final, ended, due = _retry(rt, payload, error or "", retry_in, token)
    else:
        won, ending = redis_retrying(
            lambda: rt.jobs.finish(job_id, status, error=error, result=result, token=token),
            f"job {job_id} finish",
        )
        due = ending.free
        if won != "ok":  # cancelled meanwhile, or another attempt holds it (it releases)
            final = JobStatus(won) if won in JobStatus.__members__ else JobStatus.cancelled
            ended = won
    if final is not JobStatus.succeeded:
        _free(rt, created)
    _free(rt, due)
    if status is JobStatus.succeeded and final is JobStatus.succeeded:
        for parent_id in ending.combine:  # this part completed its job: combine it
            _combine(rt, payload, parent_id, token)
    duration = time.monotonic() - began
    log.info(
        "job %s ended %s in %.3f s",
        job_id,
        ended,
        duration,
        extra={"state": final.value, "duration": round(duration, 6)},
    )
    return Ended(ended, error)


def _retry(
    rt: Runtime, payload: TaskPayload, error: str, retry_in: float, token: str
) -> tuple[JobStatus, str, list[str]]:
    """End this run of a job that raised as a retry due in `retry_in` s (its inputs stay
    pinned). Returns (the record's status, what this attempt logs, ids to free)."""
    job_id = payload.job_id
    won = redis_retrying(
        lambda: rt.jobs.retry(job_id, error=error, delay=retry_in, token=token),
        f"job {job_id} retry",
    )
    if won == "ok":
        log.info(
            "job %s failed (%s); retry %d of %d in %.2f s",
            job_id,
            error,
            payload.retried + 1,
            payload.retries,
            retry_in,
            extra={"retry_in": round(retry_in, 3)},
        )
        return JobStatus.queued, "retrying", []
    # Cancelled meanwhile (this attempt still holds it: it releases), or another holds it.
    due = redis_retrying(
        lambda: rt.jobs.release_inputs(job_id, mode="owner", token=token),
        f"job {job_id} release",
    )
    final = JobStatus(won) if won in JobStatus.__members__ else JobStatus.cancelled
    return final, won, due


def _execute(rt: Runtime, payload: TaskPayload, created: list[str]) -> Any:
    spec = get_job(payload.task)
    if spec is None:
        raise JobFailure(f"unknown task '{payload.task}' on worker {rt.hostname}")
    try:  # a worker whose job module differs from the API's: not the job raising, no retry
        params = spec.validate_params(payload.params)
    except ValidationError as exc:
        raise JobFailure(f"{type(exc).__name__}: {exc}") from None

    def progress(fraction: float, note: str = "") -> None:
        rt.jobs.report_progress(payload.job_id, fraction, note)

    with attached(payload.inputs, rt) as arrays:
        try:
            spec.check_inputs(arrays, params)
        except InputError as exc:  # the same arrays fail the same way: no retry
            raise JobFailure(f"{type(exc).__name__}: {exc}") from None
        limit = rt.settings.child_memory_limit_bytes
        if payload.part is not None:
            return _run_part(rt, spec, payload, params, arrays)
        split = _one_part_split(spec, arrays, params)
        if split is not None and split.output is not None:
            return _run_in_place(rt, payload, params, arrays, split, created)
        if split is not None:  # partials computed the split's way (blockwise, no temporaries)
            with cancel.armed(), memory_limit(limit):
                value = splits.run_whole(split, arrays, params, None)
            return encode_result(value, rt, payload, created)
        with cancel.armed(), memory_limit(limit):
            value = spec.call(params, arrays, progress)
        return encode_result(value, rt, payload, created)


def _split(spec: JobSpec, arrays: dict[str, np.ndarray], params: BaseModel) -> splits.Split:
    try:
        return spec.split_for(arrays, params)
    except splits.NotSplittable as exc:  # the API planned it: the job modules differ
        raise JobFailure(f"{spec.name}: {exc}") from None


def _one_part_split(
    spec: JobSpec, arrays: dict[str, np.ndarray], params: BaseModel
) -> splits.Split | None:
    """The job's split, which one job runs as its one part (an in-place output written
    straight into its segment; partials as the split computes them), else None."""
    if spec.split is None:
        return None
    try:
        return spec.split_for(arrays, params)
    except splits.NotSplittable:
        return None


def _run_part(
    rt: Runtime,
    spec: JobSpec,
    payload: TaskPayload,
    params: BaseModel,
    arrays: dict[str, np.ndarray],
) -> Any:
    """One part: its slices, its slice of the job's output; returns its partial (JSON)."""
    assert payload.part is not None
    split = _split(spec, arrays, params)
    part = payload.part
    info = splits.PartInfo(
        index=part.index,
        total=part.total,
        axis=split.axis(),
        start=part.start,
        stop=part.stop,
        length=part.length,
    )
    limit = rt.settings.child_memory_limit_bytes
    with output_view(payload.output, rt) as out:
        with cancel.armed(), memory_limit(limit):
            partial = splits.run_part(split, arrays, params, out, info)
        del out
    encoded = splits.encode_partial(partial)
    size = len(json.dumps(encoded))
    if size > splits.MAX_PARTIAL_BYTES:
        raise JobFailure(
            f"part {part.index + 1} returned {size} bytes; a part's partial may have at most"
            f" {splits.MAX_PARTIAL_BYTES}"
        )
    return encoded


def _run_in_place(
    rt: Runtime,
    payload: TaskPayload,
    params: BaseModel,
    arrays: dict[str, np.ndarray],
    split: splits.Split,
    created: list[str],
) -> Any:
    """A whole job as one part writing straight into its result segment: no private copy
    of the result, no second copy into shared memory."""
    output = split.output
    assert output is not None
    dtype = check_dtype(np.dtype(output.dtype))
    limit = rt.settings.child_memory_limit_bytes
    try:
        with lifecycle.writing(
            rt.arrays,
            uuid.uuid4().hex,
            output.shape,
            dtype.str,
            output.order,
            output.nbytes,
            payload.owner,
            job=payload.job_id,
        ) as write:
            out = ndarray_view(write.open(), dtype, output.shape, output.order)
            with cancel.armed(), memory_limit(limit):
                splits.run_whole(split, arrays, params, out)
            del out
    except ShmFullError as exc:
        raise JobFailure(f"{exc} (the job's result)") from None
    assert write.record is not None
    created.append(write.record.id)
    return {"array": write.record.meta().model_dump(mode="json")}


@contextlib.contextmanager
def output_view(ref: ArrayRef | None, rt: Runtime) -> Iterator[np.ndarray | None]:
    """A writable view of a parallel job's reserved output (None for a job without one)."""
    if ref is None:
        yield None
        return
    try:
        trust.segment(ref.segment, ref.id, rt.settings, where="the job's message (its output)")
    except trust.Untrusted as exc:
        raise JobFailure(f"the job's output: {exc}") from None
    try:
        segment = mappings.attach(ref.segment, ref.nbytes, writable=True)
    except FileNotFoundError:
        raise JobFailure(f"the job's output segment {ref.segment} is gone") from None
    try:
        yield ndarray_view(segment, np.dtype(ref.dtype), ref.shape, ref.order)
    finally:
        with contextlib.suppress(BufferError):
            segment.close()


def _combine(rt: Runtime, payload: TaskPayload, parent_id: str, token: str) -> None:
    """Make a parallel job's result from its parts' partials and end the job.

    Run by the attempt whose part completed the job; its token holds the job until it ends,
    so the job's inputs and output are released only after this (shared/jobstore.py).
    """
    began = time.monotonic()
    spec = get_job(payload.task)
    created: list[str] = []
    status, error, result = JobStatus.failed, None, None
    try:
        if spec is None:
            raise JobFailure(f"unknown task '{payload.task}' on worker {rt.hostname}")
        params = spec.validate_params(payload.params)
        parent = rt.jobs.get(parent_id)
        if parent is None:
            raise JobFailure(f"job {parent_id} vanished before its combine")
        records = rt.jobs.get_many(parent.part_ids.split())
        partials = [splits.decode_partial(r.result if r else None) for r in records]
        meta = {name: ref.info() for name, ref in payload.inputs.items()}
        split = spec.split_for(meta, params)
        limit = rt.settings.child_memory_limit_bytes
        with output_view(payload.output, rt) as out:
            with memory_limit(limit):
                value = splits.finish(split, partials, params, out)
            del out
        if payload.output is not None:
            del value
            array_id = payload.output.id
            if not rt.arrays.commit(array_id):
                raise JobFailure("the job's output reservation expired before its combine")
            record = rt.arrays.get(array_id)
            if record is None:
                raise JobFailure("the job's output vanished right after its commit")
            result = {"array": record.meta().model_dump(mode="json")}
        else:
            whole = payload.model_copy(update={"job_id": parent_id, "part": None})
            result = encode_result(value, rt, whole, created)
        status = JobStatus.succeeded
    except JobFailure as exc:
        error = str(exc)
    except MemoryError:
        error = "memory limit: the combine of the job's parts ran out of memory"
    except Exception as exc:
        error = f"combining the parts: {type(exc).__name__}: {exc}"
        log.info("job %s combine failed: %s", parent_id, error)
    won, ending = redis_retrying(
        lambda: rt.jobs.finish(parent_id, status, error=error, result=result, token=token),
        f"job {parent_id} finish",
    )
    due = ending.free
    if won != "ok":  # cancelled while combining: this attempt still holds it, release it
        due += redis_retrying(
            lambda: rt.jobs.release_inputs(parent_id, mode="owner", token=token),
            f"job {parent_id} release",
        )
    if won != "ok" or status is not JobStatus.succeeded:
        _free(rt, created)
    _free(rt, due)
    log.info(
        "job %s (%d parts) ended %s after a %.3f s combine",
        parent_id,
        payload.part.total if payload.part else 0,
        status.value if won == "ok" else won,
        time.monotonic() - began,
    )


@contextlib.contextmanager
def memory_limit(extra_bytes: int) -> Iterator[None]:
    """Let the job map at most `extra_bytes` more than this child maps now (RLIMIT_AS).

    Set per job after the inputs are attached, so shared-memory inputs of any size do not
    count against it; an allocation past it raises MemoryError in the job instead of pushing
    the host into swap or the OOM killer. Lifted again before the result is stored.
    """
    if extra_bytes <= 0:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mapped_bytes() -> int:
    """This process's virtual address space (VmSize), what RLIMIT_AS is checked against."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def attached(inputs: dict[str, ArrayRef], rt: Runtime) -> Iterator[dict[str, np.ndarray]]:
    """Read-only zero-copy views of the inputs, closed afterwards.

    Attached through this child's kept mappings: an input (or a recycled segment) it has seen
    before costs no mmap and no page faults. Afterwards the kept mappings of segments freed
    meanwhile are dropped, so they do not hold on to memory.
    """
    segments: list[Segment] = []
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, ref in inputs.items():
            if ref.domain != rt.settings.shm_domain:  # another host's: use this domain's copy
                try:  # checks the id, the owner's URL and the replica's name (shared/trust.py)
                    ref = replicas.local_ref(ref, rt.redis, rt.settings)
                except replicas.PullError as exc:
                    raise JobFailure(f"input '{name}': {exc}") from None
            else:
                try:  # a name from the message: opened only if it is this stack's own
                    trust.segment(ref.segment, ref.id, rt.settings, where="the job's message")
                except trust.Untrusted as exc:
                    raise JobFailure(f"input '{name}': {exc}") from None
            try:
                segment = mappings.attach(ref.segment, ref.nbytes)
            except FileNotFoundError:
                raise JobFailure(f"input '{name}': array {ref.id} is gone") from None
            segments.append(segment)
            arrays[name] = ndarray_view(segment, np.dtype(ref.dtype), ref.shape, ref.order)
        yield arrays
    finally:
        arrays.clear()
        for segment in segments:
            with contextlib.suppress(BufferError):  # a job kept a view: GC closes it later
                segment.close()
        mappings.sweep()


def encode_result(value: Any, rt: Runtime, payload: TaskPayload, created: list[str]) -> Any:
    """JSON for the record: ndarrays become new segments, `{"array": meta}`."""
    if isinstance(value, np.ndarray):
        record = store_ndarray(value, rt, owner=payload.owner, job=payload.job_id)
        created.append(record.id)
        return {"array": record.meta().model_dump(mode="json")}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, complex):
        return {"real": _json_float(value.real), "imag": _json_float(value.imag)}
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, dict):
        return {str(k): encode_result(v, rt, payload, created) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_result(v, rt, payload, created) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise JobFailure(f"job returned a {type(value).__name__}, which is not JSON or an ndarray")


def _json_float(x: float) -> float | str:
    """JSON has no NaN or infinity; spell them as strings rather than lose them."""
    return x if math.isfinite(x) else str(x)


def store_ndarray(arr: np.ndarray, rt: Runtime, *, owner: str, job: str = "") -> ArrayRecord:
    """Copy an array into a new registered segment (one memcpy, on several cores if large).

    A pooled segment this child wrote into before is still mapped here: no page faults.
    """
    dtype = check_dtype(arr.dtype.newbyteorder("=") if arr.dtype.byteorder == ">" else arr.dtype)
    order = "F" if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    try:
        with lifecycle.writing(
            rt.arrays, uuid.uuid4().hex, arr.shape, dtype.str, order, arr.nbytes, owner, job=job
        ) as write:
            target = ndarray_view(write.open(), dtype, arr.shape, order)
            copy_into(target, arr, casting="no" if arr.dtype == dtype else "equiv")
            del target
    except ShmFullError as exc:
        raise JobFailure(f"{exc} (the job's result)") from None
    assert write.record is not None
    return write.record

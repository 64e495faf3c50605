"""One Celery task per registered job (`forklift.<job name>`), all running `runner.run`.

Celery's tools (`celery inspect registered`, Flower, exporters) then see and count jobs by
name. `forklift.run_job` stays registered, so messages an older API queued still run; every
task reads the job's name from its payload, so whichever name a message carries, the same
runner runs the same job. Celery's states follow the job's end: a job that ends `failed` is a
FAILURE with its error, a retry (the runner re-queues the job itself, shared/due.py) is a
RETRY, anything else is a SUCCESS whose result is how the delivery ended (`succeeded`,
`cancelled`, or why it did not run: docs/operations.md). The record is always ended first.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Task, signals
from celery.exceptions import Reject, Retry
from celery.worker.request import Request

from shared import logs
from shared.arrays import lifecycle, pool
from shared.celery_app import TASK_NAME, TASK_PREFIX, task_name
from shared.registry import all_jobs, load_job_modules
from shared.schemas import JobStatus, TaskPayload
from shared.settings import get_settings
from worker import cancel, heartbeat, runner
from worker.app import app
from worker.runtime import runtime

log = logging.getLogger("forklift.worker")

load_job_modules(get_settings().all_job_modules)


# The worker's main process must not stall its consumer for long on Redis: what it cannot
# write in this time the reaper (shared/jobs_reaper.py) ends later.
MAIN_PROCESS_RETRY_S = 5.0


class JobRequest(Request):
    """Ends the job record when the pool, not the job, ends the task (hard time limit)."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft:
            return  # the child raised SoftTimeLimitExceeded and ended the record itself
        job_id = self.id
        rt = runtime()
        error = f"time limit exceeded: the job was killed after {timeout:g} s (hard limit)"
        pid = self.worker_pid  # only if the killed child still holds the record
        try:
            _, due = runner.redis_retrying(
                lambda: rt.jobs.finish(job_id, JobStatus.failed, error=error, pid=pid),
                f"job {job_id} time limit",
                MAIN_PROCESS_RETRY_S,
            )
            lifecycle.free(rt.arrays, due.free)
        except Exception as exc:  # the reaper ends it: its worker no longer holds it
            log.warning("job %s: could not record the time limit: %s", job_id, exc)


# The job's error as Celery shows it (events, logs): bounded, the record has it whole.
MAX_CELERY_ERROR = 2000


class JobFailed(Exception):
    """The job ended `failed` (its record says so already): raised so that Celery reports
    a FAILURE with the job's error. Declared in the tasks' `throws`: Celery logs it as an
    expected error, one line without a traceback."""


def celery_result(ended: runner.Ended) -> str:
    """A delivery's end in Celery's terms, once the record is ended: returns the SUCCESS
    result, raises JobFailed (FAILURE) or Retry (RETRY; nothing is re-sent: the job waits
    in forklift's own due set).

    Only the delivery that fails the job is a FAILURE: one that finds its job already
    ended (a duplicate delivery, a job cancelled or reaped meanwhile) returns that status.
    """
    error = (ended.error or "")[:MAX_CELERY_ERROR]
    if ended.outcome == JobStatus.failed.value and ended.error is not None:
        raise JobFailed(error)
    if ended.outcome == "exhausted":  # this delivery found the job's attempts spent
        raise JobFailed("worker lost: the job's worker died too often; not retried again")
    if ended.outcome == "retrying":
        raise Retry(f"retrying: {error}", exc=JobFailed(error))
    return ended.outcome


def run_job(self: Task, payload: dict[str, Any]) -> str:
    """Every forklift task's body: the job named in the payload, whatever the task's name."""
    node = self.request.hostname or ""
    try:
        ended = runner.run(TaskPayload.model_validate(payload), node=node)
    except runner.RedisUnavailable as exc:
        # Never ack a job whose record could not be started or ended: hand the message back
        # (if Redis lets us; otherwise it stays unacked and the reaper or the visibility
        # timeout brings it back).
        log.warning("%s; the message goes back to the queue", exc)
        raise Reject(str(exc), requeue=True) from None
    return celery_result(ended)


def task_names() -> list[str]:
    """The Celery tasks this worker registers: the old generic one, then one per job."""
    return list(dict.fromkeys([TASK_NAME, *(task_name(spec.name) for spec in all_jobs())]))


for _name in task_names():
    app.task(name=_name, Request=JobRequest, bind=True, throws=(JobFailed,))(run_job)


@signals.task_revoked.connect
def _job_revoked(request: object = None, terminated: bool = False, **_: object) -> None:
    """`celery control revoke <job id>`: the worker drops the message (or, with terminate,
    kills the child); end the record and release the inputs, which no attempt will do."""
    job_id = getattr(request, "id", None)
    if not job_id:
        return
    how = "killed while running" if terminated else "dropped before it ran"
    error = f"revoked: the job's Celery message was revoked ({how})"
    outcome = _end_from_main(job_id, JobStatus.cancelled, error, "revoke")
    if outcome is not None:
        log.info("job %s revoked (%s): %s", job_id, how, outcome)


def _end_from_main(
    job_id: str, status: JobStatus, error: str, what: str, expect: str = "live"
) -> str | None:
    """End a record whose message the worker's main process dropped (revoked, unknown
    task), releasing its inputs; None if Redis did not answer in time (the reaper ends it:
    its message is gone)."""
    rt = runtime()
    try:
        outcome, due = runner.redis_retrying(
            lambda: rt.jobs.end_lost(job_id, status, error, expect=expect),
            f"job {job_id} {what}",
            MAIN_PROCESS_RETRY_S,
        )
        lifecycle.free(rt.arrays, due)
    except Exception as exc:
        log.warning("job %s: could not record the %s: %s", job_id, what, exc)
        return None
    return outcome


@signals.task_unknown.connect
def _job_unknown(name: str = "", **fields: object) -> None:
    """A `forklift.<job>` message this worker has no task for (its FORKLIFT_JOB_MODULES
    lack the job the API accepted): Celery drops the message, so end the record `failed`
    here (as the runner does for a job it does not know) instead of leaving it queued."""
    job_id = str(fields.get("id") or "")
    if not name.startswith(TASK_PREFIX) or not job_id:
        return
    job = name.removeprefix(TASK_PREFIX)
    error = (
        f"unknown task '{job}' on worker {runtime().hostname} (its FORKLIFT_JOB_MODULES lack it)"
    )
    outcome = _end_from_main(job_id, JobStatus.failed, error, "unknown task", expect="queued")
    if outcome is not None:
        log.warning("job %s: %s (%s)", job_id, error, outcome)


@signals.setup_logging.connect
def _setup_logging(loglevel: int | None = None, **_: object) -> None:
    """forklift's text or JSON lines (FORKLIFT_LOG_FORMAT) instead of Celery's format."""
    logs.setup_logging(get_settings(), "worker", loglevel or logging.INFO)


@signals.task_prerun.connect
def _bind_job_log_context(task_id: str, args: tuple[object, ...] = (), **_: object) -> None:
    """Every line logged in the child while a job runs carries its id, task and domain."""
    payload = args[0] if args and isinstance(args[0], dict) else {}
    logs.bind_job(
        str(payload.get("job_id") or task_id),
        str(payload.get("task", "")),
        get_settings().shm_domain,
    )


@signals.task_postrun.connect
def _unbind_job_log_context(**_: object) -> None:
    logs.unbind_job()


@signals.worker_process_init.connect
def _init_child(**_: object) -> None:
    cancel.install()
    log.debug("worker child %d ready", os.getpid())


@signals.worker_ready.connect
def _worker_ready(sender: object = None, **_: object) -> None:
    heartbeat.start(sender)


@signals.worker_shutdown.connect
def _worker_shutdown(**_: object) -> None:
    heartbeat.stop()
    pool.drain(get_settings())  # give recycled memory back


@signals.celeryd_after_setup.connect
def _consume_domain_queue(sender: str, instance: object, **_: object) -> None:
    """Besides the common queue, take the jobs whose arrays live in this shm domain.

    On RabbitMQ, Celery's queue table gives it the same x-max-priority as every other
    declarer (shared/celery_app.py amqp_config): a redeclaration with other arguments fails."""
    settings = get_settings()
    instance.app.amqp.queues.select_add(settings.domain_queue())  # type: ignore[attr-defined]

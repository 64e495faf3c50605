"""The one generic Celery task: run any registered job by name."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals
from celery.exceptions import Reject
from celery.worker.request import Request

from shared import logs
from shared.arrays import lifecycle, pool
from shared.celery_app import TASK_NAME
from shared.registry import load_job_modules
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


@app.task(name=TASK_NAME, Request=JobRequest, bind=True)
def run_job(self: object, payload: dict[str, Any]) -> str:
    node = getattr(getattr(self, "request", None), "hostname", None) or ""
    try:
        return runner.run(TaskPayload.model_validate(payload), node=node).outcome
    except runner.RedisUnavailable as exc:
        # Never ack a job whose record could not be started or ended: hand the message back
        # (if Redis lets us; otherwise it stays unacked and the reaper or the visibility
        # timeout brings it back).
        log.warning("%s; the message goes back to the queue", exc)
        raise Reject(str(exc), requeue=True) from None


@signals.task_revoked.connect
def _job_revoked(request: object = None, terminated: bool = False, **_: object) -> None:
    """`celery control revoke <job id>`: the worker drops the message (or, with terminate,
    kills the child); end the record and release the inputs, which no attempt will do."""
    job_id = getattr(request, "id", None)
    if not job_id:
        return
    rt = runtime()
    how = "killed while running" if terminated else "dropped before it ran"
    error = f"revoked: the job's Celery message was revoked ({how})"
    try:
        outcome, due = runner.redis_retrying(
            lambda: rt.jobs.end_lost(job_id, JobStatus.cancelled, error),
            f"job {job_id} revoked",
            MAIN_PROCESS_RETRY_S,
        )
        lifecycle.free(rt.arrays, due)
    except Exception as exc:  # the reaper ends it: its message is gone
        log.warning("job %s: could not record the revoke: %s", job_id, exc)
        return
    log.info("job %s revoked (%s): %s", job_id, how, outcome)


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
    """Besides the common queue, take the jobs whose arrays live in this shm domain."""
    settings = get_settings()
    instance.app.amqp.queues.select_add(settings.domain_queue())  # type: ignore[attr-defined]

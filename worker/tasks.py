"""The one generic Celery task: run any registered job by name."""

from __future__ import annotations

import logging
import os

from celery import signals
from celery.worker.request import Request

from shared.registry import load_job_modules
from shared.schemas import JobStatus, TaskPayload
from shared.settings import get_settings
from worker import cancel, heartbeat, runner
from worker.app import TASK_NAME, app
from worker.runtime import runtime

log = logging.getLogger("forklift.worker")

load_job_modules(get_settings().all_job_modules)


class JobRequest(Request):
    """Ends the job record when the pool, not the job, ends the task (hard time limit)."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft:
            return  # the child raised SoftTimeLimitExceeded and ended the record itself
        job_id = self.id
        rt = runtime()
        error = f"time limit exceeded: the job was killed after {timeout:g} s (hard limit)"
        if rt.jobs.finish(job_id, JobStatus.failed, error=error) == "ok":
            runner.free_arrays(rt, rt.jobs.release_inputs(job_id))


@app.task(name=TASK_NAME, Request=JobRequest)
def run_job(payload: dict) -> str:
    return runner.run(TaskPayload.model_validate(payload))


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


@signals.celeryd_after_setup.connect
def _consume_domain_queue(sender: str, instance: object, **_: object) -> None:
    """Besides the common queue, take the jobs whose arrays live in this shm domain."""
    settings = get_settings()
    instance.app.amqp.queues.select_add(settings.domain_queue())  # type: ignore[attr-defined]

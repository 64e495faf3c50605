"""Hands a job to Celery. Publishing is blocking I/O (kombu), so it runs in a thread."""

from __future__ import annotations

from functools import partial

from anyio import to_thread

from shared.schemas import TaskPayload
from shared.settings import Settings
from worker.app import TASK_NAME, app


def route(settings: Settings, payload: TaskPayload) -> str:
    """Jobs with array inputs run where the arrays live; the rest run anywhere."""
    domains = {ref.domain for ref in payload.inputs.values()}
    if len(domains) == 1:
        return settings.domain_queue(domains.pop())
    return settings.queue


async def enqueue(settings: Settings, payload: TaskPayload) -> str:
    queue = route(settings, payload)
    options: dict[str, object] = {"task_id": payload.job_id, "queue": queue}
    if payload.timeout is not None:
        options["soft_time_limit"] = payload.timeout
        options["time_limit"] = payload.timeout + settings.job_kill_grace
    send = partial(app.send_task, TASK_NAME, args=[payload.model_dump(mode="json")], **options)
    await to_thread.run_sync(send)
    return queue

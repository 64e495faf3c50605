"""The Celery app, as configuration (like Celery's `proj/celery.py`): both sides build it here.

The API publishes with its own app from `create_app` (`api/enqueue.py`); the worker's process
(`worker/app.py`) pins BLAS threads first, builds one and adds the module of its tasks. Nothing
here imports NumPy or the worker, so importing the API leaves the process as it was.
"""

from __future__ import annotations

import math

from celery import Celery

from shared.keys import KOMBU_PRIORITY_STEPS
from shared.settings import Settings, get_settings

# Celery's name of a job's task: `forklift.<job name>` (worker/tasks.py registers one per
# job, so Celery's tools see jobs by name). TASK_NAME is the one generic task older APIs
# sent every job as; workers still run it.
TASK_PREFIX = "forklift."
TASK_NAME = TASK_PREFIX + "run_job"


# forklift's priorities are 0..9 (shared/schemas.py MAX_PRIORITY; not imported: it brings
# NumPy): on RabbitMQ they are the message priority as is, so queues need ten levels.
AMQP_MAX_PRIORITY = 9


def task_name(job: str) -> str:
    """The Celery task a job's message names (api/enqueue.py) and a worker registers."""
    return TASK_PREFIX + job


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings derived from forklift's; kept apart so tests can read them."""
    hard_limit = settings.job_time_limit + settings.job_kill_grace
    # With late acks, Redis redelivers a message unacked for longer than the visibility
    # timeout. Keep it above the hard limit so a long job is never run twice; the margin is
    # how long the job of a vanished worker (SIGKILL, power loss) waits to be delivered again.
    visibility = math.ceil(hard_limit + settings.redelivery_margin)
    transport: dict[str, object] = {
        "visibility_timeout": visibility,
        # kombu sweeps for such messages every interval x throttle seconds (default 10 x 10);
        # sweep every interval instead, so redelivery follows the timeout closely.
        "unacked_restore_interval": max(1, min(10, visibility // 4)),
        "unacked_restore_throttle": 1,
        # One list per priority (api/enqueue.py:broker_priority), so 0..9 are ten levels.
        "priority_steps": list(KOMBU_PRIORITY_STEPS),
    }
    config: dict[str, object] = {
        "broker_url": settings.broker,
        # Unused (task_ignore_result: the job record is the result), but kept on Redis so
        # that a `celery result` or an AsyncResult never needs a backend of its own.
        "result_backend": settings.redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_soft_time_limit": settings.job_time_limit,
        "task_time_limit": hard_limit,
        "task_default_queue": settings.queue,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "worker_concurrency": settings.worker_concurrency,
        "worker_max_tasks_per_child": settings.max_tasks_per_child or None,
        # Off by default: each event is one more Redis publish per job. Flower switches them
        # on at runtime (its `enable_events` control command); FORKLIFT_CELERY_EVENTS=true
        # keeps them on from the start.
        "worker_send_task_events": settings.celery_events,
        "task_send_sent_event": settings.celery_events,
        "worker_hijack_root_logger": False,
    }
    if settings.broker_is_amqp:
        config.update(amqp_config(settings))
    return config


def amqp_queue_arguments(settings: Settings) -> dict[str, object]:
    """The arguments every forklift queue is declared with on RabbitMQ, by every declarer
    (the API publishing, a worker consuming, the reaper): RabbitMQ refuses a redeclaration
    with other arguments (PRECONDITION_FAILED), so this is their one home."""
    return {"x-max-priority": AMQP_MAX_PRIORITY}


def amqp_config(settings: Settings) -> dict[str, object]:
    """What differs on RabbitMQ: real priorities (higher first, api/enqueue.py), publisher
    confirms (a job accepted is a message the broker has), no visibility timeout (the broker
    redelivers an unacked message when its consumer's connection closes). RabbitMQ's
    `consumer_timeout` is the broker's (3.10/3.11 have no queue argument for it):
    docs/deployment.md says how to size it above the hard time limit."""
    return {
        # Celery adds x-max-priority to every queue it declares, the domain queues a worker
        # adds (worker/tasks.py) and the queues the API creates on first publish alike.
        "task_queue_max_priority": amqp_queue_arguments(settings)["x-max-priority"],
        "task_default_priority": 0,
        # The broker requeues a lost connection's unacked messages at once, so a job still
        # running on it would run again elsewhere at the same time: Celery terminates it
        # instead (its redelivery starts a new attempt; the default from Celery 6).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_transport_options": {"confirm_publish": True},
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from forklift's settings (publishers and workers alike)."""
    settings = settings or get_settings()
    app = Celery("forklift", set_as_current=True)
    app.conf.update(celery_config(settings))
    return app

"""How a delivery's end maps to Celery's states (worker/tasks.py:celery_result), and the
tasks the worker registers: no broker, no worker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest
from celery.exceptions import Retry

from shared.celery_app import TASK_NAME, task_name
from worker.runner import Ended


@pytest.fixture(scope="module")
def tasks() -> Iterator[ModuleType]:
    """worker.tasks, imported without leaving worker/app.py's BLAS pins in this process's
    environment (the stacks later tests start inherit it)."""
    saved = dict(os.environ)
    try:
        import worker.tasks as module
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield module


def test_a_failed_job_is_a_failure_with_its_error(tasks: ModuleType) -> None:
    with pytest.raises(tasks.JobFailed, match=r"^ValueError: boom$"):
        tasks.celery_result(Ended("failed", "ValueError: boom"))
    with pytest.raises(tasks.JobFailed) as caught:
        tasks.celery_result(Ended("failed", "x" * 10_000))
    assert len(str(caught.value)) == tasks.MAX_CELERY_ERROR
    with pytest.raises(tasks.JobFailed, match="worker lost"):  # this delivery spent the last
        tasks.celery_result(Ended("exhausted"))


def test_a_retry_is_a_retry_that_sends_nothing(tasks: ModuleType) -> None:
    with pytest.raises(Retry) as caught:
        tasks.celery_result(Ended("retrying", "ValueError: not yet"))
    assert str(caught.value) == "retrying: ValueError: not yet"
    assert isinstance(caught.value.exc, tasks.JobFailed)
    assert caught.value.sig is None  # a Retry raised, not task.retry(): no new message


@pytest.mark.parametrize("outcome", ["succeeded", "cancelled", "moved", "missing", "failed"])
def test_everything_else_is_a_success_saying_how_it_ended(tasks: ModuleType, outcome: str) -> None:
    # 'failed' without an error: a delivery that found its job failed already (a duplicate).
    assert tasks.celery_result(Ended(outcome)) == outcome


def test_one_task_per_job_and_the_old_generic_one(tasks: ModuleType) -> None:
    from worker.app import app

    ours = {name for name in app.tasks if name.startswith("forklift.")}
    assert {TASK_NAME, task_name("fib"), task_name("sum"), task_name("sleep")} <= ours
    assert tasks.task_names()[0] == TASK_NAME
    for name in ours:
        task = app.tasks[name]
        assert task.throws == (tasks.JobFailed,)
        assert task.Request is tasks.JobRequest
        assert task.acks_late and task.acks_on_failure_or_timeout

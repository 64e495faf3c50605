"""worker/retrying.py: the backoff's bounds (equal jitter, the cap) and what is retried."""

from __future__ import annotations

import random

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from shared.registry import JobSpec, get_job
from shared.schemas import PartRef, TaskPayload
from tests import jobs_for_tests  # noqa: F401  (registers `flaky`)
from worker import retrying
from worker.cancel import JobCancelled


def test_ceiling_doubles_then_caps() -> None:
    assert [retrying.ceiling(n, 0.5, 3.0) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert retrying.ceiling(10_000, 1.0, 300.0) == 300.0  # no overflow far past the cap
    assert retrying.ceiling(3, 0.0, 0.0) == 0.0


@pytest.mark.parametrize("retried", [0, 1, 4, 20])
def test_equal_jitter_bounds(retried: int) -> None:
    top = retrying.ceiling(retried, 0.3, 2.0)
    assert retrying.delay(retried, 0.3, 2.0, rand=lambda: 0.0) == pytest.approx(top / 2)
    assert retrying.delay(retried, 0.3, 2.0, rand=lambda: 1.0) == pytest.approx(top)
    rng = random.Random(17)
    gaps = [retrying.delay(retried, 0.3, 2.0, rand=rng.random) for _ in range(2000)]
    assert min(gaps) >= top / 2 and max(gaps) <= top
    assert max(gaps) - min(gaps) > top / 2 * 0.9  # spread over the whole half, not fixed


def _payload(**fields: object) -> TaskPayload:
    base: dict[str, object] = {"job_id": "j", "task": "flaky", "params": {}, "retries": 3}
    return TaskPayload.model_validate(base | fields)


def _spec() -> JobSpec:
    spec = get_job("flaky")
    assert spec is not None
    return spec


def test_retried_only_within_budget_and_on_retry_on() -> None:
    spec = _spec()
    gap = retrying.retry_delay(ValueError("x"), spec, _payload(retried=1))
    assert gap is not None and 0.3 <= gap <= 0.6  # retry 1: 0.3 * 2 with equal jitter
    assert retrying.retry_delay(ValueError("x"), spec, _payload(retried=3)) is None
    assert retrying.retry_delay(ValueError("x"), spec, _payload(retries=0)) is None
    assert retrying.retry_delay(TypeError("x"), spec, _payload()) is None  # not in retry_on
    assert retrying.retry_delay(ValueError("x"), None, _payload()) is None  # unknown task


def test_never_retried() -> None:
    spec = _spec()
    catch_all = JobSpec(**{**vars(spec), "retry_on": (BaseException,)})
    for exc in (JobCancelled(), SoftTimeLimitExceeded(), MemoryError()):
        assert retrying.retry_delay(exc, catch_all, _payload()) is None
    part = PartRef(parent="p", index=0, total=2, start=0, stop=1, length=2)
    assert retrying.retry_delay(ValueError("x"), spec, _payload(part=part)) is None

"""Retries of jobs that raise (`@job(retries=, backoff=, retry_on=)`), on the real stack.

`flaky` (tests/jobs_for_tests.py: retries=3, backoff=0.3 s, retried on ValueError) fails its
first runs, counted in a file under /tmp; `flaky_slow` waits seconds before a retry, so a
test can see (and cancel) a job waiting for one. Every test checks that the input is unpinned
afterwards and that its segments are freed.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.http_api import upload, wait
from worker import retrying

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers

BACKOFF, BACKOFF_MAX = 0.3, 2.0  # flaky's
SLOW_BACKOFF = 4.0  # flaky_slow's


@pytest.fixture
def runs() -> Iterator[Path]:
    """The file a flaky job counts its runs in (one line each)."""
    path = Path(f"/tmp/forklift-test-retries-{uuid.uuid4().hex}")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def array(live: Stack, http: httpx.Client) -> Iterator[str]:
    """A small input array; after the test: unpinned, deleted, its segment freed."""
    before = stack.array_segments(live.shm_prefix)
    meta = upload(http, np.arange(10, dtype=np.float64))
    yield meta["id"]
    assert _pins(live, meta["id"]) == 0
    assert http.delete(f"/arrays/{meta['id']}").status_code == 204
    stack.wait_arrays_freed(live.shm_prefix, before)


def _pins(live: Stack, array_id: str) -> int:
    return int(live.redis.hget(f"{live.key_prefix}:array:{array_id}", "pins") or 0)


def _submit(http: httpx.Client, task: str, array: str, runs: Path, **extra: object) -> dict:
    params = {"runs": str(runs), **extra.pop("params", {})}  # type: ignore[dict-item]
    body = {"task": task, "params": params, "inputs": {"a": {"array": array}}, **extra}
    response = http.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def _finished(live: Stack) -> dict[str, str]:
    return live.redis.hgetall(Settings.from_env(live.env).keys.metrics_finished)


def _run_count(runs: Path) -> int:
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_fails_twice_then_succeeds_with_backoff_gaps(
    http: httpx.Client, live: Stack, array: str, runs: Path
) -> None:
    """~1.5 s: two retries, the gaps at least half their exponential step."""
    finished = _finished(live)
    job = _submit(http, "flaky", array, runs, params={"fail_times": 2})
    assert job["retries"] == 3  # the job's own, no submission value
    done = wait(http, job["id"], within=20)
    assert done["status"] == "succeeded", done
    assert done["result"] == 45.0 and done["error"] is None and done["retry_at"] is None
    attempts = done["attempts"]
    assert [a["error"] for a in attempts] == [
        "ValueError: run 1 fails on purpose",
        "ValueError: run 2 fails on purpose",
        None,
    ]
    assert _run_count(runs) == 3
    for n, (prev, nxt) in enumerate(itertools.pairwise(attempts)):
        gap = nxt["started_at"] - prev["finished_at"]
        assert gap >= retrying.ceiling(n, BACKOFF, BACKOFF_MAX) / 2, (n, gap)
        assert gap < retrying.ceiling(n, BACKOFF, BACKOFF_MAX) + 2.0, (n, gap)  # not stuck
    record = live.redis.hgetall(f"{live.key_prefix}:job:{job['id']}")
    assert record["retried"] == "2"
    assert record["attempts"] == "1"  # the worker-lost counter starts again with each run
    # A retry is not an ending: the metrics count one finish, the success.
    after = _finished(live)
    assert int(after.get("flaky|succeeded", 0)) == int(finished.get("flaky|succeeded", 0)) + 1
    assert after.get("flaky|failed") == finished.get("flaky|failed")


def test_submission_retries_lower_the_jobs(
    http: httpx.Client, live: Stack, array: str, runs: Path
) -> None:
    """~0.5 s: retries=1 on a job that fails twice: failed after two attempts."""
    job = _submit(http, "flaky", array, runs, params={"fail_times": 2}, retries=1)
    assert job["retries"] == 1
    done = wait(http, job["id"], within=20)
    assert done["status"] == "failed", done
    assert done["error"] == "ValueError: run 2 fails on purpose"
    assert [a["error"] for a in done["attempts"]] == [
        "ValueError: run 1 fails on purpose",
        "ValueError: run 2 fails on purpose",
    ]
    assert _run_count(runs) == 2


def test_not_retried_on_an_exception_outside_retry_on(
    http: httpx.Client, live: Stack, array: str, runs: Path
) -> None:
    """~0.1 s: a TypeError is not in flaky's retry_on; a higher submission value is capped."""
    job = _submit(http, "flaky", array, runs, params={"error": "TypeError"}, retries=10)
    assert job["retries"] == 3  # may only lower the job's
    done = wait(http, job["id"], within=20)
    assert done["status"] == "failed"
    assert done["error"] == "TypeError: run 1 fails on purpose"
    assert len(done["attempts"]) == 1
    assert _run_count(runs) == 1


def test_waiting_retry_shows_queued_and_cancels(
    http: httpx.Client, live: Stack, array: str, runs: Path
) -> None:
    """~0.3 s: waiting for its retry (2 to 4 s away) the job is queued with retry_at; a
    cancel then ends it, its input released."""
    keys = Settings.from_env(live.env).keys
    job = _submit(http, "flaky_slow", array, runs, params={"fail_times": 5})

    def waiting() -> dict | None:
        view = http.get(f"/jobs/{job['id']}").json()
        return view if view["status"] == "queued" and view["retry_at"] else None

    stack.wait_until(lambda: waiting() is not None, 10, what="the job waits for its retry")
    view = waiting()
    assert view is not None
    assert view["retry_at"] > time.time()
    first = view["attempts"]
    assert len(first) == 1 and first[0]["error"] == "ValueError: run 1 fails on purpose"
    gap = view["retry_at"] - first[0]["finished_at"]
    assert SLOW_BACKOFF / 2 <= gap <= SLOW_BACKOFF
    assert _pins(live, array) == 1  # kept pinned for the next run
    assert live.redis.zscore(keys.jobs_due, job["id"]) == pytest.approx(view["retry_at"])
    assert not live.redis.hexists(keys.metrics_running, job["id"])

    response = http.delete(f"/jobs/{job['id']}")
    assert response.status_code == 200, response.text
    done = wait(http, job["id"], within=10)
    assert done["status"] == "cancelled"
    assert len(done["attempts"]) == 1
    assert _pins(live, array) == 0
    assert _run_count(runs) == 1

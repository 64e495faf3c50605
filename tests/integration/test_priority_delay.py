"""Priorities and delayed jobs on the real stack (issue 17, items 3 and 4).

Priorities ride on kombu's Redis priority lists: with every worker child busy, a priority-9
job submitted after 50 priority-0 ones starts before all of them. Delayed jobs (`delay`,
`not_before`) wait in forklift's due index as `queued` records and start within a second
after their time, never before; cancelled, they release their inputs and their message is
never sent; with two API processes moving due jobs, each is published exactly once (the
broker's LPUSHes are watched with MONITOR on the session's Redis).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from shared.keys import queue_key, queue_keys
from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.http_api import FINAL, upload, wait

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers

START_SLACK_S = 1.0  # a due job starts within this after its time (the bound)


def _tag() -> dict[str, str]:
    """A tag of this test's own: its jobs are told apart from any other's."""
    return {"test": f"prio-delay-{uuid.uuid4().hex[:12]}"}


def _post(http: httpx.Client, body: dict) -> dict:
    response = http.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def _batch(http: httpx.Client, bodies: list[dict]) -> list[dict]:
    response = http.post("/jobs/batch", json={"jobs": bodies})
    assert response.status_code == 202, response.text
    jobs: list[dict] = response.json()["jobs"]
    return jobs


def _view(http: httpx.Client, job_id: str) -> dict:
    response = http.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    view: dict = response.json()
    return view


def _wait_all(http: httpx.Client, ids: list[str], within: float = 30) -> dict[str, dict]:
    deadline = time.monotonic() + within
    views: dict[str, dict] = {}
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"jobs not ended after {within} s: {set(ids) - set(views)}"
        pending = [i for i in ids if i not in views]
        response = http.post(
            "/jobs/wait", json={"ids": pending, "wait": min(left, 10)}, timeout=left + 15
        )
        assert response.status_code == 200, response.text
        for view in response.json()["jobs"]:
            if view["status"] in FINAL:
                views[view["id"]] = view
        if len(views) == len(ids):
            return views


def _wait_running(http: httpx.Client, job_id: str, within: float = 15) -> dict:
    stack.wait_until(lambda: _view(http, job_id)["status"] == "running", within, what="running")
    return _view(http, job_id)


def _cancel_unfinished(http: httpx.Client, ids: list[str]) -> None:
    """A failed test leaves nothing of its own queued or running."""
    for job_id in ids:
        if _view(http, job_id)["status"] not in FINAL:
            http.delete(f"/jobs/{job_id}")


def _in_due_index(live: Stack, job_id: str) -> bool:
    return live.redis.zscore(f"{live.key_prefix}:jobs:due", job_id) is not None


def _pins(live: Stack, array_id: str) -> int:
    return int(live.redis.hget(f"{live.key_prefix}:array:{array_id}", "pins") or 0)


@contextmanager
def broker_pushes(live: Stack) -> Iterator[Counter[str]]:
    """Counts, per job id, the messages pushed onto this stack's queue lists while the block
    runs (Redis MONITOR on the session's Redis; only this stack's queue keys are counted)."""
    settings = Settings.from_env(live.env)
    keys = {k for q in (settings.queue, settings.domain_queue()) for k in queue_keys(q)}
    stop = f"stop-monitor-{uuid.uuid4().hex}"
    counts: Counter[str] = Counter()
    ready = threading.Event()
    job_id = re.compile(r'"id": "([0-9a-f]{32})"')
    client = redis.Redis.from_url(live.running.redis_url)

    def watch() -> None:
        with client.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                text = command["command"]
                if stop in text:
                    return
                verb, _, rest = text.partition(" ")
                if verb.upper() not in ("LPUSH", "RPUSH"):
                    continue
                key = rest.split(" ", 1)[0]
                if key.encode().decode("unicode_escape") not in keys:
                    continue
                found = job_id.search(rest)
                if found:
                    counts[found.group(1)] += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5), "MONITOR did not start"
    try:
        yield counts
    finally:
        live.redis.echo(stop)
        thread.join(5)
        client.close()
        assert not thread.is_alive(), "the MONITOR thread did not stop"


@pytest.fixture
def arrays_freed(live: Stack, http: httpx.Client) -> Iterator[list[str]]:
    """Array ids a test made: after it, each is unpinned and deleted, and /dev/shm holds no
    array segment beyond what it held before."""
    before = stack.array_segments(live.shm_prefix)
    made: list[str] = []
    yield made
    for array_id in made:
        assert _pins(live, array_id) == 0, f"array {array_id} still pinned"
        response = http.delete(f"/arrays/{array_id}")
        assert response.status_code in (204, 404), response.text
    stack.wait_arrays_freed(live.shm_prefix, before)


# -- priorities ----------------------------------------------------------------------------


def test_priority_9_overtakes_fifty_priority_0_jobs(
    http: httpx.Client, live: Stack, arrays_freed: list[str]
) -> None:
    """Both worker children busy (slow jobs of 1.5 s and 3 s); 50 priority-0 jobs, then a
    priority-5 one and a priority-9 one: the 9 starts first, then the 5, then the 0s. The 9
    has an array input, so it waits in the domain queue while the others wait in the common
    queue: one BRPOP serves the priority steps of both. (~3.5 s)"""
    if live.on_amqp:  # RabbitMQ orders within a queue only: test_amqp_broker.py's priority test
        pytest.skip("kombu's Redis priority lists span queues; RabbitMQ's priorities do not")
    settings = Settings.from_env(live.env)
    tags = _tag()
    x = upload(http, np.arange(4.0))["id"]
    arrays_freed.append(x)
    slow = [
        _post(http, {"task": "sleep", "params": {"seconds": s}, "tags": tags})["id"]
        for s in (1.5, 3.0)
    ]
    ids = list(slow)
    try:
        for job_id in slow:
            _wait_running(http, job_id)
        low = _batch(
            http,
            [{"task": "sleep", "params": {"seconds": 0}, "tags": tags} for _ in range(50)],
        )
        ids += [job["id"] for job in low]
        assert {job["priority"] for job in low} == {0}
        mid = _post(http, {"task": "sleep", "params": {"seconds": 0}, "priority": 5, "tags": tags})
        high = _post(
            http, {"task": "sum", "inputs": {"a": {"array": x}}, "priority": 9, "tags": tags}
        )
        ids += [mid["id"], high["id"]]
        assert (mid["priority"], high["priority"]) == (5, 9)
        # Each waits on its step's list: forklift's p is kombu's step 9 - p.
        waiting = {
            (queue, step): live.redis.llen(queue_key(queue, step))
            for queue in (settings.queue, settings.domain_queue())
            for step in range(10)
        }
        assert waiting[(settings.queue, 9)] == 50
        assert waiting[(settings.queue, 4)] == 1
        assert waiting[(settings.domain_queue(), 0)] == 1
        assert sum(waiting.values()) == 52, waiting
        # Valid only if everything was queued while both children were still busy.
        assert _view(http, slow[0])["status"] == "running", "submitting took too long"

        views = _wait_all(http, ids)
        assert {v["status"] for v in views.values()} == {"succeeded"}
        assert views[high["id"]]["tags"] == tags and views[high["id"]]["priority"] == 9
        assert views[high["id"]]["result"] == 6.0
        first_low = min(views[job["id"]]["started_at"] for job in low)
        started_high = views[high["id"]]["started_at"]
        started_mid = views[mid["id"]]["started_at"]
        # The first child freed (after 1.5 s) takes 9, then 5, then the 0s in turn.
        assert started_high >= views[slow[0]]["finished_at"]
        assert started_high < started_mid < first_low, (started_high, started_mid, first_low)
    finally:
        _cancel_unfinished(http, ids)


# -- delayed jobs --------------------------------------------------------------------------


def _assert_started_on_time(view: dict) -> None:
    assert view["status"] == "succeeded", view
    not_before, started = view["not_before"], view["started_at"]
    assert started >= not_before, f"started {not_before - started:.3f} s early"
    assert started - not_before < START_SLACK_S, f"started {started - not_before:.3f} s late"
    assert len(view["attempts"]) == 1


def test_a_delayed_job_waits_queued_then_starts_on_time(http: httpx.Client) -> None:
    """`delay`, and `not_before` as aware ISO, naive ISO (UTC) and unix seconds: each is
    `queued` with its `not_before` until then and starts within 1 s after it. (~2 s)"""
    tags = _tag()
    body = {"task": "sleep", "params": {"seconds": 0}, "tags": tags}
    at = time.time() + 1.5
    aware = datetime.fromtimestamp(at, UTC)
    forms = {
        "delay": {"delay": 1.5},
        "aware": {"not_before": aware.isoformat()},
        "naive": {"not_before": aware.replace(tzinfo=None).isoformat()},
        "unix": {"not_before": at},
    }
    sent = time.time()
    jobs = {name: _post(http, {**body, **form}) for name, form in forms.items()}
    ids = [job["id"] for job in jobs.values()]
    try:
        for name, job in jobs.items():
            assert job["status"] == "queued", (name, job)
            expected = sent + 1.5 if name == "delay" else at
            assert abs(job["not_before"] - expected) < 0.25, (name, job["not_before"], expected)
        assert abs(jobs["aware"]["not_before"] - at) < 1e-3  # the same instant, 3 spellings
        assert jobs["aware"]["not_before"] == jobs["naive"]["not_before"]
        time.sleep(max(0.0, at - time.time() - 0.6))
        for name, job in jobs.items():
            view = _view(http, job["id"])
            assert view["status"] == "queued" and view["started_at"] is None, (name, view)
            assert view["not_before"] == job["not_before"]
        views = _wait_all(http, ids)
        for job_id in ids:
            _assert_started_on_time(views[job_id])
    finally:
        _cancel_unfinished(http, ids)


def test_a_not_before_in_the_past_runs_at_once(http: httpx.Client, live: Stack) -> None:
    """(~0.1 s)"""
    past = time.time() - 3600
    job = _post(http, {"task": "sleep", "params": {"seconds": 0}, "not_before": past})
    view = wait(http, job["id"], within=10)
    assert view["status"] == "succeeded"
    assert view["not_before"] == pytest.approx(past)
    assert view["started_at"] - view["created_at"] < START_SLACK_S
    assert not _in_due_index(live, job["id"])


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"delay": 1, "not_before": time.time() + 5}, "invalid_request"),
        ({"delay": -1}, "invalid_request"),
        ({"delay": 10 * 365 * 86400}, "invalid_request"),
        ({"not_before": time.time() + 10 * 365 * 86400}, "invalid_delay"),
        ({"not_before": "next tuesday"}, "invalid_request"),
        ({"priority": 10}, "invalid_request"),
        ({"priority": -1}, "invalid_request"),
    ],
)
def test_bad_start_times_and_priorities_are_refused(
    http: httpx.Client, live: Stack, fields: dict, code: str
) -> None:
    """422, and nothing is written: no job record, nothing due. (~0.1 s)"""
    jobs_before = live.redis.zcard(f"{live.key_prefix}:jobs")
    due_before = live.redis.zcard(f"{live.key_prefix}:jobs:due")
    response = http.post("/jobs", json={"task": "sleep", "params": {"seconds": 0}, **fields})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code, response.text
    response = http.post(
        "/jobs/batch", json={"jobs": [{"task": "sleep", "params": {"seconds": 0}, **fields}]}
    )
    assert response.status_code == 422, response.text
    assert live.redis.zcard(f"{live.key_prefix}:jobs") == jobs_before
    assert live.redis.zcard(f"{live.key_prefix}:jobs:due") == due_before


def test_cancelling_a_delayed_job_releases_it_and_it_never_runs(
    http: httpx.Client, live: Stack, arrays_freed: list[str]
) -> None:
    """A delayed job on an uploaded array, cancelled before its time: `cancelled`, its
    input unpinned, and past its time it never started and no message for it was ever
    pushed to the broker. (~2 s)"""
    x = upload(http, np.arange(1000.0))["id"]
    arrays_freed.append(x)
    with broker_pushes(live) as pushes:
        job = _post(http, {"task": "sum", "inputs": {"a": {"array": x}}, "delay": 1.0})
        assert job["status"] == "queued" and _pins(live, x) == 1
        assert _in_due_index(live, job["id"])
        response = http.delete(f"/jobs/{job['id']}")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        assert _pins(live, x) == 0
        time.sleep(1.0 + 2 * 0.2 + 0.3)  # past its time and two mover passes
        view = _view(http, job["id"])
    assert view["status"] == "cancelled" and view["started_at"] is None, view
    assert view["attempts"] == []
    assert not _in_due_index(live, job["id"])
    assert pushes[job["id"]] == 0, "a message for the cancelled job was sent"


def test_a_delayed_job_in_a_batch(http: httpx.Client) -> None:
    """A batch of an immediate job and a delayed one: the first runs at once, the second
    at its time. (~1.5 s)"""
    tags = _tag()
    now, later = _batch(
        http,
        [
            {"task": "sleep", "params": {"seconds": 0}, "tags": tags},
            {"task": "sleep", "params": {"seconds": 0}, "tags": tags, "delay": 1.2},
        ],
    )
    try:
        assert now["not_before"] is None and later["status"] == "queued"
        views = _wait_all(http, [now["id"], later["id"]])
        assert views[now["id"]]["started_at"] < later["not_before"]
        _assert_started_on_time(views[later["id"]])
    finally:
        _cancel_unfinished(http, [now["id"], later["id"]])


def test_a_delayed_job_with_a_job_input_starts_at_its_time(
    http: httpx.Client, arrays_freed: list[str]
) -> None:
    """`{"job": id}` input: a downstream whose delay outlasts its upstream starts at its
    time, not when the upstream ends; one whose delay has passed starts right after its
    upstream. (~1.8 s)"""
    x = upload(http, np.arange(10.0))["id"]
    arrays_freed.append(x)
    up = _post(
        http, {"task": "slow_copy", "inputs": {"a": {"array": x}}, "params": {"seconds": 0.3}}
    )
    late = _post(http, {"task": "sum", "inputs": {"a": {"job": up["id"]}}, "delay": 1.5})
    soon = _post(http, {"task": "sum", "inputs": {"a": {"job": up["id"]}}, "delay": 0.05})
    ids = [up["id"], late["id"], soon["id"]]
    try:
        assert late["status"] == "waiting" and late["not_before"] is not None
        views = _wait_all(http, ids)
        upstream = views[up["id"]]
        assert upstream["status"] == "succeeded"
        arrays_freed.append(upstream["result"]["array"]["id"])
        assert upstream["finished_at"] < late["not_before"]
        _assert_started_on_time(views[late["id"]])
        assert views[late["id"]]["result"] == 45.0
        assert views[soon["id"]]["status"] == "succeeded"
        assert views[soon["id"]]["started_at"] >= upstream["finished_at"]
        assert views[soon["id"]]["started_at"] - upstream["finished_at"] < START_SLACK_S
    finally:
        _cancel_unfinished(http, ids)


# -- two API processes ---------------------------------------------------------------------


@pytest.fixture
def second_api(live: Stack) -> Iterator[str]:
    """Another API process on the live stack's Redis and key prefix (its own due mover)."""
    api, url = stack.start_api(live.env, proc_name="api-second-due-mover")
    try:
        yield url
    finally:
        api.stop()
        assert not stack.pid_alive(api.pid)


def test_two_apis_publish_each_due_job_once(
    http: httpx.Client, live: Stack, second_api: str
) -> None:
    """20 jobs due at the same instant, submitted half through each API while both move due
    jobs: each message is pushed once, each job runs once (one attempt, one line in its run
    log). (~2.5 s)"""
    tags = _tag()
    log = Path(f"/tmp/forklift-test-due-{uuid.uuid4().hex}.log")
    at = time.time() + 1.5

    def body(i: int) -> dict:
        params = {"log": str(log), "tag": f"run{i}"}
        return {"task": "record_run", "params": params, "not_before": at, "tags": tags}

    ids: list[str] = []
    try:
        with broker_pushes(live) as pushes, httpx.Client(base_url=second_api) as other:
            ids += [job["id"] for job in _batch(http, [body(i) for i in range(10)])]
            ids += [job["id"] for job in _batch(other, [body(i) for i in range(10, 20)])]
            views = _wait_all(http, ids)
            time.sleep(3 * 0.2)  # a late second publish would show in the passes after
        for job_id in ids:
            assert views[job_id]["status"] == "succeeded", views[job_id]
            assert len(views[job_id]["attempts"]) == 1
            assert views[job_id]["started_at"] >= at
        assert max(v["started_at"] for v in views.values()) - at < 2 * START_SLACK_S
        if not live.on_amqp:  # MONITOR sees Redis's LPUSHes; on AMQP the runs below tell
            assert {job_id: pushes[job_id] for job_id in ids} == dict.fromkeys(ids, 1)
        runs = Counter(line.split()[1] for line in log.read_text().splitlines())
        assert runs == Counter({f"run{i}": 1 for i in range(20)})
    finally:
        _cancel_unfinished(http, ids)
        log.unlink(missing_ok=True)

"""Celery's own tools see forklift's jobs: names, states, purge (issue 17, item 10).

Real stack. `celery -A worker.app inspect registered` lists a task per job
(`forklift.<name>`); in Celery's event stream (what Flower reads) a job that raises is a
FAILURE with its error, a retry is a RETRY, a cancelled job a SUCCESS whose result says
`cancelled`. After `celery purge` (the common queue, then `-Q` for the domain queue), no
record is left `queued` and no input stays pinned: the job reaper ends them `cancelled` within
one janitor interval. The purge runs on a private stack with its own redis-server: purging
the session's stack would destroy other tests' jobs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from forklift import testing
from shared.arrays.store import ArrayStore
from shared.celery_app import TASK_NAME, create_app, task_name
from shared.due import payload_of
from shared.jobstore import JobStore
from shared.keys import queue_keys
from shared.registry import all_jobs, load_job_modules
from shared.settings import BUILTIN_JOB_MODULES, Settings
from shared.workers import WorkerStore
from tests import stack
from tests.conftest import Stack
from tests.http_api import submit, upload, wait

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers


def celery(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real `celery` command line, as an operator runs it, against a stack's broker."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", *args]
    return subprocess.run(
        argv, env=dict(env), cwd=stack.REPO, capture_output=True, text=True, timeout=60
    )


def nodes(env: Mapping[str, str]) -> list[str]:
    """The Celery node names of a stack's live workers (fresh heartbeats under its prefix;
    a worker a test replaced may have left a stale one)."""
    settings = Settings.from_env(dict(env))
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        beats = WorkerStore(client, settings).beats()
    finally:
        client.close()
    fresh = time.time() - settings.worker_lost_after
    return sorted(name for name, beat in beats.items() if beat >= fresh)


def builtin_jobs() -> set[str]:
    load_job_modules(BUILTIN_JOB_MODULES)
    return {spec.name for spec in all_jobs() if spec.func.__module__ in BUILTIN_JOB_MODULES}


# --- inspect registered ----------------------------------------------------------------------


def test_inspect_registered_lists_every_job_by_name(live: Stack, http: httpx.Client) -> None:
    names = nodes(live.env)
    assert names, "the stack's worker has no heartbeat"
    out = celery(live.env, "inspect", "registered", "--json", "-t", "5", "-d", ",".join(names))
    assert out.returncode == 0, (out.stdout, out.stderr)
    replies = json.loads(out.stdout)
    assert sorted(replies) == names  # the stack's own worker answered, by its node name
    builtin = builtin_jobs()
    assert {"fib", "sleep", "sum", "matmul", "sort"} <= builtin
    api_jobs = {t["name"] for t in http.get("/tasks").json()}
    assert builtin <= api_jobs
    for node, registered in replies.items():
        forklift = {name for name in registered if name.startswith("forklift.")}
        # every job the API offers (built-in and the test modules'), and the old generic task
        assert forklift == {task_name(job) for job in api_jobs} | {TASK_NAME}, node


# --- messages under other names --------------------------------------------------------------


def _send_as(live: Stack, http: httpx.Client, name: str, params: dict[str, Any]) -> str:
    """A fib job's message sent under the Celery task `name`, as an older API (or another
    deployment) would: the record is made by a delayed submission, taken out of the due set
    before it is due, and its message built from it."""
    settings = Settings.from_env(live.env)
    response = http.post("/jobs", json={"task": "fib", "params": params, "delay": 300})
    assert response.status_code == 202, response.text
    job_id = str(response.json()["id"])
    assert live.redis.zrem(settings.keys.jobs_due, job_id) == 1  # not published by the API
    app = create_app(settings)
    try:
        record = JobStore(live.redis, settings).get(job_id)
        assert record is not None
        payload = payload_of(record, ArrayStore(live.redis, settings))
        assert payload is not None
        app.send_task(
            name,
            args=[payload.model_dump(mode="json")],
            task_id=job_id,
            queue=settings.queue,
            ignore_result=True,
        )
    finally:
        app.close()
    return job_id


def test_old_generic_task_still_runs_and_an_unknown_one_fails(
    live: Stack, http: httpx.Client
) -> None:
    """A message queued by an API of before (one task for every job) still runs; a job's
    task the worker does not have ends the record `failed` (Celery drops such a message)."""
    old = _send_as(live, http, TASK_NAME, {"n": 11})
    done = wait(http, old)
    assert (done["status"], done["result"]) == ("succeeded", 89)
    unknown = _send_as(live, http, task_name("no_such_job"), {"n": 11})
    done = wait(http, unknown)
    assert done["status"] == "failed", done
    assert done["error"].startswith("unknown task 'no_such_job' on worker"), done
    assert live.redis.hget(f"{live.key_prefix}:job:{unknown}", "released") == "1"


# --- Celery's event stream -------------------------------------------------------------------


class EventStream:
    """Celery's events as a monitor (Flower) receives them, in a thread: the raw events and
    celery.events.state.State's view of each task."""

    def __init__(self, settings: Settings, worker_nodes: list[str]) -> None:
        self.app = create_app(settings)
        self.nodes = worker_nodes
        self.state = self.app.events.State()
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.heard: set[str] = set()
        self.receiver: Any = None
        self.thread: threading.Thread | None = None

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)
            self.state.event(event)
            if event.get("type") == "worker-heartbeat":
                self.heard.add(str(event.get("hostname")))

    def _capture(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=True)

    def __enter__(self) -> EventStream:
        # What Flower does at start: switch task events on at the workers (off by default,
        # FORKLIFT_CELERY_EVENTS), then listen. Only this stack's workers are asked.
        replies = self.app.control.broadcast(
            "enable_events", destination=self.nodes, reply=True, timeout=5
        )
        assert {node for reply in replies for node in reply} == set(self.nodes), replies
        self.thread = threading.Thread(target=self._capture, name="celery-events", daemon=True)
        self.thread.start()
        # Listening once a heartbeat of every worker arrived (the receiver wakes them up).
        stack.wait_until(lambda: self.heard >= set(self.nodes), 15, what="worker heartbeats")
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.app.control.broadcast(
                "disable_events", destination=self.nodes, reply=True, timeout=5
            )
        finally:
            if self.receiver is not None:
                self.receiver.should_stop = True
            if self.thread is not None:
                self.thread.join(10)
            self.app.close()
        assert self.thread is None or not self.thread.is_alive(), "the event receiver hangs"

    def of(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("uuid") == job_id]

    def types(self, job_id: str) -> list[str]:
        return [str(e["type"]) for e in self.of(job_id)]

    def task(self, job_id: str) -> Any:
        with self.lock:
            return self.state.tasks.get(job_id)

    def wait_state(self, job_id: str, state: str, within: float = 15) -> Any:
        def reached() -> bool:
            task = self.task(job_id)
            return task is not None and task.state == state

        stack.wait_until(reached, within, what=f"{job_id} {state}: {self.types(job_id)}")
        return self.task(job_id)


def test_job_states_in_celerys_event_stream(live: Stack, http: httpx.Client) -> None:
    worker_nodes = nodes(live.env)
    runs = Path(f"/tmp/forklift-celery-native-{uuid.uuid4().hex}")
    before = stack.array_segments(live.shm_prefix)
    a = upload(http, np.arange(10.0))["id"]
    try:
        with EventStream(Settings.from_env(live.env), worker_nodes) as events:
            message = f"boom {uuid.uuid4().hex[:8]}"
            failing = submit(http, "boom", message=message)
            ok = submit(http, "fib", n=10)
            flaky = submit(http, "flaky", inputs={"a": a}, runs=str(runs), fail_times=1)
            sleeper = submit(http, "sleep", seconds=30.0)

            # A raising job: FAILURE with its error, the job's own task name, acked.
            task = events.wait_state(failing, "FAILURE")
            assert wait(http, failing)["status"] == "failed"
            assert task.name == "forklift.boom"
            assert task.exception == f"JobFailed('ValueError: {message}')"
            assert events.types(failing)[:3] == ["task-received", "task-started", "task-failed"]

            task = events.wait_state(ok, "SUCCESS")
            assert wait(http, ok)["result"] == 55
            assert (task.name, task.result) == ("forklift.fib", "'succeeded'")

            # A retry: RETRY (nothing re-sent by Celery), then the next run under the same id.
            task = events.wait_state(flaky, "SUCCESS")
            done = wait(http, flaky)
            assert done["status"] == "succeeded" and done["result"] == 45.0
            assert len(done["attempts"]) == 2
            kinds = events.types(flaky)
            assert kinds.count("task-retried") == 1 and kinds.count("task-received") == 2, kinds
            retried = next(e for e in events.of(flaky) if e["type"] == "task-retried")
            assert "run 1 fails on purpose" in retried["exception"], retried

            # Cancelled while running: SUCCESS, the result says so (REVOKED is for revokes).
            stack.wait_until(
                lambda: http.get(f"/jobs/{sleeper}").json()["status"] == "running",
                15,
                what="sleep running",
            )
            assert http.delete(f"/jobs/{sleeper}").status_code == 200
            task = events.wait_state(sleeper, "SUCCESS")
            assert task.result == "'cancelled'"
            assert wait(http, sleeper)["status"] == "cancelled"
        assert http.delete(f"/arrays/{a}").status_code == 204
        stack.wait_arrays_freed(live.shm_prefix, before)
    finally:
        runs.unlink(missing_ok=True)


# --- celery purge ----------------------------------------------------------------------------


def _queued_messages(client: redis.Redis, queue: str) -> int:
    return sum(int(client.llen(key)) for key in queue_keys(queue))


def _purged_count(out: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"Purged (\d+) messages?", out.stdout)
    if found is None:
        assert "No messages purged" in out.stdout, (out.stdout, out.stderr)
        return 0
    return int(found.group(1))


def test_purge_leaves_no_job_queued_and_no_input_pinned() -> None:
    # Defaults for the reaper and the janitor (FORKLIFT_WORKER_LOST_AFTER 15 s, janitor
    # 60 s): the time from the purge to the last record ended is what an operator sees.
    with (
        testing.running_stack(stack.JOB_MODULES, name="purge", supervisor=stack.SUPERVISOR) as st,
        httpx.Client(base_url=st.url, timeout=30) as http,
    ):
        settings = st.settings
        client = redis.Redis.from_url(st.redis_url, decode_responses=True)
        try:
            _purge_and_check(st, settings, client, http)
        finally:
            client.close()
    assert not st.leaked_segments and not st.stray_pids


def _purge_and_check(
    st: testing.Stack, settings: Settings, client: redis.Redis, http: httpx.Client
) -> None:
    before = stack.array_segments(st.shm_prefix)
    # Both children busy: what is submitted next cannot start.
    blockers = [submit(http, "sleep", seconds=60.0) for _ in range(2)]
    for job_id in blockers:
        stack.wait_until(
            lambda j=job_id: http.get(f"/jobs/{j}").json()["status"] == "running",
            15,
            what="both children busy",
        )
    a = upload(http, np.ones(1000))["id"]
    b = upload(http, np.arange(100.0))["id"]
    on_arrays = [submit(http, "sum", inputs={"a": a}) for _ in range(3)]
    on_arrays.append(submit(http, "sum", inputs={"a": b}))
    plain = [submit(http, "fib", n=20) for _ in range(2)]
    delayed = http.post("/jobs", json={"task": "fib", "params": {"n": 12}, "delay": 12})
    assert delayed.status_code == 202, delayed.text
    later = delayed.json()["id"]
    purged = [*on_arrays, *plain]
    assert client.hget(settings.keys.array(a), "pins") == "3"
    assert client.hget(settings.keys.array(b), "pins") == "1"
    # Jobs with inputs in one shm domain wait in the domain's queue, the rest in the common
    # one; a delayed job has no message yet (forklift's due set has it).
    domain_queue = settings.domain_queue()
    assert _queued_messages(client, domain_queue) == len(on_arrays)
    assert _queued_messages(client, settings.queue) == len(plain)

    # `celery purge` empties the queues the app knows: the common one only ...
    out = celery(st.env, "purge", "-f")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert _purged_count(out) == len(plain)
    assert _queued_messages(client, settings.queue) == 0
    assert _queued_messages(client, domain_queue) == len(on_arrays)
    # ... a domain queue needs -Q.
    out = celery(st.env, "purge", "-f", "-Q", domain_queue)
    assert out.returncode == 0, (out.stdout, out.stderr)
    purged_at = time.monotonic()
    assert _purged_count(out) == len(on_arrays)
    assert _queued_messages(client, domain_queue) == 0
    for job_id in blockers:  # the children are free: nothing is left to run the purged jobs
        assert http.delete(f"/jobs/{job_id}").status_code == 200

    ended = {job_id: wait(http, job_id, settings.janitor_interval + 30) for job_id in purged}
    took = time.monotonic() - purged_at
    for job_id, view in ended.items():
        assert view["status"] == "cancelled", view
        assert view["error"].startswith("message lost") and "purged" in view["error"], view
        assert view["started_at"] is None and view["attempts"] == [], view
        assert client.hget(settings.keys.job(job_id), "released") == "1"
    assert took < settings.janitor_interval, f"purged jobs ended {took:.1f} s after the purge"
    assert client.hget(settings.keys.array(a), "pins") == "0"
    assert client.hget(settings.keys.array(b), "pins") == "0"
    # The delayed job was not taken for lost: it ran when due.
    assert wait(http, later, 30)["result"] == 144
    assert [wait(http, j)["status"] for j in blockers] == ["cancelled", "cancelled"]
    assert client.zcard(settings.keys.jobs_live) == 0
    for array_id in (a, b):  # unpinned: deleted at once, segments freed
        assert http.delete(f"/arrays/{array_id}").status_code == 204
    stack.wait_arrays_freed(st.shm_prefix, before)
    print(f"purged jobs ended cancelled {took:.1f} s after the purge")

"""The job pipeline end to end: real Redis, real prefork workers, real uvicorn over HTTP."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests import stack
from tests.conftest import Stack
from tests.http_api import submit, wait

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers


def test_fib_succeeds_over_http(http: httpx.Client) -> None:
    response = http.post("/jobs", json={"task": "fib", "params": {"n": 25}})
    assert response.status_code == 202
    body = response.json()
    assert response.headers["location"] == f"/jobs/{body['id']}"
    assert body["status"] == "queued"
    done = wait(http, body["id"])
    assert done["status"] == "succeeded"
    assert done["result"] == 75025
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["worker"]["pid"] > 0
    result = http.get(f"/jobs/{body['id']}/result")
    assert result.status_code == 200 and result.json() == 75025


def test_loop_stays_responsive_while_every_child_is_busy(http: httpx.Client, live: Stack) -> None:
    """The seed's situation: more CPU jobs than children, and /healthz still answers.

    The poller only collects (a failure in a thread would only end the thread); the checks
    come after join(). What is checked is behaviour: every probe answered 200 (a stalled
    loop would time a probe out), and probes were answered while both children computed.
    """
    jobs = [submit(http, "fib", n=34) for _ in range(6)]
    answers: list[tuple[float, int | str]] = []  # (wall-clock time answered, status or error)
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=live.url, timeout=5) as probe:
            while not stop.is_set():
                try:
                    outcome: int | str = probe.get("/healthz").status_code
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                answers.append((time.time(), outcome))
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        results = [wait(http, job_id, 120) for job_id in jobs]
    finally:
        stop.set()
        poller.join()
    assert [r["status"] for r in results] == ["succeeded"] * 6
    assert {r["result"] for r in results} == {5702887}
    assert len({r["worker"]["pid"] for r in results}) >= 2, "jobs ran in one process only"
    failed = [(at, outcome) for at, outcome in answers if outcome != 200]
    assert not failed, f"/healthz failed under load: {failed[:5]}"
    # While the first two jobs both ran, every child was busy: the API answered meanwhile.
    first, second = sorted(results, key=lambda r: r["started_at"])[:2]
    busy_from = max(first["started_at"], second["started_at"])
    busy_until = min(first["finished_at"], second["finished_at"])
    assert busy_from < busy_until, "the first two jobs did not run at the same time"
    during = [at for at, _ in answers if busy_from < at < busy_until]
    assert len(during) >= 3, f"{len(during)} probes answered while every child was busy"


def test_wait_returns_when_the_job_ends_not_at_the_deadline(http: httpx.Client) -> None:
    """One long-poll of 60 s on a 1 s job: it answers with the end, long before the deadline
    (the client gives up at 30 s, so waiting for the deadline fails the test)."""
    job = submit(http, "sleep", seconds=1.0)
    response = http.get(f"/jobs/{job}", params={"wait": 60}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"


def test_wait_times_out_with_the_current_state(http: httpx.Client) -> None:
    job = submit(http, "sleep", seconds=3)
    start = time.monotonic()
    state = http.get(f"/jobs/{job}", params={"wait": 0.5}).json()  # one long-poll
    assert time.monotonic() - start >= 0.5, "it did not wait"
    assert state["status"] in ("queued", "running"), "it waited for the end"
    assert wait(http, job, 20)["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"task": "no_such_task"}, 422, "unknown_task"),
        ({"task": "fib", "params": {"n": "x"}}, 422, "invalid_params"),
        ({"task": "fib", "params": {"n": -3}}, 422, "invalid_params"),
        ({"task": "fib", "params": {}}, 422, "invalid_params"),
        ({"task": "fib", "params": {"n": 5, "m": 1}}, 422, "invalid_params"),
        ({"task": "fib", "params": {"n": 5}, "timeout": 10**9}, 422, "invalid_timeout"),
        ({"params": {"n": 5}}, 422, "invalid_request"),
        (None, 422, "invalid_request"),
        (b"{not json", 400, "malformed_json"),
        (b"x" * (2 << 20), 413, "too_large"),
    ],
    ids=[
        "unknown-task",
        "wrong-type",
        "out-of-range",
        "missing-param",
        "extra-param",
        "timeout-above-limit",
        "no-task",
        "no-body",
        "malformed-json",
        "oversized",
    ],
)
def test_bad_submissions_get_json_errors_and_enqueue_nothing(
    http: httpx.Client, live: Stack, body: object, status: int, code: str
) -> None:
    queued_before = live.queue_lengths()
    jobs_before = live.redis.zcard(f"{live.key_prefix}:jobs")
    if isinstance(body, bytes):
        response = http.post("/jobs", content=body, headers={"content-type": "application/json"})
    elif body is None:
        response = http.post("/jobs")
    else:
        response = http.post("/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert live.queue_lengths() == queued_before
    assert live.redis.zcard(f"{live.key_prefix}:jobs") == jobs_before


def test_failing_job_reports_error_and_worker_goes_on(http: httpx.Client) -> None:
    failed = wait(http, submit(http, "boom", message="the sky fell"))
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: the sky fell"
    assert failed["result"] is None
    result = http.get(f"/jobs/{failed['id']}/result")
    assert result.status_code == 409
    assert "the sky fell" in result.json()["error"]["message"]
    assert wait(http, submit(http, "fib", n=10))["result"] == 55


def test_cancel_running_job_frees_its_process(http: httpx.Client, live: Stack) -> None:
    job = submit(http, "sleep", seconds=120)
    deadline = time.monotonic() + 20
    while http.get(f"/jobs/{job}").json()["status"] != "running":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.05)
    response = http.delete(f"/jobs/{job}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    record = http.get(f"/jobs/{job}").json()
    assert record["status"] == "cancelled"
    # Full concurrency afterwards: two jobs at once, in two children, overlapping in time.
    pair = [submit(http, "sleep", seconds=1.0) for _ in range(2)]
    first, second = [wait(http, job_id, 30) for job_id in pair]
    assert [first["status"], second["status"]] == ["succeeded", "succeeded"]
    assert first["worker"]["pid"] != second["worker"]["pid"]
    assert first["started_at"] < second["finished_at"], "ran one after the other"
    assert second["started_at"] < first["finished_at"], "ran one after the other"
    # Ended and stopped: DELETE now removes its record (tests/integration/test_job_list.py).
    assert http.delete(f"/jobs/{job}").json()["status"] == "cancelled"
    assert http.get(f"/jobs/{job}").status_code == 404
    children = stack.children_of(live.worker.pid)
    assert len(children) == 2


def test_cancel_queued_job_never_runs(http: httpx.Client) -> None:
    blockers = [submit(http, "sleep", seconds=1.5) for _ in range(2)]
    queued = submit(http, "fib", n=20)
    assert http.delete(f"/jobs/{queued}").json()["status"] == "cancelled"
    for job_id in blockers:
        assert wait(http, job_id)["status"] == "succeeded"
    time.sleep(0.5)
    record = http.get(f"/jobs/{queued}").json()
    assert record["status"] == "cancelled"
    assert record["started_at"] is None and record["result"] is None


def test_unknown_job_is_404(http: httpx.Client) -> None:
    for path in ("/jobs/" + "0" * 32, "/jobs/nope", "/jobs/" + "0" * 32 + "/result"):
        response = http.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    assert http.delete("/jobs/" + "1" * 32).status_code == 404


def test_tasks_lists_fib_with_its_schema(http: httpx.Client) -> None:
    tasks = {t["name"]: t for t in http.get("/tasks").json()}
    schema = tasks["fib"]["params_schema"]
    assert schema["properties"]["n"]["type"] == "integer"
    assert schema["required"] == ["n"]
    assert "Fibonacci" in tasks["fib"]["doc"]
    assert {"sleep", "prime_count", "boom"} <= set(tasks)


def test_one_task_is_described_like_in_the_list(http: httpx.Client) -> None:
    listed = {t["name"]: t for t in http.get("/tasks").json()}
    for name in ("fib", "matmul"):
        response = http.get(f"/tasks/{name}")
        assert response.status_code == 200, response.text
        assert response.json() == listed[name]
    assert set(http.get("/tasks/matmul").json()["inputs"]) == {"a", "b"}
    missing = http.get("/tasks/no_such_task")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "task_not_found"
    assert "no_such_task" in missing.json()["error"]["message"]


def test_healthz_counts_workers(http: httpx.Client) -> None:
    body = http.get("/healthz").json()
    assert body["redis"] is True
    assert body["workers"] == 1
    assert body["status"] == "ok"


def test_openapi_docs_are_served(http: httpx.Client) -> None:
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/jobs", "/jobs/{job_id}", "/arrays", "/tasks", "/healthz"} <= set(paths)


def test_batch_submission_and_batch_wait(http: httpx.Client, live: Stack) -> None:
    body = {"jobs": [{"task": "fib", "params": {"n": n}} for n in range(1, 21)]}
    response = http.post("/jobs/batch", json=body)
    assert response.status_code == 202, response.text
    ids = [job["id"] for job in response.json()["jobs"]]
    assert len(set(ids)) == 20
    done = http.post("/jobs/wait", json={"ids": ids, "wait": 30}, timeout=40).json()["jobs"]
    assert [job["id"] for job in done] == ids
    fibs = [1, 1]
    while len(fibs) < 20:
        fibs.append(fibs[-1] + fibs[-2])
    assert [job["result"] for job in done] == fibs


def test_batch_with_one_bad_job_queues_nothing(http: httpx.Client, live: Stack) -> None:
    queued_before = live.queue_lengths()
    jobs_before = live.redis.zcard(f"{live.key_prefix}:jobs")
    body = {"jobs": [{"task": "fib", "params": {"n": 3}}, {"task": "fib", "params": {"n": -1}}]}
    response = http.post("/jobs/batch", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"].startswith("jobs[1]: fib: n:")
    assert error["detail"]["index"] == 1
    assert live.queue_lengths() == queued_before
    assert live.redis.zcard(f"{live.key_prefix}:jobs") == jobs_before


def test_wait_any_returns_at_the_first_end(http: httpx.Client) -> None:
    quick = submit(http, "sleep", seconds=0.2)
    slow = submit(http, "sleep", seconds=5)
    jobs = http.post("/jobs/wait", json={"ids": [slow, quick], "wait": 20, "any": True}).json()
    assert [j["status"] for j in jobs["jobs"]][1] == "succeeded"
    assert jobs["jobs"][0]["status"] in ("queued", "running"), "it waited for the slow one"
    assert http.delete(f"/jobs/{slow}").status_code == 200
    unknown = http.post("/jobs/wait", json={"ids": [quick, "0" * 32]})
    assert unknown.status_code == 404

"""The job pipeline end to end: real Redis, real prefork workers, real uvicorn over HTTP."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests import stack
from tests.conftest import Stack
from tests.http_api import submit, wait


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
    """The seed's situation: more CPU jobs than children, and /healthz still answers at once."""
    jobs = [submit(http, "fib", n=34) for _ in range(6)]
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=live.url, timeout=5) as probe:
            while not stop.is_set():
                start = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
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
    assert len(latencies) > 5
    assert max(latencies) < 1.0, f"healthz took {max(latencies):.3f} s under load"


def test_wait_returns_when_the_job_ends_not_at_the_deadline(http: httpx.Client) -> None:
    job = submit(http, "sleep", seconds=1.0)
    start = time.monotonic()
    done = wait(http, job, 10)
    elapsed = time.monotonic() - start
    assert done["status"] == "succeeded"
    assert elapsed < 4.0, f"?wait=10 on a 1 s job took {elapsed:.2f} s"


def test_wait_times_out_with_the_current_state(http: httpx.Client) -> None:
    job = submit(http, "sleep", seconds=3)
    start = time.monotonic()
    state = http.get(f"/jobs/{job}", params={"wait": 0.5}).json()  # one long-poll
    assert time.monotonic() - start < 2.5
    assert state["status"] in ("queued", "running")
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
    start = time.monotonic()
    response = http.delete(f"/jobs/{job}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    record = http.get(f"/jobs/{job}").json()
    assert record["status"] == "cancelled"
    # Full concurrency afterwards: two jobs at once each run in their own child.
    pair = [submit(http, "sleep", seconds=1.0) for _ in range(2)]
    done = [wait(http, job_id, 30) for job_id in pair]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"]
    assert abs(done[0]["started_at"] - done[1]["started_at"]) < 0.9, "ran one after the other"
    assert time.monotonic() - start < 10
    assert http.delete(f"/jobs/{job}").status_code == 409
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
    start = time.monotonic()
    jobs = http.post("/jobs/wait", json={"ids": [slow, quick], "wait": 20, "any": True}).json()
    assert time.monotonic() - start < 4
    assert [j["status"] for j in jobs["jobs"]][1] == "succeeded"
    assert jobs["jobs"][0]["status"] in ("queued", "running")
    assert http.delete(f"/jobs/{slow}").status_code == 200
    unknown = http.post("/jobs/wait", json={"ids": [quick, "0" * 32]})
    assert unknown.status_code == 404

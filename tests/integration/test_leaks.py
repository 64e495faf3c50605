"""Leaks under load: 500 mixed jobs leave /dev/shm and Redis where they were.

A private stack (its own redis-server, so its whole key space can be counted) runs 500 jobs:
successes, failures (in Python and in NumPy), cancellations (queued and running), jobs on
shared inputs, array results fetched and deleted, array results left to expire, inputs deleted
while jobs still hold them. Then, once the arrays' TTL (15 s here) has passed and the janitor
(every second here) has run, this test compares with the baseline taken before the load:

- /dev/shm segments with the stack's prefix: exactly the baseline (none);
- array records, the expiry index, registrations and the shm byte counter: back to baseline;
- Celery's keys: queues empty and gone, no unacked message, no result (results are ignored);
- every other Redis key is the baseline's, except what legitimately stays until its TTL:
  the 500 job records (each must be final and carry a TTL <= FORKLIFT_JOB_TTL), the jobs
  index (trimmed by the janitor after the job TTL) and the metrics counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from tests import stack
from tests.http_api import npy_bytes

ARRAY_TTL = 15
JOB_TTL = 3600
N_JOBS = 500


@dataclass
class Load:
    url: str
    env: dict[str, str]
    redis: redis.Redis
    worker: stack.Proc

    @property
    def prefix(self) -> str:
        return self.env["FORKLIFT_KEY_PREFIX"]

    @property
    def shm_prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]


@pytest.fixture(scope="module")
def load() -> Iterator[Load]:
    redis_proc, url = stack.start_redis()
    env = stack.stack_env(
        url,
        FORKLIFT_ARRAY_TTL=str(ARRAY_TTL),
        FORKLIFT_JOB_TTL=str(JOB_TTL),
        FORKLIFT_JANITOR_INTERVAL="1",
    )
    procs = [redis_proc]
    try:
        worker = stack.start_worker(env, "leaks", 2)
        procs.append(worker)
        api, api_url = stack.start_api(env)
        procs.append(api)
        client = redis.Redis.from_url(url, decode_responses=True)
        yield Load(api_url, env, client, worker)
        client.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
        for name in stack.segments(env["FORKLIFT_SHM_PREFIX"]):
            (Path("/dev/shm") / name).unlink(missing_ok=True)


def _keys(load: Load) -> set[str]:
    return {k for k in load.redis.scan_iter("*") if ":janitor:" not in k}


def _transient(load: Load, key: str) -> bool:
    """Keys that legitimately outlive the load until their TTL (or are counters)."""
    return (
        key.startswith(f"{load.prefix}:job:")
        or key == f"{load.prefix}:jobs"
        or key.startswith(f"{load.prefix}:metrics:")
    )


def test_500_mixed_jobs_leave_no_segments_and_no_keys(load: Load) -> None:
    r = load.redis
    with httpx.Client(base_url=load.url, timeout=30) as http:

        def upload(arr: np.ndarray) -> str:
            response = http.post(
                "/arrays", content=npy_bytes(arr), headers={"content-type": "application/x-npy"}
            )
            assert response.status_code == 201, response.text
            return response.json()["id"]

        def submit(task: str, inputs: dict[str, str] | None = None, **params: object) -> str:
            body = {
                "task": task,
                "params": params,
                "inputs": {k: {"array": v} for k, v in (inputs or {}).items()},
            }
            response = http.post("/jobs", json=body)
            assert response.status_code == 202, response.text
            return response.json()["id"]

        # Baseline: the stack warmed up (one array job, so that kombu's routing tables for
        # both queues exist) and idle again, after the janitor has run.
        warm = upload(np.ones(4))
        http.get(f"/jobs/{submit('sum', {'a': warm})}", params={"wait": 30})
        assert http.delete(f"/arrays/{warm}").status_code == 204
        time.sleep(1.5)
        warm_jobs = {k for k in r.scan_iter(f"{load.prefix}:job:*")}
        base_keys = {k for k in _keys(load) if not _transient(load, k)}
        base_segments = stack.segments(load.shm_prefix)
        shm_key = f"{load.prefix}:shm_bytes:{http.get('/healthz').json()['shm_domain']}"
        base_shm_bytes = int(r.get(shm_key) or 0)
        start = time.monotonic()

        jobs: dict[str, str] = {}  # id -> kind
        cancel_later: list[str] = []
        results_to_delete: list[str] = []
        rng = np.random.default_rng(0)
        for batch in range(10):  # 50 jobs per batch, fresh inputs each time (TTL 15 s)
            vec = upload(rng.standard_normal(10_000))
            mat = upload(rng.standard_normal((64, 64)))
            singular = upload(np.zeros((8, 8)))
            doomed = upload(np.ones(1000))
            for i in range(15):
                jobs[submit("fib", n=10 + i % 9)] = "fib"
            for i in range(7):
                jobs[submit("boom", message=f"b{batch}-{i}")] = "boom"
            for _ in range(5):
                job_id = submit("sleep", seconds=0.2)
                jobs[job_id] = "cancel"
                cancel_later.append(job_id)
            for _ in range(8):
                jobs[submit("sum", {"a": vec})] = "sum"
            for _ in range(5):
                jobs[submit("sum", {"a": mat}, axis=0)] = "sum-array"
            for _ in range(3):
                jobs[submit("matmul", {"a": mat, "b": mat})] = "matmul"
            for _ in range(3):
                jobs[submit("solve", {"a": singular, "b": singular})] = "solve-fails"
            for _ in range(3):
                jobs[submit("sum", {"a": doomed})] = "doomed-input"
            # Deleted while jobs hold it: freed when the last of them ends.
            assert http.delete(f"/arrays/{doomed}").status_code in (202, 204)
            # Long enough that only the cancel can end it, however late the test gets to it.
            job_id = submit("sleep", seconds=300)
            jobs[job_id] = "cancel-running"
            cancel_later.append(job_id)
            for _ in range(N_JOBS // 10 - 50):
                jobs[submit("fib", n=12)] = "fib"
            for job_id in cancel_later[-6:-1]:
                http.delete(f"/jobs/{job_id}")
        assert len(jobs) == N_JOBS
        peak_keys = len(_keys(load))

        # Cancel each long sleep once it runs; then everything ends.
        waiting = [j for j in cancel_later if jobs[j] == "cancel-running"]

        def cancel_the_started() -> bool:
            for job_id in list(waiting):
                if http.get(f"/jobs/{job_id}").json()["status"] != "queued":
                    assert http.delete(f"/jobs/{job_id}").status_code == 200
                    waiting.remove(job_id)
            return not waiting

        stack.wait_until(cancel_the_started, 240, interval=0.1, what="long sleeps started")
        final: dict[str, dict] = {}
        for job_id in jobs:
            final[job_id] = http.get(f"/jobs/{job_id}", params={"wait": 60}, timeout=70).json()
        ran_for = time.monotonic() - start
        by_kind: dict[str, set[str]] = {}
        for job_id, kind in jobs.items():
            by_kind.setdefault(kind, set()).add(final[job_id]["status"])
        assert by_kind["fib"] == by_kind["sum"] == by_kind["matmul"] == {"succeeded"}
        assert by_kind["sum-array"] == by_kind["doomed-input"] == {"succeeded"}
        assert by_kind["boom"] == by_kind["solve-fails"] == {"failed"}
        assert by_kind["cancel-running"] == {"cancelled"}
        assert by_kind["cancel"] <= {"cancelled", "succeeded"}
        # Half of the array results are fetched and deleted; the rest are left to expire.
        array_results = [
            final[j]["result"]["array"]["id"]
            for j, kind in jobs.items()
            if kind in ("sum-array", "matmul")
        ]
        for index, array_id in enumerate(array_results):
            if index % 2 == 0:
                assert http.get(f"/arrays/{array_id}").status_code == 200
                assert http.delete(f"/arrays/{array_id}").status_code == 204
        results_to_delete.extend(array_results[1::2])
        cancelled = sum(final[j]["status"] == "cancelled" for j in jobs)

    # Wait for the arrays' TTL and the janitor: segments and array keys back to baseline.
    def back_to_baseline() -> bool:
        keys = _keys(load)
        return (
            stack.segments(load.shm_prefix) == base_segments
            and {k for k in keys if not _transient(load, k)} == base_keys
            and int(r.get(shm_key) or 0) == base_shm_bytes
        )

    try:
        stack.wait_until(back_to_baseline, ARRAY_TTL + 20, interval=0.5, what="baseline again")
    except TimeoutError:
        keys = {k for k in _keys(load) if not _transient(load, k)}
        raise AssertionError(
            f"segments left: {sorted(stack.segments(load.shm_prefix) - base_segments)}; "
            f"keys added: {sorted(keys - base_keys)}; keys gone: {sorted(base_keys - keys)}; "
            f"shm bytes: {r.get(shm_key)} (baseline {base_shm_bytes})"
        ) from None
    total = time.monotonic() - start
    keys = _keys(load)
    job_keys = [k for k in keys if k.startswith(f"{load.prefix}:job:") and k not in warm_jobs]
    assert len(job_keys) == N_JOBS
    pipe = r.pipeline(transaction=False)
    for key in job_keys:
        pipe.ttl(key)
        pipe.hget(key, "status")
    replies = pipe.execute()
    ttls, statuses = replies[0::2], replies[1::2]
    assert all(0 < ttl <= JOB_TTL for ttl in ttls), "a job record without a TTL"
    assert set(statuses) <= {"succeeded", "failed", "cancelled"}
    assert not [k for k in keys if k.startswith(f"{load.prefix}:array:")]
    assert r.hlen("unacked") == 0 and not list(r.scan_iter("celery-task-meta-*"))
    assert not [k for k in keys if r.type(k) == "list"], "a queue still holds messages"
    assert stack.pid_alive(load.worker.pid)
    print(
        f"\n{N_JOBS} jobs ({cancelled} cancelled, {len(array_results)} array results, "
        f"{len(results_to_delete)} left to expire) ended in {ran_for:.1f} s; baseline again "
        f"after {total:.1f} s. Redis keys: baseline {len(base_keys)}, peak {peak_keys}, "
        f"after {len(keys)} = baseline + {len(job_keys)} job records + "
        f"{len(keys) - len(base_keys) - len(job_keys)} (warm-up job, jobs index, metrics); "
        f"segments: baseline {len(base_segments)}, after {len(stack.segments(load.shm_prefix))}"
    )

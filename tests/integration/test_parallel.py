"""Parallel jobs on the real stack: one job as parts over the same segments.

Every splittable built-in gives the single job's result (bit-exact where the operation is),
the parts run in different worker processes, and a cancel, a failing part or a part whose
child is SIGKILLed ends the job as documented with nothing left in /dev/shm or pinned.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests import stack
from tests.conftest import Stack
from tests.http_api import download, wait
from tests.http_api import upload as _upload

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers

# Arrays a test made (inputs and results): deleted after it, and /dev/shm checked.
_made: list[str] = []


@pytest.fixture(autouse=True)
def no_leftovers(live: Stack, http: httpx.Client) -> Iterator[None]:
    before = stack.array_segments(live.shm_prefix)
    yield
    for array_id in _made:
        assert http.delete(f"/arrays/{array_id}").status_code in (202, 204, 404)
    _made.clear()
    stack.wait_arrays_freed(live.shm_prefix, before)


def upload(http: httpx.Client, arr: np.ndarray) -> dict[str, Any]:
    meta = _upload(http, arr)
    _made.append(meta["id"])
    return meta


def _submit(
    http: httpx.Client,
    task: str,
    inputs: dict[str, str],
    parallel: int | str = 1,
    **params: object,
) -> dict[str, Any]:
    body = {
        "task": task,
        "params": params,
        "inputs": {name: {"array": array_id} for name, array_id in inputs.items()},
        "parallel": parallel,
    }
    response = http.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def _value(http: httpx.Client, result: Any) -> Any:
    """A job's result with its arrays downloaded."""
    if isinstance(result, dict) and set(result) == {"array"}:
        _made.append(result["array"]["id"])
        return download(http, result["array"]["id"])
    if isinstance(result, dict):
        return {k: _value(http, v) for k, v in result.items()}
    return result


def _same(got: Any, want: Any, exact: bool) -> bool:
    if isinstance(want, dict):
        return set(got) == set(want) and all(_same(got[k], want[k], exact) for k in want)
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if exact:
        return bool(np.array_equal(got, want, equal_nan=True))
    return bool(np.allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True))


def _record(live: Stack, job_id: str) -> dict[str, str]:
    return dict(live.redis.hgetall(f"{live.key_prefix}:job:{job_id}"))


def _run(http: httpx.Client, task: str, inputs: dict[str, str], parallel: int | str, **p: object):
    job = _submit(http, task, inputs, parallel, **p)
    done = wait(http, job["id"], 60)
    assert done["status"] == "succeeded", (task, parallel, p, done)
    return done, _value(http, done["result"])


rng = np.random.default_rng(16)
ODD = 100_003  # no part count below divides it
CASES: list[tuple[str, dict[str, np.ndarray], dict[str, object], bool]] = [
    ("sum", {"a": rng.random(ODD)}, {}, False),
    ("sum", {"a": rng.integers(-1000, 1000, (ODD, 3))}, {"axis": 0}, True),
    ("mean", {"a": rng.random((401, 7))}, {"axis": 0}, False),
    ("std", {"a": rng.random(ODD)}, {"ddof": 1}, False),
    ("min", {"a": rng.random(ODD)}, {}, True),
    ("max", {"a": rng.integers(0, 10**9, ODD)}, {}, True),
    ("histogram", {"a": rng.normal(size=ODD)}, {"bins": 17}, True),
    ("histogram", {"a": rng.normal(size=ODD)}, {"bins": 5, "density": True}, False),
    ("normalize", {"a": rng.random((1001, 3))}, {}, True),
    ("normalize", {"a": rng.random((1001, 3))}, {"method": "zscore", "channel_axis": 1}, False),
    # BLAS blocks rows differently for different row counts: equal to rounding
    ("matmul", {"a": rng.random((301, 40)), "b": rng.random((40, 9))}, {}, False),
    ("sort", {"a": rng.random(ODD)}, {}, True),
    ("sort", {"a": rng.integers(0, 50, (301, 13))}, {"axis": 1}, True),
    ("sort", {"a": np.asfortranarray(rng.random((97, 5)))}, {"axis": 0}, True),
    ("fft", {"a": rng.random((64, 50))}, {"axis": 1}, True),
    ("fft", {"a": rng.random((64, 50))}, {"axis": 0, "mode": "magnitude"}, True),
    ("convolve", {"a": rng.random(5001), "v": rng.random(31)}, {}, False),
    ("convolve", {"a": rng.random(5001), "v": rng.random(31)}, {"mode": "same"}, False),
    ("convolve", {"a": rng.random(5001), "v": rng.random(31)}, {"mode": "valid"}, False),
]


@pytest.mark.parametrize(("task", "arrays", "params", "exact"), CASES)
def test_parallel_equals_one_job(
    http: httpx.Client, task: str, arrays: dict[str, np.ndarray], params: dict, exact: bool
) -> None:
    inputs = {name: upload(http, arr)["id"] for name, arr in arrays.items()}
    _, want = _run(http, task, inputs, 1, **params)
    for parallel in (2, 3, 7):
        done, got = _run(http, task, inputs, parallel, **params)
        assert done["parts"] is not None and done["parts"]["done"] == done["parts"]["total"] > 1
        assert _same(got, want, exact), (task, params, parallel, got, want)


def test_odd_sizes_more_parts_than_rows_and_empty(http: httpx.Client) -> None:
    short = upload(http, np.array([3.0, 1.0, 2.0]))["id"]
    done, got = _run(http, "sort", {"a": short}, 7)
    assert done["parts"]["total"] == 3  # capped at the length
    assert got.tolist() == [1.0, 2.0, 3.0]
    empty = upload(http, np.zeros(0))["id"]
    for task in ("sum", "sort"):
        done, got = _run(http, task, {"a": empty}, 4)
        assert done["parts"] is None  # nothing to split: an ordinary job
        assert np.asarray(got).size == (1 if task == "sum" else 0)


def test_refused_where_it_cannot_split(http: httpx.Client) -> None:
    a = upload(http, rng.random(1000))["id"]
    body = {"task": "percentile", "params": {"q": 50}, "inputs": {"a": {"array": a}}}
    response = http.post("/jobs", json=body | {"parallel": 2})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "not_splittable"
    assert "does not declare how it splits" in response.json()["error"]["message"]
    response = http.post(
        "/jobs", json={"task": "fft", "inputs": {"a": {"array": a}}, "parallel": 2}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "not_splittable"
    auto = http.post("/jobs", json=body | {"parallel": "auto"})  # auto falls back to one job
    assert auto.status_code == 202, auto.text
    assert wait(http, auto.json()["id"])["status"] == "succeeded"
    assert http.get("/tasks/sort").json()["splittable"] is True
    assert http.get("/tasks/percentile").json()["splittable"] is False


def test_auto_uses_every_worker_process(http: httpx.Client) -> None:
    big = upload(http, rng.random(4 << 20))["id"]  # 32 MiB: four 8 MiB parts at least
    done, _ = _run(http, "sum", {"a": big}, "auto")
    assert done["parts"]["total"] == 2  # the stack's two worker children


def _parts(http: httpx.Client, job: dict[str, Any]) -> list[dict[str, Any]]:
    return [http.get(f"/jobs/{pid}").json() for pid in job["parts"]["ids"]]


def _wait_running(http: httpx.Client, job: dict[str, Any], n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        parts = _parts(http, job)
        if sum(p["status"] == "running" for p in parts) >= n:
            return parts
        assert time.monotonic() < deadline, parts
        time.sleep(0.05)


def _assert_released(live: Stack, http: httpx.Client, job_id: str, inputs: list[str]) -> None:
    """Its inputs unpinned, its record released, its output segment freed (or, after a
    success, its result)."""
    record = _record(live, job_id)
    output = record.get("output_id", "")
    if record["status"] == "succeeded":  # the output became the result: kept, unpinned
        assert output and f'"id": "{output}"' in record["result"], record
        assert live.redis.hget(f"{live.key_prefix}:array:{output}", "state") == "ready"
        output = ""
    deadline = time.monotonic() + 10
    while True:
        pins = [int(live.redis.hget(f"{live.key_prefix}:array:{a}", "pins") or 0) for a in inputs]
        gone = not output or not os.path.exists(f"/dev/shm/{live.shm_prefix}{output}")
        released = _record(live, job_id).get("released") == "1"
        if pins == [0] * len(inputs) and gone and released:
            break
        assert time.monotonic() < deadline, (pins, gone, released)
        time.sleep(0.05)
    if output:
        assert not live.redis.exists(f"{live.key_prefix}:array:{output}")
    assert not live.redis.zscore(f"{live.key_prefix}:jobs:live", job_id)


def test_parts_run_in_different_worker_processes(http: httpx.Client, live: Stack) -> None:
    arr = rng.random(10_001)
    a = upload(http, arr)["id"]
    job = _submit(http, "slow_double", {"a": a}, 2, seconds=1.0)
    done = wait(http, job["id"], 30)
    assert done["status"] == "succeeded", done
    parts = _parts(http, done)
    assert [p["parent"] for p in parts] == [job["id"]] * 2
    assert len({p["worker"]["pid"] for p in parts}) == 2
    assert done["progress"]["fraction"] == 1.0  # the mean of its parts' progress
    assert np.array_equal(_value(http, done["result"]), arr * 2)
    _assert_released(live, http, job["id"], [a])


def test_cancel_stops_every_part_and_frees_the_output(http: httpx.Client, live: Stack) -> None:
    a = upload(http, rng.random(10_001))["id"]
    job = _submit(http, "slow_double", {"a": a}, 3, seconds=20)  # 3 parts, 2 children
    _wait_running(http, job, 2)
    cancelled = http.delete(f"/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    done = wait(http, job["id"])
    assert done["status"] == "cancelled"
    _assert_released(live, http, job["id"], [a])
    assert {p["status"] for p in _parts(http, done)} == {"cancelled"}
    part = http.delete(f"/jobs/{done['parts']['ids'][0]}")  # parts are cancelled via their job
    assert part.status_code == 409 and part.json()["error"]["code"] == "job_part"


def test_a_failing_part_fails_the_job_and_stops_the_others(http: httpx.Client, live: Stack) -> None:
    a = upload(http, rng.random(10_001))["id"]
    job = _submit(http, "slow_double", {"a": a}, 2, seconds=20, fail_part=1)
    done = wait(http, job["id"], 30)
    assert done["status"] == "failed", done
    assert done["error"].startswith("part 2 of 2 failed: ValueError: part 1 fails on purpose")
    assert done["parts"]["failed"] == 1 and done["parts"]["done"] == 0
    _assert_released(live, http, job["id"], [a])
    statuses = sorted(p["status"] for p in _parts(http, done))
    assert statuses == ["cancelled", "failed"]


def test_a_part_whose_child_is_killed_runs_again_on_its_own(
    http: httpx.Client, live: Stack
) -> None:
    arr = rng.random(10_001)
    a = upload(http, arr)["id"]
    job = _submit(http, "slow_double", {"a": a}, 2, seconds=2)
    parts = _wait_running(http, job, 1)
    victim = next(p for p in parts if p["status"] == "running")
    os.kill(victim["worker"]["pid"], signal.SIGKILL)
    done = wait(http, job["id"], 60)
    assert done["status"] == "succeeded", done
    assert np.array_equal(_value(http, done["result"]), arr * 2)
    attempts = {p["id"]: len(p["attempts"]) for p in _parts(http, done)}
    assert attempts[victim["id"]] == 2
    assert sorted(attempts.values()) == [1, 2]  # the other part ran once
    _assert_released(live, http, job["id"], [a])

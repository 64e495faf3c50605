"""Arrays through shared memory: upload, zero-copy jobs, results, lifetimes and refusals."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import stack
from tests.conftest import Stack
from tests.http_api import download, npy_bytes, streamed_upload, submit, upload, wait

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip


def run_job(http: httpx.Client, task: str, inputs: dict[str, str], **params: object) -> dict:
    done = wait(http, submit(http, task, inputs=inputs, **params), 60)
    assert done["status"] == "succeeded", done
    return done


def delete(http: httpx.Client, *array_ids: str) -> None:
    for array_id in array_ids:
        assert http.delete(f"/arrays/{array_id}").status_code in (202, 204)


def anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError("no Anonymous line")


def record_keys(live: Stack) -> set[str]:
    return set(live.redis.scan_iter(f"{live.key_prefix}:array:*"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_round_trip_is_bit_exact(http: httpx.Client, dtype: str, order: str) -> None:
    rng = np.random.default_rng(7)
    arr = np.asarray(rng.integers(0, 100, size=(3, 5, 4)) * 1.5, dtype=dtype, order=order)
    meta = upload(http, arr)
    assert meta["shape"] == [3, 5, 4] and meta["order"] == order
    back = download(http, meta["id"])
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes(order="A") == arr.tobytes(order="A")
    assert back.flags.f_contiguous == (order == "F")
    delete(http, meta["id"])


@pytest.mark.parametrize("arr", [np.float64(3.5).reshape(()), np.zeros((0, 4)), np.zeros(0, "u1")])
def test_zero_d_and_empty_arrays(http: httpx.Client, arr: np.ndarray) -> None:
    meta = upload(http, arr)
    back = download(http, meta["id"])
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)
    head = http.head(f"/arrays/{meta['id']}")
    assert head.status_code == 200 and head.headers["x-forklift-dtype"] == arr.dtype.str
    delete(http, meta["id"])


def test_raw_body_with_dtype_and_shape(http: httpx.Client) -> None:
    arr = np.arange(12, dtype="<i4").reshape(3, 4)
    response = http.post(
        "/arrays",
        content=arr.tobytes(),
        params={"dtype": "int32", "shape": "3,4"},
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    np.testing.assert_array_equal(download(http, response.json()["id"]), arr)
    delete(http, response.json()["id"])


def test_big_array_jobs_results_and_chaining(http: httpx.Client, live: Stack) -> None:
    rng = np.random.default_rng(1)
    big = rng.standard_normal(32 << 20)  # 256 MiB of float64
    square = rng.standard_normal((300, 300))
    big_meta = streamed_upload(http, big)
    sq_meta = upload(http, square)
    assert big_meta["nbytes"] == 256 << 20
    assert f"{live.shm_prefix}{big_meta['id']}" in stack.segments(live.shm_prefix)

    total = run_job(http, "sum", {"a": big_meta["id"]})["result"]
    assert np.isclose(total, big.sum())

    product = run_job(http, "matmul", {"a": sq_meta["id"], "b": sq_meta["id"]})
    ref = product["result"]["array"]
    assert ref["shape"] == [300, 300]
    got = download(http, ref["id"])
    # BLAS blocks sums differently with one thread (the worker) than with several (this
    # process), so matmul matches to rounding; a sort is bit-exact.
    assert np.allclose(got, square @ square, rtol=1e-12, atol=1e-12)
    ordered = run_job(http, "sort", {"a": sq_meta["id"]}, axis=0)["result"]["array"]
    assert download(http, ordered["id"]).tobytes() == np.sort(square, axis=0).tobytes()

    chained = run_job(http, "sum", {"a": ref["id"]}, axis=0)["result"]["array"]
    assert np.allclose(download(http, chained["id"]), (square @ square).sum(axis=0))
    delete(http, big_meta["id"], sq_meta["id"], ref["id"], chained["id"], ordered["id"])


def test_workers_read_inputs_without_copying(http: httpx.Client, live: Stack) -> None:
    arr = np.ones(32 << 20)  # 256 MiB
    meta = streamed_upload(http, arr)
    body = {
        "task": "inspect_input",
        "params": {"hold": 1.0},
        "inputs": {"a": {"array": meta["id"]}},
    }
    jobs = [http.post("/jobs", json=body).json()["id"] for _ in range(2)]
    results = [http.get(f"/jobs/{j}", params={"wait": 60}, timeout=90).json() for j in jobs]
    assert [r["status"] for r in results] == ["succeeded", "succeeded"]
    assert len({r["result"]["pid"] for r in results}) == 2, "both jobs ran in one child"
    started = [r["started_at"] for r in results]
    assert abs(started[0] - started[1]) < 0.9, "the two jobs did not overlap"
    for r in results:
        assert r["result"]["writeable"] is False
        assert r["result"]["sum"] == float(32 << 20)
        assert r["result"]["anon_growth_kib"] < 32 * 1024
    delete(http, meta["id"])


def test_api_streams_uploads_without_buffering(http: httpx.Client, live: Stack) -> None:
    baseline = anon_kib(live.api.pid)
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, anon_kib(live.api.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        meta = streamed_upload(http, np.zeros(64 << 20))  # 512 MiB
    finally:
        stop.set()
        sampler.join()
    assert meta["nbytes"] == 512 << 20
    assert (peak - baseline) < 64 * 1024, f"API grew by {(peak - baseline) // 1024} MiB"
    delete(http, meta["id"])


def test_recycled_child_leaves_inputs_in_place(live: Stack) -> None:
    """max_tasks_per_child=1: the child that read a segment exits; the segment survives."""
    env = dict(live.env, FORKLIFT_MAX_TASKS_PER_CHILD="1")
    worker = stack.start_worker(env, "recycling", 1)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            live.worker.stop(timeout=20)  # only the recycling worker consumes now
            arr = np.arange(1 << 20, dtype=np.float64)
            meta = upload(http, arr)
            segment = f"{live.shm_prefix}{meta['id']}"
            first = run_job(http, "inspect_input", {"a": meta["id"]})
            stack.wait_until(
                lambda: not stack.pid_alive(first["result"]["pid"]), 20, what="child recycled"
            )
            assert segment in stack.segments(live.shm_prefix)
            second = run_job(http, "inspect_input", {"a": meta["id"]})
            assert second["result"]["pid"] != first["result"]["pid"]
            assert second["result"]["sum"] == float(arr.sum())
            delete(http, meta["id"])
    finally:
        worker.stop()
        live.worker = stack.start_worker(live.env, "main", 2)
    assert "leaked shared_memory" not in worker.log()
    assert "resource_tracker" not in worker.log()


def test_delete_waits_for_jobs_using_the_array(http: httpx.Client, live: Stack) -> None:
    meta = upload(http, np.ones(1000))
    segment = f"{live.shm_prefix}{meta['id']}"
    body = {"task": "inspect_input", "params": {"hold": 2}, "inputs": {"a": {"array": meta["id"]}}}
    job_id = http.post("/jobs", json=body).json()["id"]
    stack.wait_until(
        lambda: http.get(f"/jobs/{job_id}").json()["status"] == "running", 20, what="running"
    )
    assert http.delete(f"/arrays/{meta['id']}").status_code == 202
    assert http.get(f"/arrays/{meta['id']}").status_code == 404
    assert segment in stack.segments(live.shm_prefix)
    done = http.get(f"/jobs/{job_id}", params={"wait": 30}).json()
    assert done["status"] == "succeeded" and done["result"]["sum"] == 1000.0
    stack.wait_until(lambda: segment not in stack.segments(live.shm_prefix), 5, what="freed")
    assert not live.redis.exists(f"{live.key_prefix}:array:{meta['id']}")


def test_arrays_expire_and_the_janitor_sweeps_orphans(http: httpx.Client, live: Stack) -> None:
    meta = upload(http, np.ones(10), ttl=1)
    assert meta["expires_at"] - meta["created_at"] == pytest.approx(1, abs=0.01)
    orphan = Path("/dev/shm") / f"{live.shm_prefix}{'ab' * 16}"
    orphan.write_bytes(b"x" * 100)
    segment = f"{live.shm_prefix}{meta['id']}"
    stack.wait_until(
        lambda: segment not in stack.segments(live.shm_prefix) and not orphan.exists(),
        15,
        interval=0.2,
        what="janitor",
    )
    assert http.get(f"/arrays/{meta['id']}").status_code == 404


def test_job_input_checks_use_metadata(http: httpx.Client) -> None:
    ints = upload(http, np.arange(6).reshape(2, 3))
    vec = upload(http, np.ones(4))
    cases = [
        ({"a": {"array": vec["id"]}, "b": {"array": vec["id"]}}, "matmul", 422),  # 1-D ok? no:
        ({"a": {"array": ints["id"]}, "b": {"array": vec["id"]}}, "matmul", 422),
        ({"a": {"array": "f" * 32}}, "sum", 422),
        ({"a": {"array": "../../etc"}}, "sum", 422),
        ({}, "sum", 422),
    ]
    for inputs, task, status in cases[1:]:
        response = http.post("/jobs", json={"task": task, "inputs": inputs})
        assert response.status_code == status, (inputs, response.text)
        assert response.json()["error"]["message"]
    delete(http, ints["id"], vec["id"])


def _post_raw(live: Stack, body: bytes, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        return http.post("/arrays", content=body, headers=headers)


GOOD = npy_bytes(np.arange(100, dtype=np.float64))


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


BAD_UPLOADS = {
    "truncated": (GOOD[:-8], {}, 400),
    "truncated-header": (GOOD[:20], {}, 400),
    "bad-magic": (b"NOTNUMPY" + GOOD[8:], {}, 400),
    "lying-header": (GOOD.replace(b"(100,)", b"(900,)"), {}, 400),
    "object-dtype": (_object_npy(), {}, 400),
    "too-long": (GOOD + b"\0" * 64, {}, 400),
    "wrong-type": (GOOD, {"content-type": "text/plain"}, 415),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_leave_nothing(live: Stack, case: str) -> None:
    body, headers, status = BAD_UPLOADS[case]
    before_segments, before_keys = stack.segments(live.shm_prefix), record_keys(live)
    response = _post_raw(live, body, {"content-type": "application/x-npy", **headers})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert stack.segments(live.shm_prefix) == before_segments
    assert record_keys(live) == before_keys


def test_raw_shape_must_match_the_bytes(http: httpx.Client, live: Stack) -> None:
    before = stack.segments(live.shm_prefix)
    response = http.post(
        "/arrays",
        content=b"\0" * 100,
        params={"dtype": "float64", "shape": "3,4"},
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 400
    assert "96" in response.json()["error"]["message"]
    assert stack.segments(live.shm_prefix) == before


def _raw_request_head(url: str, first: bytes, declared: int) -> tuple[int, bytes]:
    """Send headers and the start of a body, then read the answer without sending the rest."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /arrays HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-npy\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode() + first)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


def test_oversized_upload_refused_before_reading(live: Stack) -> None:
    env = dict(live.env, FORKLIFT_MAX_UPLOAD_BYTES="1000", FORKLIFT_SHM_LIMIT_BYTES="5000")
    api, url = stack.start_api(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            start = time.monotonic()
            status, body = _raw_request_head(url, GOOD[:128], declared=10**9)
            assert status == 413
            assert b"FORKLIFT_MAX_UPLOAD_BYTES" in body
            ok = [upload(http, np.ones(100)) for _ in range(6)]
            full = http.post(
                "/arrays",
                content=npy_bytes(np.ones(100)),
                headers={"content-type": "application/x-npy"},
            )
            assert full.status_code == 507
            assert full.json()["error"]["code"] == "shm_full"
            delete(http, *(m["id"] for m in ok))
            assert time.monotonic() - start < 30
    finally:
        api.stop()


def test_freed_segments_are_recycled_without_showing_old_bytes(live: Stack) -> None:
    env = dict(live.env, FORKLIFT_SHM_POOL_BYTES=str(64 << 20))
    api, url = stack.start_api(env)
    pool_prefix = f"{live.shm_prefix}pool_"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            first = upload(http, np.full(1 << 20, 7.0))  # 8 MiB
            delete(http, first["id"])
            pooled = stack.segments(pool_prefix)
            assert len(pooled) == 1, "the freed segment was not kept"
            assert f"{live.shm_prefix}{first['id']}" not in stack.segments(live.shm_prefix)

            second_data = np.arange(1 << 20, dtype=np.float64)
            second = upload(http, second_data)
            assert stack.segments(pool_prefix) == set(), "the upload did not reuse the pool"
            assert download(http, second["id"]).tobytes() == second_data.tobytes()

            smaller = np.arange(600_000, dtype=np.float64)  # 4.6 MiB: fits the 8 MiB one
            delete(http, second["id"])
            third = upload(http, smaller)
            assert stack.segments(pool_prefix) == set()
            assert download(http, third["id"]).tobytes() == smaller.tobytes()
            delete(http, third["id"])
            assert len(stack.segments(pool_prefix)) == 1
    finally:
        api.stop()
    assert stack.segments(pool_prefix) == set(), "a stopping API gives pooled memory back"

"""Arrays through shared memory: upload, zero-copy jobs, results, lifetimes and refusals."""

from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from shared.arrays import lifecycle
from shared.arrays.store import ArrayStore
from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.http_api import (
    digest,
    download,
    download_digest,
    npy_bytes,
    streamed_upload,
    submit,
    upload,
    wait,
)
from tests.redis_proxy import RedisProxy

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip


def run_job(http: httpx.Client, task: str, inputs: dict[str, str], **params: object) -> dict:
    done = wait(http, submit(http, task, inputs=inputs, **params), 60)
    assert done["status"] == "succeeded", done
    return done


def delete(http: httpx.Client, *array_ids: str) -> None:
    """Free arrays no job uses (any more): that is 204, never the 202 of a pinned one."""
    for array_id in array_ids:
        response = http.delete(f"/arrays/{array_id}")
        assert response.status_code == 204, (array_id, response.status_code, response.text)


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
    assert meta["dtype"] == arr.dtype.str and meta["nbytes"] == arr.nbytes
    described = http.get(f"/arrays/{meta['id']}/meta")
    assert described.status_code == 200, described.text
    assert described.json() == meta
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

    header, data_digest = download_digest(http, big_meta["id"])  # the sparse-segment path
    assert (header.dtype, header.shape) == (big.dtype, big.shape)
    assert data_digest == digest(big), "the 256 MiB upload did not come back bit for bit"
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
    first, second = results = [wait(http, j, 60) for j in jobs]
    assert [r["status"] for r in results] == ["succeeded", "succeeded"]
    assert len({r["result"]["pid"] for r in results}) == 2, "both jobs ran in one child"
    assert first["started_at"] < second["finished_at"], "the two jobs did not overlap"
    assert second["started_at"] < first["finished_at"], "the two jobs did not overlap"
    for r in results:
        assert r["result"]["writeable"] is False
        assert r["result"]["sum"] == float(32 << 20)
        assert r["result"]["anon_growth_kib"] < 32 * 1024
    assert download_digest(http, meta["id"])[1] == digest(arr), "the input changed"
    delete(http, meta["id"])


def test_api_streams_uploads_without_buffering(http: httpx.Client, live: Stack) -> None:
    """512 MiB through the API grow its private memory by less than 64 MiB and come back
    bit for bit (every 8-byte word differs, so a lost or misplaced chunk shows)."""
    arr = np.arange(64 << 20, dtype=np.float64)  # 512 MiB
    baseline = anon_kib(live.api.pid)
    peak = baseline
    samples = 0
    errors: list[str] = []  # collected here, checked after join(): a thread cannot fail a test
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not stop.is_set():
            try:
                peak = max(peak, anon_kib(live.api.pid))
            except (OSError, AssertionError) as exc:
                errors.append(repr(exc))
                return
            samples += 1
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        meta = streamed_upload(http, arr)
    finally:
        stop.set()
        sampler.join()
    assert not errors, f"the sampler failed: {errors}"
    assert samples > 10, f"only {samples} samples of the API's memory"
    assert meta["nbytes"] == 512 << 20
    assert (peak - baseline) < 64 * 1024, f"API grew by {(peak - baseline) // 1024} MiB"
    header, data_digest = download_digest(http, meta["id"])
    assert (header.dtype, header.shape) == (arr.dtype, arr.shape)
    assert data_digest == digest(arr), "the 512 MiB upload did not come back bit for bit"
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


class SlowScripts(RedisProxy):
    """A proxy from a worker to Redis on which every Lua script call waits a while.

    A chunk carrying `needle` (EVALSHA: the worker's record changes are Lua scripts) waits
    `delay` seconds first. If two changes a client must see as one (the job's end, its inputs'
    unpinning) are two scripts, the gap between them lasts seconds instead of a round trip,
    and a test sees every time what a client otherwise hits now and then; if they are one
    script, there is no gap to see. Nothing waits until `armed` is set.
    """

    def __init__(self, redis_url: str, needle: bytes, delay: float) -> None:
        self.needle, self.delay, self.held = needle, delay, 0
        self.armed = threading.Event()
        super().__init__(redis_url)

    def request(self, chunk: bytes, connection: dict[str, object]) -> None:
        tail = connection.get("tail", b"")
        assert isinstance(tail, bytes)
        if self.armed.is_set() and self.needle in tail + chunk:
            self.held += 1
            time.sleep(self.delay)
        connection["tail"] = chunk[-len(self.needle) :]


def test_inputs_are_unpinned_once_the_job_has_ended(redis_url: str) -> None:
    """After a client has seen its job end, deleting the job's input frees it (204).

    The worker's scripts are slowed down, so if the end and the unpinning were two scripts
    (as they once were: the DELETE in between answered 202), this fails every time.
    """
    env = stack.stack_env(redis_url)
    proxy = SlowScripts(redis_url, b"EVALSHA", delay=1.0)
    try:
        worker = stack.start_worker(dict(env, REDIS_URL=proxy.url()), "slowscripts", 1)
        proxy.armed.set()  # from here on (the worker's start is not slowed down)
        with stack.stopping(worker):
            api, url = stack.start_api(env)
            with stack.stopping(api), httpx.Client(base_url=url, timeout=30) as http:
                meta = upload(http, np.ones(10))
                done = wait(http, submit(http, "sum", inputs={"a": meta["id"]}))
                assert done["status"] == "succeeded" and done["result"] == 10.0
                deleted = http.delete(f"/arrays/{meta['id']}").status_code
                # 204 or 202, the array is freed: at once, or by the (held) release.
                segment = f"{env['FORKLIFT_SHM_PREFIX']}{meta['id']}"
                stack.wait_until(
                    lambda: segment not in stack.segments(env["FORKLIFT_SHM_PREFIX"]),
                    20,
                    what="input freed",
                )
                assert http.get(f"/arrays/{meta['id']}").status_code == 404
    finally:
        proxy.close()
        _drop_keys(redis_url, env)
    if deleted == 202 and proxy.held == 0:
        raise RuntimeError("202 although no script was held back: something else pins it")
    assert deleted == 204, f"DELETE of an ended job's input answered {deleted}"


def _drop_keys(redis_url: str, env: dict[str, str]) -> None:
    """A private stack on the session's Redis leaves no keys behind (its queues' either)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for pattern in (f"{env['FORKLIFT_KEY_PREFIX']}:*", f"*{env['FORKLIFT_QUEUE']}*"):
            for key in client.scan_iter(pattern):
                client.delete(key)
    finally:
        client.close()


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
        ({"a": {"array": ints["id"]}, "b": {"array": vec["id"]}}, "matmul", 422),  # (2,3)@(4,)
        ({"a": {"array": "f" * 32}}, "sum", 422),
        ({"a": {"array": "../../etc"}}, "sum", 422),
        ({}, "sum", 422),
    ]
    for inputs, task, status in cases:
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
            # 128 bytes of a declared 1 GB: an API waiting for the rest would time the socket out
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


# --- the write lifecycle in process (shared/arrays/lifecycle.py), on the session's Redis ------


@pytest.fixture
def own_domain(redis_url: str) -> Iterator[tuple[redis.Redis, Settings]]:
    """A sync Redis client and the settings of a domain of this test's own (own prefixes, a
    64 KiB cap, the pool off), checked empty afterwards: no key, no counted byte, no segment."""
    env = stack.stack_env(
        redis_url, FORKLIFT_SHM_LIMIT_BYTES=str(64 << 10), FORKLIFT_SHM_POOL_BYTES="0"
    )
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client, settings
        store = ArrayStore(client, settings)
        assert store.bytes_in_use() == 0
        assert not client.hgetall(store.ledger_key())
        assert not list(client.scan_iter(f"{settings.key_prefix}:array:*"))
        assert not stack.segments(settings.shm_prefix)
    finally:
        for key in client.scan_iter(f"{settings.key_prefix}:*"):
            client.delete(key)
        client.close()


def test_a_write_commits_a_ready_array_and_free_removes_it(
    own_domain: tuple[redis.Redis, Settings],
) -> None:
    client, settings = own_domain
    store = ArrayStore(client, settings)
    data = np.arange(1000, dtype=np.float64)
    with lifecycle.writing(
        store, uuid.uuid4().hex, data.shape, data.dtype.str, "C", data.nbytes, "k"
    ) as write:
        write.open().buffer[:] = data.tobytes()
        assert store.get(write.array_id).state == "uploading"
    record = write.record
    assert record is not None and record.state == "ready" and record.owner == "k"
    assert record.meta().shape == (1000,) and store.bytes_in_use() == data.nbytes
    assert Path(f"/dev/shm/{record.segment}").read_bytes() == data.tobytes()
    lifecycle.free(store, [record.id])
    assert store.get(record.id) is None


def test_a_failed_write_leaves_nothing(own_domain: tuple[redis.Redis, Settings]) -> None:
    client, settings = own_domain
    store = ArrayStore(client, settings)
    array_id = uuid.uuid4().hex
    with (
        pytest.raises(RuntimeError, match="the writer failed"),
        lifecycle.writing(store, array_id, (100,), "<f8", "C", 800, "") as write,
    ):
        write.open()
        assert stack.segments(settings.shm_prefix) == {write.name}
        raise RuntimeError("the writer failed")
    assert store.get(array_id) is None


def test_a_result_past_the_cap_fails_the_job_with_one_message(
    own_domain: tuple[redis.Redis, Settings],
) -> None:
    from worker.runner import JobFailure, store_ndarray
    from worker.runtime import Runtime

    _, settings = own_domain
    with pytest.raises(JobFailure) as failed:
        store_ndarray(np.ones(10_000), Runtime(settings=settings, pid=0), owner="")
    assert str(failed.value) == (
        "shared memory full: no room for 80000 more bytes (0 of the cap of 65536 in use;"
        " delete arrays or wait) (the job's result)"
    )

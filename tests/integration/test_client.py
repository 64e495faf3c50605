"""The Python client, the same-host registration, job events and the CLI, on the real stack.

The client tests take the `client` (or `make_client`) fixture and run twice: with the
generated `Client`, and with the hand-written `AsyncClient` behind tests/clients.py's facade.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from forklift import (
    ArrayHandle,
    ArrayInput,
    AsyncClient,
    AsyncJob,
    Client,
    Health,
    HealthDown,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobView,
    NotFound,
    Progress,
    ShmInfo,
    TaskInfo,
    Timeout,
    Unavailable,
    async_as_completed,
)
from forklift.same_host import discard_segment, local_domain
from shared.arrays import mappings
from shared.arrays.segments import create_segment, segment_path
from tests import stack
from tests.clients import KINDS, completed, on_http, open_client
from tests.conftest import Stack
from tests.http_api import digest, download_digest


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def array_key(live: Stack, array_id: str) -> str:
    return f"{live.key_prefix}:array:{array_id}"


@pytest.fixture(autouse=True)
def no_leftovers(live: Stack) -> Iterator[None]:
    """Every test frees what it made: arrays it uploaded, registered or got as results
    (freed segments the pool keeps are not arrays: the stack unlinks them when it stops)."""
    before = stack.array_segments(live.shm_prefix)
    yield
    stack.wait_arrays_freed(live.shm_prefix, before)


MakeClient = Callable[..., AbstractContextManager[Client]]


@pytest.fixture(params=KINDS)
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_client(client_kind: str) -> MakeClient:
    """`make_client(url, **options)`: a client of this test's kind, as a context manager."""

    def make(url: str | None, **options: Any) -> AbstractContextManager[Client]:
        return open_client(client_kind, url, **options)

    return make


@pytest.fixture
def client(live: Stack, make_client: MakeClient) -> Iterator[Client]:
    with make_client(live.url, free_on_close=True, timeout=30) as fl:
        yield fl


@contextlib.contextmanager
def janitor_held(live: Stack, domain: str) -> Iterator[None]:
    """Hold the stack's janitor lock (no janitor sweeps this shm domain while it is held).

    Each API takes the lock for `FORKLIFT_JANITOR_INTERVAL` seconds and tries again that long
    after its pass ended: it is free only for about a pass's length, hence the tight polling.
    """
    lock, token = f"{live.key_prefix}:janitor:{domain}", f"test-{uuid.uuid4().hex}"
    stack.wait_until(
        lambda: live.redis.set(lock, token, nx=True, ex=60),
        60,
        interval=0.001,
        what="the janitor lock",
    )
    try:
        yield
    finally:
        if live.redis.get(lock) == token:
            live.redis.delete(lock)


def api_bytes_read(live: Stack) -> int:
    """Bytes the API process has read from files and sockets (/proc/<pid>/io rchar)."""
    fields = dict(
        line.split(": ")
        for line in Path(f"/proc/{live.api.pid}/io").read_text().split("\n")
        if line
    )
    return int(fields["rchar"])


# -- jobs ---------------------------------------------------------------------------------


def test_matmul_result_equals_numpy(client: Client) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.random((30, 40)), rng.random((40, 20))
    job = client.submit("matmul", a=x, b=y)
    result = job.result(timeout=60)
    assert isinstance(result, np.ndarray) and result.shape == (30, 20)
    assert np.allclose(result, x @ y)
    assert job.status().status == "succeeded"
    # the result array is the client's to free (free_on_close); the inputs went with the job
    assert len(client.owned_arrays) == 1


def test_async_client_in_an_event_loop_that_stays_free(live: Stack) -> None:
    """What an async app does: `await fl.submit(...).result()` in one expression, jobs
    submitted side by side, callbacks on the loop; the loop runs on meanwhile."""
    rng = np.random.default_rng(2)
    x, y = rng.random((30, 40)), rng.random((40, 20))

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        async with AsyncClient(live.url, free_on_close=True) as fl:
            out["product"] = await fl.submit("matmul", a=x, b=y).result(timeout=60)
            before = ticks
            out["slept"] = await fl.submit("sleep", seconds=1.0).result(timeout=60)
            out["ticks"] = ticks - before
            out["numbers"] = await fl.map("fib", [{"n": n} for n in (5, 1, 20, 3)], timeout=60)

            jobs = [fl.submit("fib", n=n) for n in (20, 10, 15)]  # submitted side by side
            with pytest.raises(concurrent.futures.InvalidStateError):
                _ = jobs[0].id  # no id until the submission is through
            out["ended"] = {job.id async for job in async_as_completed(jobs, timeout=60)}
            out["ids"] = {job.id for job in jobs}
            out["values"] = [await job.result() for job in jobs]

            sleeper = await fl.submit("sleep", seconds=0.5)  # awaiting the job: submitted
            called = asyncio.Event()
            sleeper.add_done_callback(lambda job: called.set())
            out["events"] = [event async for event in sleeper.events(timeout=60)]
            await asyncio.wait_for(called.wait(), 30)

            with pytest.raises(InvalidRequest):
                await fl.submit("fib", n=1000)  # the submission's error, at the await
            refused = fl.submit("fib", n=1000)
            with pytest.raises(InvalidRequest):
                await refused.result()  # ... or at the first method awaited
        ticker.cancel()
        return out

    out = asyncio.run(main())
    assert np.allclose(out["product"], x @ y)
    assert out["slept"] == 1.0 and out["ticks"] > 20, "the loop was blocked while waiting"
    assert out["numbers"] == [5, 1, 6765, 2]
    assert out["ended"] == out["ids"] and out["values"] == [6765, 55, 610]
    events = out["events"]
    assert isinstance(events[-1], JobView) and events[-1].status == "succeeded"
    assert any(isinstance(event, Progress) for event in events)


def test_async_done_callback_outside_a_loop(live: Stack) -> None:
    """`AsyncJob.add_done_callback` off the loop: a job known to have ended calls back at
    once; one not yet ended needs the loop for its watcher task, so it raises."""

    async def jobs() -> tuple[AsyncJob, AsyncJob]:
        async with AsyncClient(live.url) as fl:
            ended = await fl.submit("fib", n=10)
            await ended.wait(timeout=60)
            return ended, await fl.submit("sleep", seconds=30)

    ended, sleeping = asyncio.run(jobs())
    called: list[AsyncJob] = []
    ended.add_done_callback(called.append)
    assert called == [ended], "an ended job calls back before add_done_callback returns"
    with pytest.raises(RuntimeError, match="needs a running event loop"):
        sleeping.add_done_callback(called.append)
    assert called == [ended]

    async def cancel(job_id: str) -> bool:
        async with AsyncClient(live.url) as fl:
            return await fl.job(job_id).cancel()

    assert asyncio.run(cancel(sleeping.id)) is True


def test_jobs_follow_the_future_protocol(client: Client) -> None:
    quick = client.submit("fib", n=20)
    assert quick.result(timeout=60) == 6765
    assert quick.done() is True and quick.running() is False and quick.cancelled() is False
    assert quick.exception() is None
    assert quick.cancel() is False, "a job that has ended cannot be cancelled"

    failed = client.submit("boom", message="no")
    error = failed.exception(timeout=60)
    assert isinstance(error, JobFailed) and str(error) == "ValueError: no"

    slow = client.submit("sleep", seconds=30)
    assert slow.done() is False
    seen: list[str] = []
    called = threading.Event()
    slow.add_done_callback(lambda job: (seen.append(job.id), called.set()))
    assert slow.cancel() is True
    assert slow.cancel() is True, "cancelled already: still True, as Future.cancel"
    assert called.wait(30) and seen == [slow.id]
    assert slow.cancelled() is True and slow.done() is True
    with pytest.raises(JobCancelled):
        slow.exception()
    with pytest.raises(concurrent.futures.CancelledError):  # JobCancelled is one
        slow.result()
    late: list[object] = []
    slow.add_done_callback(late.append)  # ended already: called at once
    assert len(late) == 1


def test_as_completed_yields_jobs_in_the_order_they_end(client: Client) -> None:
    jobs = [client.submit("sleep", seconds=s) for s in (1.2, 0.1, 0.6)]
    started = time.monotonic()
    ended = list(completed([*jobs, jobs[0]], timeout=60))  # a job given twice comes once
    assert len(ended) == 3 and {job.id for job in ended} == {job.id for job in jobs}
    finished = [job.view.finished_at for job in ended if job.view]
    assert finished == sorted(finished)
    assert time.monotonic() - started < 30

    stuck = client.submit("sleep", seconds=30)
    with pytest.raises(Timeout):
        list(completed([stuck], timeout=0.5))
    assert stuck.cancel() is True


def test_the_client_reads_forklift_url_and_api_key(
    live: Stack, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORKLIFT_URL", live.url)
    monkeypatch.setenv("FORKLIFT_API_KEY", "key-from-the-environment")
    with make_client(None) as fl:
        assert fl.url == live.url
        assert fl._http.headers["authorization"] == "Bearer key-from-the-environment"
        assert fl.submit("fib", n=10).result(timeout=60) == 55  # the stack is open
    monkeypatch.setenv("FORKLIFT_URL", "")  # empty means unset
    monkeypatch.delenv("FORKLIFT_API_KEY")
    with make_client(None) as fl, make_client("http://elsewhere:9/", api_key="k") as other:
        assert fl.url == "http://127.0.0.1:8000" and "authorization" not in fl._http.headers
        assert other.url == "http://elsewhere:9"
        assert other._http.headers["authorization"] == "Bearer k"


def test_map_returns_fifty_results_in_order(client: Client) -> None:
    ns = [min(n, 25) for n in range(1, 51)]
    results = client.map("fib", ({"n": n} for n in ns), timeout=120)
    assert results == [fib(n) for n in ns]


def test_map_uploads_a_shared_array_once(client: Client, live: Stack) -> None:
    data = np.arange(1000, dtype=np.int64)
    uploads: list[str] = []

    def count(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path in ("/arrays", "/arrays/register"):
            uploads.append(request.url.path)

    on_http(client, "request", count)
    results = client.map("sum", [{"a": data}] * 5 + [{"a": data, "axis": 0}], timeout=60)
    assert results == [int(data.sum())] * 6
    assert len(uploads) == 1


def test_typed_errors_carry_the_servers_message(client: Client) -> None:
    with pytest.raises(JobFailed) as failed:
        client.submit("boom", message="it broke").result(timeout=60)
    assert str(failed.value) == "ValueError: it broke"
    assert failed.value.view is not None and failed.value.view.status == "failed"

    with pytest.raises(InvalidRequest) as invalid:
        client.submit("fib", n=1000)
    assert invalid.value.status == 422 and "less than or equal to 45" in invalid.value.message

    with pytest.raises(NotFound):
        client.job(uuid.uuid4().hex).status()
    with pytest.raises(NotFound):
        client.get_array(uuid.uuid4().hex)

    job = client.submit("sleep", seconds=30)
    with pytest.raises(Timeout):
        job.result(timeout=0.5)
    assert job.cancel() is True
    with pytest.raises(JobCancelled):
        job.result(timeout=30)


def test_arrays_round_trip_over_http_in_any_layout(client: Client) -> None:
    rng = np.random.default_rng(3)
    base = rng.random((64, 48))
    cases = [
        base,
        np.asfortranarray(base),
        base[::3, 5:40:2],  # not contiguous: sent a block of rows at a time
        np.arange(7, dtype=np.uint8),
        np.array(2.5, dtype=np.float32),
        np.zeros((0, 4)),
        rng.random(100) > 0.5,
    ]
    for arr in cases:
        handle = client.put_array(arr, shared_memory=False)
        back = client.get_array(handle)
        assert back.dtype == arr.dtype and back.shape == arr.shape
        assert back.tobytes() == np.ascontiguousarray(arr).tobytes()
        assert client.delete_array(handle) is True
    with pytest.raises(InvalidRequest):
        client.put_array(np.array(["text"]))


def test_close_frees_uploads_and_array_results(live: Stack, make_client: MakeClient) -> None:
    x = np.arange(12.0).reshape(3, 4)
    with make_client(live.url, free_on_close=True) as fl:
        kept = fl.put_array(x, shared_memory=False)
        total = fl.submit("sum", a=kept, axis=0).result(timeout=60)
        made = fl.owned_arrays
        assert kept.id in made and len(made) == 2
        assert np.array_equal(total, x.sum(axis=0))
        assert all(live.redis.exists(array_key(live, ident)) for ident in made)
    stack.wait_until(
        lambda: not any(live.redis.exists(array_key(live, ident)) for ident in made),
        10,
        what="arrays deleted on close",
    )


# -- same host ----------------------------------------------------------------------------


@pytest.mark.slow
def test_512_mib_array_registered_through_shared_memory(
    live: Stack, make_client: MakeClient
) -> None:
    n = 512 * 2**20 // 8
    x = np.arange(n, dtype=np.float64)
    bodies: list[tuple[str, int]] = []

    def record(request: httpx.Request) -> None:
        size = int(request.headers.get("content-length", 0))
        bodies.append((f"{request.method} {request.url.path}", size))

    with make_client(live.url, free_on_close=True, timeout=60) as fl:
        on_http(fl, "request", record)
        before = api_bytes_read(live)
        handle = fl.put_array(x, shared_memory=True)
        read = api_bytes_read(live) - before
        assert handle.nbytes == x.nbytes and handle.shape == x.shape
        assert handle.segment == f"{live.shm_prefix}{handle.id}"
        assert segment_path(handle.segment).stat().st_size == x.nbytes
        # the array never went through the API: tiny request bodies, a few KiB read in all
        assert [path for path, _ in bodies] == [
            "GET /arrays/register/info",
            "POST /arrays/register",
            f"POST /arrays/register/{handle.id}/commit",
        ]
        assert max(size for _, size in bodies) < 1024
        assert read < 1 << 20, f"the API read {read} bytes"
        total = fl.submit("sum", a=handle).result(timeout=120)
        assert total == n * (n - 1) / 2
        with httpx.Client(base_url=live.url) as http:
            header, data_digest = download_digest(http, handle.id)
        assert (header.dtype, header.shape) == (x.dtype, x.shape)
        assert data_digest == digest(x), "the registered array did not come back bit for bit"
    del x


def test_same_host_put_recycles_a_pooled_segment(
    live: Stack, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pool on, a put gets a freed segment back (same inode, its mapping kept)."""
    env = dict(live.env, FORKLIFT_SHM_POOL_BYTES=str(64 << 20))
    api, url = stack.start_api(env)
    pool_prefix = f"{live.shm_prefix}pool_"
    try:
        with make_client(url, free_on_close=True) as fl, httpx.Client(base_url=url) as http:
            monkeypatch.delenv("FORKLIFT_SHM_DOMAIN", raising=False)  # derived, as the stack's
            info = fl.shm_info()
            assert info is not None and info.shm_domain == local_domain(), "not this host"
            x = np.arange(1 << 20, dtype=np.float64)  # 8 MiB: worth pooling
            first = fl.put_array(x, shared_memory=True)
            inode = segment_path(first.segment).stat().st_ino
            assert fl.delete_array(first) is True
            assert len(stack.segments(pool_prefix)) == 1, "the freed segment was not kept"

            # same size, new contents: the pooled segment comes back, through the kept mapping
            y = np.linspace(-3.0, 5.0, 1 << 20)
            hits, mapped = mappings.cache.hits, mappings.cache.mapped
            second = fl.put_array(y, shared_memory=True)
            assert stack.segments(pool_prefix) == set(), "the put did not reuse the pool"
            assert segment_path(second.segment).stat().st_ino == inode
            assert (mappings.cache.hits, mappings.cache.mapped) == (hits + 1, mapped)
            assert fl.get_array(second).tobytes() == y.tobytes()
            assert fl.submit("sum", a=second).result(timeout=60) == pytest.approx(y.sum())

            # smaller and in Fortran order: cut to exactly its size, every byte its own
            fl.delete_array(second)
            z = np.asfortranarray(np.arange(600_000, dtype=np.float64).reshape(600, 1000))
            third = fl.put_array(z, shared_memory=True)
            assert stack.segments(pool_prefix) == set()
            assert segment_path(third.segment).stat().st_ino == inode
            assert segment_path(third.segment).stat().st_size == z.nbytes
            back = fl.get_array(third)
            assert back.flags.f_contiguous and np.array_equal(back, z)
            assert fl.submit("sum", a=third).result(timeout=60) == pytest.approx(z.sum())
            fl.delete_array(third)

            # an abandoned recycled reservation gives the segment back and leaves nothing
            ident = uuid.uuid4().hex
            name = f"{live.shm_prefix}{ident}"
            reserved = http.post(
                "/arrays/register",
                json={
                    "segment": name,
                    "dtype": "float64",
                    "shape": [600_000],
                    "domain": local_domain(),
                    "recycle": True,
                },
            )
            assert reserved.status_code == 201, reserved.text
            assert reserved.json()["created"] is True
            assert segment_path(name).stat().st_size == 4_800_000
            assert stack.segments(pool_prefix) == set()
            assert http.delete(f"/arrays/register/{ident}").status_code == 204
            assert not segment_path(name).exists()
            assert len(stack.segments(pool_prefix)) == 1
            assert not live.redis.exists(array_key(live, ident))

            # a recycled segment the client cannot open: it registers again and creates one
            def refuse(name: str, size: int, *, writable: bool = False) -> object:
                raise PermissionError(13, "Permission denied", name)

            paths: list[str] = []
            on_http(
                fl, "request", lambda request: paths.append(f"{request.method} {request.url.path}")
            )
            with monkeypatch.context() as patch:
                patch.setattr(mappings, "attach", refuse)
                fourth = fl.put_array(x[:600_000], shared_memory=True)
            assert paths[0] == paths[2] == "POST /arrays/register"
            assert paths[1].startswith("DELETE /arrays/register/")
            assert paths[3] == f"POST /arrays/register/{fourth.id}/commit"
            assert len(paths) == 4
            assert len(stack.segments(pool_prefix)) == 1, "the refused one went back"
            assert segment_path(fourth.segment).stat().st_ino != inode
            assert np.array_equal(fl.get_array(fourth), x[:600_000])
    finally:
        api.stop()
    assert stack.segments(pool_prefix) == set(), "a stopping API gives pooled memory back"


def test_auto_mode_registers_big_arrays_and_uploads_small_ones(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FORKLIFT_SHM_DOMAIN", raising=False)  # derived, as the stack's
    info = client.shm_info()
    assert info is not None and info.shm_domain == local_domain(), "the stack runs elsewhere"
    paths: list[str] = []
    on_http(client, "request", lambda request: paths.append(f"{request.method} {request.url.path}"))
    big = np.linspace(0, 1, 2**18)  # 2 MiB
    small = np.arange(10.0)
    assert np.array_equal(client.get_array(client.put_array(big)), big)
    assert "POST /arrays" not in paths and "POST /arrays/register" in paths
    paths.clear()
    client.put_array(small)
    assert "POST /arrays" in paths and "POST /arrays/register" not in paths


def test_register_refuses_forged_names_and_leaves_nothing(live: Stack, http: httpx.Client) -> None:
    prefix = live.shm_prefix
    domain = http.get("/arrays/register/info").json()["shm_domain"]

    def reserve(segment: str, **overrides: object) -> httpx.Response:
        body = {"segment": segment, "dtype": "float64", "shape": [1000], "domain": domain}
        return http.post("/arrays/register", json={**body, **overrides})

    def nothing_for(array_id: str) -> bool:
        return not live.redis.exists(array_key(live, array_id)) and not live.redis.exists(
            f"{live.key_prefix}:register:{array_id}"
        )

    forged = {
        "no prefix": uuid.uuid4().hex,
        "another prefix": f"forklift_{uuid.uuid4().hex}",
        "a path": f"../{prefix}{uuid.uuid4().hex}",
        "not 32 hex": f"{prefix}{uuid.uuid4().hex[:20]}",
        "upper-case hex": f"{prefix}{uuid.uuid4().hex.upper()}",
    }
    for what, name in forged.items():
        response = reserve(name)
        assert response.status_code == 422, (what, response.text)
        assert response.json()["error"]["code"] == "bad_segment_name"
        assert nothing_for(name[-32:].lower())

    other = reserve(f"{prefix}{uuid.uuid4().hex}", domain="some-other-host")
    assert other.status_code == 409 and "not in this shm domain" in other.text
    bad_dtype = reserve(f"{prefix}{uuid.uuid4().hex}", dtype="object")
    assert bad_dtype.status_code == 422

    # someone else's registered segment: refused, and their array is untouched
    theirs = np.arange(1000.0)
    with Client(live.url) as them:
        handle = them.put_array(theirs, shared_memory=False)
        try:
            taken = reserve(handle.segment)
            assert taken.status_code == 409, taken.text
            assert taken.json()["error"]["code"] == "already_registered"
            assert np.array_equal(them.get_array(handle), theirs)
            commit = http.post(f"/arrays/register/{handle.id}/commit")
            assert commit.status_code == 404
            assert np.array_equal(them.get_array(handle), theirs)
        finally:
            them.delete_array(handle)

    # wrong size: reserved for 8000 bytes, the segment holds 4000; the API unlinks it
    ident = uuid.uuid4().hex
    name = f"{prefix}{ident}"
    assert reserve(name).status_code == 201
    try:
        create_segment(name, 4000).close()
        commit = http.post(f"/arrays/register/{ident}/commit")
        assert commit.status_code == 422, commit.text
        assert "needs exactly 8000" in commit.json()["error"]["message"]
        assert not segment_path(name).exists()
        assert nothing_for(ident)
    finally:
        discard_segment(name)

    # committed without creating the segment (another host would look like this)
    ident = uuid.uuid4().hex
    assert reserve(f"{prefix}{ident}").status_code == 201
    missing = http.post(f"/arrays/register/{ident}/commit")
    assert missing.status_code == 422 and "does not exist" in missing.text
    assert nothing_for(ident)

    # an existing segment with no record cannot be adopted (it may be anyone's); the test
    # holds the janitor's lock meanwhile, so no janitor unlinks the recordless segment first
    ident = uuid.uuid4().hex
    name = f"{prefix}{ident}"
    with janitor_held(live, domain):
        create_segment(name, 8000).close()
        try:
            squat = reserve(name)
            assert squat.status_code == 409, squat.text
            assert squat.json()["error"]["code"] == "segment_exists"
            assert segment_path(name).exists(), "the refusal removed a segment it does not own"
            assert nothing_for(ident)
        finally:
            discard_segment(name)

    # an abandoned reservation leaves nothing either
    ident = uuid.uuid4().hex
    assert reserve(f"{prefix}{ident}").status_code == 201
    assert http.delete(f"/arrays/register/{ident}").status_code == 204
    assert nothing_for(ident)


def test_client_refused_registration_unlinks_its_segment(
    live: Stack, http: httpx.Client, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(live.url, free_on_close=True) as fl:
        sent: list[tuple[str, str, str]] = []  # (method, path, segment existing at the time)

        def watch(request: httpx.Request) -> None:
            segment = ""
            if request.url.path == "/arrays/register":
                segment = json.loads(request.content)["segment"]
                assert not segment_path(segment).exists(), "created before it was reserved"
            sent.append((request.method, request.url.path, segment))

        on_http(fl, "request", watch)
        with monkeypatch.context() as patch:  # as if the client ran on another host
            patch.setenv("FORKLIFT_SHM_DOMAIN", "elsewhere")
            with pytest.raises(InvalidRequest, match="not in this shm domain"):
                fl.put_array(np.ones(10), shared_memory=True)
            segment = next(seg for _, path, seg in sent if path == "/arrays/register")
            ident = segment.removeprefix(live.shm_prefix)
            # refused before anything was written: no reservation, no marker, no segment
            assert not live.redis.exists(array_key(live, ident))
            assert not live.redis.exists(f"{live.key_prefix}:register:{ident}")
            assert not segment_path(segment).exists()
            # auto mode quietly uploads over HTTP when the domains differ
            sent.clear()
            handle = fl.put_array(np.ones(2**18))
            assert np.array_equal(fl.get_array(handle), np.ones(2**18))
            assert ("POST", "/arrays", "") in sent
            assert not [r for r in sent if r[1].startswith("/arrays/register")]

        # Reserved and filled, then the API cannot be reached for the commit nor for the
        # abandon: only the client itself can unlink the segment it made (the API still
        # holds the reservation, so neither the API nor its janitor touches the segment).
        def unreachable(request: httpx.Request) -> None:
            if request.url.path.endswith("/commit") or request.method == "DELETE":
                raise httpx.ConnectError("the API went away", request=request)

        reachable_again = on_http(fl, "request", unreachable)
        sent.clear()
        with pytest.raises(Unavailable, match="cannot reach"):
            fl.put_array(np.ones(1000), shared_memory=True)
        reachable_again()
        segment = next(seg for _, path, seg in sent if path == "/arrays/register")
        ident = segment.removeprefix(live.shm_prefix)
        assert [m for m, _, _ in sent] == ["POST", "POST", "DELETE"], sent
        assert live.redis.hget(array_key(live, ident), "state") == "uploading"
        assert not segment_path(segment).exists(), "the client left its segment behind"
        assert http.delete(f"/arrays/register/{ident}").status_code == 204
        assert not live.redis.exists(array_key(live, ident))


# -- events -------------------------------------------------------------------------------


def test_event_stream_delivers_increasing_progress_and_the_final_state(client: Client) -> None:
    job = client.submit("sleep", seconds=1.5)
    events = list(job.events(timeout=60))
    assert isinstance(events[0], JobView) and events[0].status in ("queued", "running")
    fractions = [e.fraction for e in events if isinstance(e, Progress)]
    assert len(fractions) >= 5
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0]
    last = events[-1]
    assert isinstance(last, JobView) and last.status == "succeeded"
    assert last.result == 1.5
    views = [e for e in events if isinstance(e, JobView)]
    assert [view.status for view in views].count("succeeded") == 1


def test_event_stream_over_raw_http(live: Stack, http: httpx.Client) -> None:
    assert http.get(f"/jobs/{uuid.uuid4().hex}/events").status_code == 404
    job_id = http.post("/jobs", json={"task": "fib", "params": {"n": 15}}).json()["id"]
    with http.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert events[0] == "status" and events[-1] == "status"
    assert data[-1]["status"] == "succeeded" and data[-1]["result"] == 610


# -- command line -------------------------------------------------------------------------


def run_cli(
    live: Stack, *args: str, cwd: Path | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORKLIFT_URL": live.url, **(extra_env or {})}
    env.pop("FORKLIFT_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "forklift", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or stack.REPO,
        timeout=120,
    )


def test_cli_put_submit_get_round_trip_is_bit_exact(live: Stack, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 50))
    source = tmp_path / "x.npy"
    np.save(source, x)

    put = run_cli(live, "put", str(source))
    assert put.returncode == 0, put.stderr
    array_id = put.stdout.strip()
    assert len(array_id) == 32

    back = tmp_path / "back.npy"
    got = run_cli(live, "get", array_id, "-o", str(back))
    assert got.returncode == 0, got.stderr
    assert np.load(back).tobytes() == x.tobytes()

    submitted = run_cli(live, "submit", "sort", f"a={array_id}", "axis=0", "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr
    view = json.loads(submitted.stdout)
    assert view["status"] == "succeeded" and view["params"]["axis"] == 0
    result_id = view["result"]["array"]["id"]
    out = tmp_path / "out.npy"
    got = run_cli(live, "get", result_id, "-o", str(out))
    assert got.returncode == 0, got.stderr
    sorted_back = np.load(out, allow_pickle=False)
    assert sorted_back.dtype == x.dtype
    assert sorted_back.tobytes() == np.sort(x, axis=0).tobytes()

    # a file uploaded for one job (k=@file) is freed by the server when the job ends
    total = run_cli(live, "submit", "sum", f"a=@{source}", "--wait")
    assert total.returncode == 0, total.stderr
    assert np.isclose(float(total.stdout), x.sum())

    for ident in (array_id, result_id):
        assert run_cli(live, "delete", ident).returncode == 0


def test_cli_failures_and_exit_codes(live: Stack, tmp_path: Path) -> None:
    failed = run_cli(live, "submit", "boom", "message=kaput", "--wait")
    assert failed.returncode == 1
    assert "ValueError: kaput" in failed.stderr

    done = run_cli(live, "submit", "fib", "n=10", "--wait")
    assert done.returncode == 0 and done.stdout.strip() == "55"
    job_id = run_cli(live, "submit", "fib", "n=12").stdout.strip()
    waited = run_cli(live, "wait", job_id, "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["result"] == 144
    status = run_cli(live, "status", job_id)
    assert status.returncode == 0 and "succeeded" in status.stdout

    bad_param = run_cli(live, "submit", "fib", "n=1000")
    assert bad_param.returncode == 2 and "less than or equal to 45" in bad_param.stderr
    assert run_cli(live, "submit", "fib", "oops").returncode == 2
    assert run_cli(live, "frobnicate").returncode == 2
    unknown = run_cli(live, "status", uuid.uuid4().hex)
    assert unknown.returncode == 3 and "no job with id" in unknown.stderr
    missing = tmp_path / "missing.npy"
    assert run_cli(live, "get", uuid.uuid4().hex, "-o", str(missing)).returncode == 3
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    nowhere = f"http://127.0.0.1:{stack.free_port()}"
    down = run_cli(live, "--url", nowhere, "--retry-for", "0.5", "status", job_id)
    assert down.returncode == 4 and "cannot reach" in down.stderr

    tasks = run_cli(live, "tasks", "--json")
    assert tasks.returncode == 0
    assert {"fib", "sleep", "boom"} <= {t["name"] for t in json.loads(tasks.stdout)}


def test_cli_cancel(live: Stack) -> None:
    job_id = run_cli(live, "submit", "sleep", "seconds=30").stdout.strip()
    cancelled = run_cli(live, "cancel", job_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    waited = run_cli(live, "wait", job_id)
    assert waited.returncode == 1 and "cancelled" in waited.stderr


def test_cli_shell_completion_asks_the_stack_for_task_names(live: Stack) -> None:
    # What bash's completion script runs for `forklift submit fi<TAB>`.
    env = {"_FORKLIFT_COMPLETE": "bash_complete", "COMP_WORDS": "forklift submit fi"}
    done = run_cli(live, extra_env={**env, "COMP_CWORD": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["plain,fib"]
    nowhere = f"http://127.0.0.1:{stack.free_port()}"  # no stack: no names, and no hang
    down = run_cli(live, extra_env={**env, "COMP_CWORD": "2", "FORKLIFT_URL": nowhere})
    assert down.returncode == 0 and down.stdout.split() == []


def test_views_are_the_schemas_models(client: Client, live: Stack) -> None:
    """Every view the client returns is a model of shared/schemas.py, never a dict."""
    health = client.health()
    assert isinstance(health, Health)
    assert (health.status, health.redis) == ("ok", True) and health.workers >= 1
    assert health.model_dump(mode="json") == httpx.get(f"{live.url}/healthz").json()
    info = client.shm_info()
    assert isinstance(info, ShmInfo) and info.shm_prefix == live.shm_prefix
    assert info.reservation_timeout > 0
    tasks = client.tasks()
    assert tasks and all(isinstance(task, TaskInfo) for task in tasks)
    assert client.task("fib") == next(task for task in tasks if task.name == "fib")
    job = client.submit("fib", n=5)
    assert isinstance(job.status(), JobView) and isinstance(job.wait(timeout=60), JobView)
    assert job.result() == 5


def test_health_of_an_api_without_redis_is_a_health_down(
    live: Stack, make_client: MakeClient
) -> None:
    """The 503 of /healthz is returned as a `HealthDown`, not raised: it says what is down."""
    env = dict(live.env, REDIS_URL=f"redis://127.0.0.1:{stack.free_port()}/0")  # nobody there
    api, url = stack.start_api(env)
    try:
        with make_client(url, retry_window=0.5) as fl:
            health = fl.health()
    finally:
        api.stop()
    assert isinstance(health, HealthDown), health
    assert (health.status, health.redis, health.workers) == ("unavailable", False, None)
    assert health.error.code == "unavailable"


def test_array_handle_reuse(client: Client) -> None:
    x = np.arange(20.0)
    handle = client.put_array(x, shared_memory=False)
    assert isinstance(handle, ArrayHandle) and str(handle) == handle.id
    assert handle.shape == (20,) and np.dtype(handle.dtype) == x.dtype and handle.nbytes == 160
    assert client.array_meta(handle.id) == handle
    first = client.submit("sum", a=handle).result(timeout=60)
    second = client.submit("max", a=ArrayInput(array=handle.id)).result(timeout=60)  # by id
    assert (first, second) == (190.0, 19.0)

"""Limits at the API's edge, against real uvicorn processes on the session's Redis.

Each API here has a queue of its own that no worker consumes, so submitted jobs stay queued
(event streams and long-polls stay open as long as a test wants) and nothing runs; whatever
a test creates is cancelled or deleted, and each API's fixture checks nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from api.arrays_io import ALLOCATE_AHEAD, ALLOCATION_BLOCK
from api.exposure import EXIT_REFUSED
from forklift import Client, InvalidRequest, JobView
from shared.arrays.npy import build_header
from shared.arrays.segments import create_segment, segment_path
from shared.arrays.store import ArrayStore
from shared.settings import Settings
from tests import stack
from tests.http_api import upload

ALICE, BOB = "key-alice-0123456789", "key-bob-9876543210"


@dataclass
class Api:
    env: dict[str, str]
    url: str
    proc: stack.Proc
    redis: redis.Redis

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def prefix(self) -> str:
        return self.env["FORKLIFT_KEY_PREFIX"]

    def job_records(self) -> list[str]:
        return list(self.redis.scan_iter(f"{self.prefix}:job:*"))

    def queued_messages(self) -> int:
        queue = self.env["FORKLIFT_QUEUE"]
        return sum(self.redis.llen(k) for k in self.redis.scan_iter(f"{queue}*"))


@contextlib.contextmanager
def running_api(redis_url: str, **extra: str) -> Iterator[Api]:
    """An API with a queue no worker consumes; stopped, and checked clean, at the end."""
    env = stack.stack_env(redis_url, FORKLIFT_QUEUE=f"lim{uuid.uuid4().hex[:8]}", **extra)
    proc, url = stack.start_api(env)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    api = Api(env=env, url=url, proc=proc, redis=client)
    try:
        yield api
    finally:
        proc.stop()
        left = stack.segments(env["FORKLIFT_SHM_PREFIX"])
        for name in left:
            (Path("/dev/shm") / name).unlink(missing_ok=True)
        for key in client.scan_iter(f"{api.prefix}:*"):
            client.delete(key)
        for key in client.scan_iter(f"{env['FORKLIFT_QUEUE']}*"):
            client.delete(key)
        client.close()
        assert not left, f"segments left behind: {sorted(left)}"
        assert "Traceback" not in proc.log(), proc.log()[-3000:]


@pytest.fixture(scope="module")
def open_api(redis_url: str) -> Iterator[Api]:
    """Open (no keys), default limits except a short body deadline: 3 s grace, 64 KiB/s."""
    with running_api(redis_url, FORKLIFT_BODY_TIMEOUT="3", FORKLIFT_BODY_MIN_RATE="65536") as api:
        yield api


@pytest.fixture(scope="module")
def keyed_api(redis_url: str) -> Iterator[Api]:
    """Two keys and small per-key limits."""
    with running_api(
        redis_url,
        FORKLIFT_API_KEYS=f"{ALICE},{BOB}",
        FORKLIFT_KEY_MAX_STREAMS="2",
        FORKLIFT_KEY_MAX_WAITS="2",
        FORKLIFT_KEY_MAX_UPLOADS="1",
        FORKLIFT_KEY_MAX_UPLOAD_BYTES=str(4 << 20),
        FORKLIFT_BODY_TIMEOUT="20",
    ) as api:
        yield api


def shm_counter(api: Api) -> int:
    domain = httpx.get(f"{api.url}/healthz").json()["shm_domain"]
    return int(api.redis.get(f"{api.prefix}:shm_bytes:{domain}") or 0)


def raw_request(api: Api, head: str, body: bytes = b"") -> socket.socket:
    """A request written by hand (to stall or trickle its body); the caller reads the answer."""
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=60)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, json.loads(rest[:length] or b"{}")


def upload_head(api: Api, nbytes_total: int, key: str | None = None) -> str:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST /arrays HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\n{auth}"
        f"Content-Type: application/x-npy\r\nContent-Length: {nbytes_total}\r\n"
    )


# --- (3) every body is capped before it is read -----------------------------------------------


@pytest.mark.parametrize("key", [None, ALICE], ids=["no-key", "with-key"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_register_body_is_capped_with_or_without_a_key(
    keyed_api: Api, key: str | None, chunked: bool
) -> None:
    big = json.dumps({"segment": "x" * (2 << 20)}).encode()  # 2 MiB: twice the JSON cap
    with keyed_api.client(key) as http:
        content = iter([big[i : i + 65536] for i in range(0, len(big), 65536)]) if chunked else big
        reply = http.post(
            "/arrays/register", content=content, headers={"content-type": "application/json"}
        )
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["code"] == "too_large"
    assert "FORKLIFT_MAX_JSON_BYTES" in error["message"]
    assert keyed_api.proc.popen.poll() is None


def test_register_body_is_capped_on_the_open_api(open_api: Api) -> None:
    with open_api.client() as http:
        reply = http.post("/arrays/register", content=b"[" + b"1," * (1 << 20) + b"1]")
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == "too_large"


# --- (12) a slow upload neither holds its reservation nor gets its size allocated ---------------


def test_a_trickling_upload_ends_with_408_and_allocates_little(open_api: Api) -> None:
    n = 1 << 27  # 1 GiB of float64, declared; a byte a second arrives
    header = build_header(np.dtype("<f8"), (n,), False)
    sock = raw_request(open_api, upload_head(open_api, len(header) + 8 * n), header + b"\0")
    prefix = open_api.env["FORKLIFT_SHM_PREFIX"]
    allocated: list[int] = []
    try:
        segment = stack.wait_until(lambda: stack.segments(prefix), 10, what="the segment")
        path = Path("/dev/shm") / next(iter(segment))
        sock.settimeout(1.0)
        status = None
        for _ in range(60):  # the answer comes after the grace (3 s) at 64 KiB/s
            with contextlib.suppress(FileNotFoundError):
                allocated.append(path.stat().st_blocks * 512)
            try:
                sock.sendall(b"\0")
                peek = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError:
                break
            if peek:
                break
        sock.settimeout(30)
        status, _, body = read_response(sock)
    finally:
        sock.close()
    assert status == 408, body
    assert body["error"]["code"] == "body_timeout"
    assert "FORKLIFT_BODY_MIN_RATE" in body["error"]["message"]
    assert allocated, "the segment was never seen"
    # The page allocator stays near what arrived instead of allocating the declared 1 GiB.
    assert max(allocated) <= ALLOCATE_AHEAD + ALLOCATION_BLOCK, max(allocated)
    stack.wait_until(lambda: not stack.segments(prefix), 10, what="the segment to go")
    assert shm_counter(open_api) == 0


# --- (5) output sizes bounded before a job allocates them -------------------------------------


def test_default_child_memory_limit_is_derived_from_the_machine() -> None:
    settings = Settings.from_env({})
    assert settings.child_memory_limit_bytes > 0
    four = Settings.from_env({"FORKLIFT_WORKER_CONCURRENCY": "4"})
    two = Settings.from_env({"FORKLIFT_WORKER_CONCURRENCY": "2"})
    assert four.child_memory_limit_bytes < two.child_memory_limit_bytes
    assert (
        Settings.from_env({"FORKLIFT_CHILD_MEMORY_LIMIT_BYTES": "0"}).child_memory_limit_bytes == 0
    )


def test_tiny_inputs_with_huge_outputs_are_refused_at_submit(open_api: Api) -> None:
    limit = Settings.from_env(open_api.env).child_memory_limit_bytes
    with open_api.client() as http:
        column = upload(http, np.ones((100_000, 1)))["id"]  # 800 kB each
        row = upload(http, np.ones((1, 100_000)))["id"]
        small = upload(http, np.ones((4, 64)))["id"]
        cases = {
            "outer product": {"task": "matmul", "inputs": {"a": column, "b": row}},
            "full svd": {"task": "svd", "inputs": {"a": column}, "params": {"full_matrices": True}},
            "padded fft": {"task": "fft", "inputs": {"a": small}, "params": {"n": 1 << 28}},
            "10,000 percentiles": {
                "task": "percentile",
                "inputs": {"a": row},
                "params": {"q": [i / 100 for i in range(10_000)], "axis": 0},
            },
        }
        before = open_api.queued_messages()
        for what, case in cases.items():
            body = {
                "task": case["task"],
                "params": case.get("params", {}),
                "inputs": {name: {"array": aid} for name, aid in case["inputs"].items()},
            }
            reply = http.post("/jobs", json=body)
            assert reply.status_code == 422, (what, reply.text)
            error = reply.json()["error"]
            assert error["code"] == "job_too_large", (what, error)
            assert "FORKLIFT_CHILD_MEMORY_LIMIT_BYTES" in error["message"], error
            assert str(limit) in error["message"], error
            assert error["detail"]["limit_bytes"] == limit
            assert error["detail"]["estimate_bytes"] > limit
        assert open_api.queued_messages() == before
        assert open_api.job_records() == []
        # The same jobs on sensible shapes are accepted (and cancelled: nothing runs here).
        ok = http.post(
            "/jobs",
            json={"task": "matmul", "inputs": {"a": {"array": row}, "b": {"array": column}}},
        )
        assert ok.status_code == 202, ok.text
        assert http.delete(f"/jobs/{ok.json()['id']}").status_code == 200
        for array_id in (column, row, small):
            assert http.delete(f"/arrays/{array_id}").status_code in (202, 204)


# --- per-key limits -------------------------------------------------------------------------


def _queued_job(http: httpx.Client) -> str:
    reply = http.post("/jobs", json={"task": "sleep", "params": {"seconds": 1}})
    assert reply.status_code == 202, reply.text
    return reply.json()["id"]


def _assert_429(reply: httpx.Response, setting: str) -> None:
    assert reply.status_code == 429, reply.text
    assert int(reply.headers["retry-after"]) > 0
    error = reply.json()["error"]
    assert error["code"] == "too_many"
    assert error["detail"]["setting"] == setting
    assert setting in error["message"]


def test_event_streams_per_key(keyed_api: Api) -> None:
    with keyed_api.client(ALICE) as alice, keyed_api.client(BOB) as bob:
        jobs = [_queued_job(alice) for _ in range(3)]
        bob_job = _queued_job(bob)
        readers = []  # kept: a dropped line iterator closes its stream
        with contextlib.ExitStack() as open_streams:
            for job_id in jobs[:2]:
                stream = open_streams.enter_context(alice.stream("GET", f"/jobs/{job_id}/events"))
                assert stream.status_code == 200
                readers.append(stream.iter_lines())
                assert any(line.startswith("event: status") for line in readers[-1])
            _assert_429(alice.get(f"/jobs/{jobs[2]}/events"), "FORKLIFT_KEY_MAX_STREAMS")
            with bob.stream("GET", f"/jobs/{bob_job}/events") as other:
                assert other.status_code == 200  # another key's streams are its own
        # Both closed: the key may open streams again once the API has noticed.

        def opens() -> bool:
            with alice.stream("GET", f"/jobs/{jobs[2]}/events") as again:
                return again.status_code == 200

        stack.wait_until(opens, 15, interval=0.2, what="a stream slot to free")
        for job_id in jobs:
            assert alice.delete(f"/jobs/{job_id}").status_code == 200
        assert bob.delete(f"/jobs/{bob_job}").status_code == 200


def test_long_polls_per_key(keyed_api: Api) -> None:
    with keyed_api.client(ALICE) as alice, keyed_api.client(BOB) as bob:
        job_id = _queued_job(alice)
        answers: list[int] = []

        def long_poll() -> None:
            with keyed_api.client(ALICE) as own:
                while True:  # until admitted: the probe below holds a slot for a moment too
                    status = own.get(f"/jobs/{job_id}", params={"wait": 30}).status_code
                    if status != 429:
                        answers.append(status)
                        return
                    time.sleep(0.05)

        threads = [threading.Thread(target=long_poll) for _ in range(2)]
        for t in threads:
            t.start()

        def third_refused() -> bool:
            reply = alice.post("/jobs/wait", json={"ids": [job_id], "wait": 0.05})
            return reply.status_code == 429 and reply

        reply = stack.wait_until(third_refused, 15, interval=0.1, what="both polls waiting")
        _assert_429(reply, "FORKLIFT_KEY_MAX_WAITS")
        assert alice.get(f"/jobs/{job_id}").status_code == 200  # no wait: not counted
        bob_job = _queued_job(bob)
        assert bob.get(f"/jobs/{bob_job}", params={"wait": 0.2}).status_code == 200
        # Cancelling the job ends both long-polls at once.
        assert alice.delete(f"/jobs/{job_id}").status_code == 200
        for t in threads:
            t.join(40)
        assert answers == [200, 200]
        assert bob.delete(f"/jobs/{bob_job}").status_code == 200


def test_uploads_and_their_bytes_per_key(keyed_api: Api) -> None:
    arr = np.arange(1000, dtype=np.float64)
    header = build_header(arr.dtype, arr.shape, False)
    held = raw_request(
        keyed_api, upload_head(keyed_api, len(header) + arr.nbytes, ALICE), header + b"\0" * 8
    )
    try:
        with keyed_api.client(ALICE) as alice, keyed_api.client(BOB) as bob:

            def refused() -> httpx.Response | bool:
                reply = alice.post(
                    "/arrays", content=b"x", headers={"content-type": "application/x-npy"}
                )
                return reply.status_code == 429 and reply

            _assert_429(
                stack.wait_until(refused, 10, what="the held upload"), "FORKLIFT_KEY_MAX_UPLOADS"
            )
            bob_array = upload(bob, arr)["id"]  # another key uploads meanwhile
            assert bob.delete(f"/arrays/{bob_array}").status_code == 204
    finally:
        held.close()
    with keyed_api.client(ALICE) as alice:
        # Once the held upload is gone, an upload over the key's byte limit is told why.
        big = np.zeros(1 << 20)  # 8 MiB > 4 MiB

        def too_big() -> httpx.Response | bool:
            reply = alice.post(
                "/arrays",
                content=build_header(big.dtype, big.shape, False) + big.tobytes(),
                headers={"content-type": "application/x-npy"},
            )
            return reply.status_code != 429 and reply

        reply = stack.wait_until(too_big, 15, interval=0.2, what="the upload slot")
        assert reply.status_code == 413, reply.text
        assert "FORKLIFT_KEY_MAX_UPLOAD_BYTES" in reply.json()["error"]["message"]
    stack.wait_until(lambda: shm_counter(keyed_api) == 0, 10, what="the reservations to go")


def _register(http: httpx.Client, nbytes: int) -> tuple[str, httpx.Response]:
    """`POST /arrays/register` of a float64 vector of `nbytes` bytes under a fresh name."""
    info = http.get("/arrays/register/info").json()
    name = f"{info['shm_prefix']}{uuid.uuid4().hex}"
    body = {"segment": name, "dtype": "float64", "shape": [nbytes // 8]}
    return name, http.post("/arrays/register", json={**body, "domain": info["shm_domain"]})


def _registered_bytes(api: Api) -> dict[str, dict[str, str]]:
    """The per-key ledger of open registrations (sizes by key; empty when none is open)."""
    pattern = f"{api.prefix}:registered_bytes:*"
    return {key: api.redis.hgetall(key) for key in api.redis.scan_iter(pattern)}


def test_open_registrations_count_against_the_key_byte_limit(keyed_api: Api) -> None:
    """Reservations of `POST /arrays/register` outlive their request, and hold the key's
    FORKLIFT_KEY_MAX_UPLOAD_BYTES (4 MiB here) until committed, abandoned or expired, in
    every API process of the stack: a second API on the same Redis refuses the same key."""
    half = 2 << 20
    second, second_url = stack.start_api(keyed_api.env)
    with (
        stack.stopping(second),
        keyed_api.client(ALICE) as alice,
        keyed_api.client(BOB) as bob,
        httpx.Client(base_url=second_url, headers=alice.headers, timeout=30) as alice_too,
    ):
        too_big = _register(alice, 2 * half + 8)[1]  # can never fit: 413, nothing claimed
        assert too_big.status_code == 413, too_big.text
        assert "FORKLIFT_KEY_MAX_UPLOAD_BYTES" in too_big.json()["error"]["message"]
        reserved = [_register(alice, half) for _ in range(2)]  # exactly the limit
        assert [r.status_code for _, r in reserved] == [201, 201], [r.text for _, r in reserved]
        for client in (alice, alice_too):  # this API and the other one
            _assert_429(_register(client, 8)[1], "FORKLIFT_KEY_MAX_UPLOAD_BYTES")
        held = _register(alice, 8)[1].json()["error"]["detail"]
        assert held["held"] == 2 * half and held["limit"] == 2 * half
        bob_name, bob_reply = _register(bob, half)  # another key's budget is its own
        assert bob_reply.status_code == 201, bob_reply.text
        assert bob.delete(f"/arrays/register/{bob_reply.json()['id']}").status_code == 204
        # Abandoning one frees its bytes at once, for both APIs.
        first = reserved[0][1].json()["id"]
        assert alice.delete(f"/arrays/register/{first}").status_code == 204
        name, again = _register(alice_too, half)
        assert again.status_code == 201, again.text
        _assert_429(_register(alice, 8)[1], "FORKLIFT_KEY_MAX_UPLOAD_BYTES")
        # Committing one frees its bytes too (the array then counts as an array, not here).
        data = np.arange(half // 8, dtype=np.float64)
        segment = create_segment(name, data.nbytes)
        try:
            segment.buffer[:] = data.tobytes()
        finally:
            segment.close()
        ident = again.json()["id"]
        committed = alice.post(f"/arrays/register/{ident}/commit")
        assert committed.status_code == 201, committed.text
        last_name, last = _register(alice, half)
        assert last.status_code == 201, last.text
        # A commit refused (no segment) drops the reservation and its bytes as well.
        refused = alice.post(f"/arrays/register/{last.json()['id']}/commit")
        assert refused.status_code == 422, refused.text
        ledger = _registered_bytes(keyed_api)
        assert [sizes["total"] for sizes in ledger.values()] == [str(half)], ledger
        assert alice.delete(f"/arrays/register/{reserved[1][1].json()['id']}").status_code == 204
        assert alice.delete(f"/arrays/{ident}").status_code == 204
    assert _registered_bytes(keyed_api) == {}
    assert not list(keyed_api.redis.scan_iter(f"{keyed_api.prefix}:registered_*"))
    assert not list(keyed_api.redis.scan_iter(f"{keyed_api.prefix}:register:*"))
    for segment_name in (bob_name, name, last_name, *(n for n, _ in reserved)):
        assert not segment_path(segment_name).exists(), segment_name
        assert not keyed_api.redis.exists(f"{keyed_api.prefix}:array:{segment_name[-32:]}")
    domain = httpx.get(f"{keyed_api.url}/healthz").json()["shm_domain"]
    assert keyed_api.redis.hlen(f"{keyed_api.prefix}:shm_ledger:{domain}") == 0
    assert shm_counter(keyed_api) == 0


def test_an_expired_registration_stops_counting(keyed_api: Api) -> None:
    """A reservation left to time out (its marker and record expire in Redis, its deadline
    in the key's ledger passes) no longer holds the key's bytes: the next reserve prunes it.
    The hour is shortened by moving the expiries, in Redis, to now."""
    with keyed_api.client(ALICE) as alice:
        reserved = [_register(alice, 2 << 20)[1] for _ in range(2)]
        assert [r.status_code for r in reserved] == [201, 201]
        _assert_429(_register(alice, 8)[1], "FORKLIFT_KEY_MAX_UPLOAD_BYTES")
        gone = reserved[0].json()["id"]
        (deadlines,) = keyed_api.redis.scan_iter(f"{keyed_api.prefix}:registered_deadlines:*")
        assert keyed_api.redis.zadd(deadlines, {gone: 1}, xx=True, ch=True) == 1
        for key in (f"{keyed_api.prefix}:register:{gone}", f"{keyed_api.prefix}:array:{gone}"):
            assert keyed_api.redis.delete(key) == 1  # what their TTL does after the hour
        again = _register(alice, 2 << 20)[1]
        assert again.status_code == 201, again.text
        (sizes,) = keyed_api.redis.scan_iter(f"{keyed_api.prefix}:registered_bytes:*")
        assert gone not in keyed_api.redis.hgetall(sizes)
        for reply in (reserved[1], again):
            assert alice.delete(f"/arrays/register/{reply.json()['id']}").status_code == 204
    assert _registered_bytes(keyed_api) == {}
    settings = Settings.from_env(keyed_api.env)
    ArrayStore(keyed_api.redis, settings).recount([])  # as the janitor's pass does
    assert shm_counter(keyed_api) == 0


def test_the_client_waits_out_a_per_key_limit(redis_url: str) -> None:
    """A 429 with Retry-After is retried like a 503 within the client's retry window: a key
    at FORKLIFT_KEY_MAX_WAITS gets through once its other long-poll ends; a client whose
    window is shorter than the wait gets the 429 itself."""
    with running_api(redis_url, FORKLIFT_KEY_MAX_WAITS="1") as api, api.client() as http:
        held_job, job = _queued_job(http), _queued_job(http)
        assert http.delete(f"/jobs/{job}").status_code == 200  # final: a wait answers at once
        answers: list[int] = []

        def hold() -> None:
            with api.client() as own:
                while True:  # until admitted: the probe below holds the slot for a moment too
                    status = own.get(f"/jobs/{held_job}", params={"wait": 60}).status_code
                    if status != 429:
                        answers.append(status)
                        return
                    time.sleep(0.05)

        holder = threading.Thread(target=hold)
        holder.start()

        def slot_held() -> bool:
            reply = http.post("/jobs/wait", json={"ids": [held_job], "wait": 0.05})
            return reply.status_code == 429

        stack.wait_until(slot_held, 15, interval=0.1, what="the long-poll holding the slot")
        seen: list[int] = []

        def record(response: httpx.Response) -> None:
            seen.append(response.status_code)

        with Client(api.url, retry_window=1) as impatient:
            impatient._http.event_hooks["response"].append(record)
            with pytest.raises(InvalidRequest) as refused:
                impatient.job(job).wait(timeout=60)
        assert (refused.value.status, refused.value.code) == (429, "too_many")
        assert "FORKLIFT_KEY_MAX_WAITS" in refused.value.message
        assert seen == [429, 429]  # tried again after Retry-After, then out of patience
        seen.clear()
        views: list[JobView] = []
        with Client(api.url) as patient:
            patient._http.event_hooks["response"].append(record)
            waiter = threading.Thread(target=lambda: views.append(patient.job(job).wait(60)))
            waiter.start()
            stack.wait_until(lambda: 429 in seen, 15, interval=0.05, what="a refusal")
            assert http.delete(f"/jobs/{held_job}").status_code == 200  # ends the held poll
            waiter.join(60)
        holder.join(60)
        assert [view.status for view in views] == ["cancelled"]
        assert seen[0] == 429 and seen[-1] == 200, seen
        assert answers == [200]


# --- (13) /cluster takes a key when keys are set; (17) OpenAPI follows the configuration ------


def test_cluster_needs_a_key_when_keys_are_set(keyed_api: Api) -> None:
    with keyed_api.client() as anonymous, keyed_api.client(BOB) as bob:
        assert anonymous.get("/cluster").status_code == 401
        reply = bob.get("/cluster")
    assert reply.status_code == 200, reply.text
    assert reply.json()["domains"]


def _operations(schema: dict) -> list[tuple[str, str, dict]]:
    return [
        (method, path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "delete", "head", "put", "patch")
    ]


def test_openapi_security_matches_the_configuration(open_api: Api, keyed_api: Api) -> None:
    open_schema = httpx.get(f"{open_api.url}/openapi.json").json()
    assert "securitySchemes" not in open_schema.get("components", {})
    for method, path, op in _operations(open_schema):
        assert "security" not in op, (method, path)
        assert "401" not in op["responses"], (method, path)
    keyed_schema = httpx.get(f"{keyed_api.url}/openapi.json").json()
    assert "HTTPBearer" in keyed_schema["components"]["securitySchemes"]
    secured = {(m, p) for m, p, op in _operations(keyed_schema) if op.get("security")}
    assert ("post", "/jobs") in secured and ("get", "/cluster") in secured
    assert ("get", "/healthz") not in secured
    for method, path, op in _operations(keyed_schema):
        if (method, path) in secured:
            assert "401" in op["responses"], (method, path)
    assert "429" in keyed_schema["paths"]["/jobs/{job_id}/events"]["get"]["responses"]


# --- (15) shutdown with an event stream open -------------------------------------------------


def test_api_exits_on_sigterm_with_an_event_stream_open(redis_url: str) -> None:
    env = stack.stack_env(redis_url, FORKLIFT_QUEUE=f"lim{uuid.uuid4().hex[:8]}")
    proc, url = stack.start_api(env)  # plain `uvicorn api.main:app`: no graceful timeout flag
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            job_id = _queued_job(http)
            events: list[str] = []
            ended = threading.Event()

            def listen() -> None:
                with (
                    contextlib.suppress(httpx.HTTPError),
                    http.stream("GET", f"/jobs/{job_id}/events") as stream,
                ):
                    for line in stream.iter_lines():
                        events.append(line)
                ended.set()

            listener = threading.Thread(target=listen)
            listener.start()
            stack.wait_until(lambda: "event: status" in events, 10, what="the first event")
            proc.popen.send_signal(signal.SIGTERM)
            code = proc.popen.wait(timeout=15)  # generous: it exits promptly, or this fails
            listener.join(15)
        assert ended.is_set()
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
        assert code == -signal.SIGTERM, (code, proc.log()[-2000:])
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
        assert "Waiting for connections to close" not in proc.log() or "Finished server" in (
            proc.log()
        )
    finally:
        proc.stop()
        for key in client.scan_iter(f"{env['FORKLIFT_KEY_PREFIX']}:*"):
            client.delete(key)
        for key in client.scan_iter(f"{env['FORKLIFT_QUEUE']}*"):
            client.delete(key)
        client.close()


# --- (4) an open API does not serve the network ---------------------------------------------


def _uvicorn(env: dict[str, str], host: str, port: int) -> stack.Proc:
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port",
            str(port), "--log-level", "info"]  # fmt: skip
    return stack.spawn(f"api-bind-{port}", argv, env)


@pytest.mark.parametrize(
    "extra",
    [{}, {"FORKLIFT_PUBLISHED_ADDRESS": "0.0.0.0"}],
    ids=["bare", "published-beyond-loopback"],
)
def test_open_api_bound_to_every_interface_refuses_to_start(
    redis_url: str, extra: dict[str, str]
) -> None:
    env = stack.stack_env(redis_url, **extra)
    proc = _uvicorn(env, "0.0.0.0", stack.free_port())
    try:
        code = proc.popen.wait(timeout=60)
    finally:
        proc.stop()
    assert code == EXIT_REFUSED, proc.log()[-2000:]
    log = proc.log()
    assert "refusing to serve an open API on 0.0.0.0:" in log
    assert "FORKLIFT_API_KEYS" in log and "FORKLIFT_ALLOW_OPEN" in log


@pytest.mark.parametrize(
    "extra",
    [
        {"FORKLIFT_ALLOW_OPEN": "true"},
        {"FORKLIFT_API_KEYS": ALICE},
        {"FORKLIFT_PUBLISHED_ADDRESS": "127.0.0.1"},  # a container published on loopback
    ],
    ids=["allowed-open", "with-keys", "published-on-loopback"],
)
def test_network_bind_starts_when_allowed_or_keyed(redis_url: str, extra: dict[str, str]) -> None:
    env = stack.stack_env(redis_url, **extra)
    port = stack.free_port()
    proc = _uvicorn(env, "0.0.0.0", port)
    try:

        def up() -> bool:
            assert proc.popen.poll() is None, proc.log()[-2000:]
            try:  # loopback only: test traffic never leaves this machine
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        stack.wait_until(up, 30, interval=0.1, what="the API")
        # The bind check has run by now (it does right after startup): still serving.
        stack.wait_until(lambda: "Application startup complete" in proc.log(), 10, what="log")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert proc.popen.poll() is None
    finally:
        proc.stop()
    assert "refusing" not in proc.log()


def test_launcher_refuses_an_open_network_bind_before_starting_anything(redis_url: str) -> None:
    env = stack.stack_env(redis_url)
    done = subprocess.run(
        [sys.executable, "-m", "forklift", "up", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=stack.REPO,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "FORKLIFT_API_KEYS" in done.stdout + done.stderr
    assert "worker pool" not in done.stdout + done.stderr


# --- (13) /metrics and /cluster read kept counters: a scrape costs the same for 5 or 400 arrays


def _commands(client: redis.Redis) -> int:
    """Commands Redis has run so far (those run inside Lua scripts included)."""
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def _cost(client: redis.Redis, http: httpx.Client, path: str) -> int:
    """Fewest commands one GET of `path` took over three tries (background work only adds)."""
    costs = []
    for _ in range(3):
        before = _commands(client)
        assert http.get(path).status_code == 200
        costs.append(_commands(client) - before - 1)  # less the INFO itself
    return min(costs)


def test_metrics_and_cluster_cost_does_not_grow_with_arrays() -> None:
    redis_proc, url = stack.start_redis()  # private: only this API talks to it
    try:
        with running_api(url, FORKLIFT_JANITOR_INTERVAL="3600") as api, api.client() as http:
            ids = [upload(http, np.arange(4.0))["id"] for _ in range(5)]
            small = {p: _cost(api.redis, http, p) for p in ("/metrics", "/cluster")}
            ids += [upload(http, np.arange(4.0))["id"] for _ in range(400)]
            body = http.get("/cluster").json()
            here = next(d for d in body["domains"] if d["domain"] == body["domain"])
            assert here["arrays"] == len(ids) and here["segments"] == len(ids)
            assert here["bytes"] == 32 * len(ids)
            big = {p: _cost(api.redis, http, p) for p in ("/metrics", "/cluster")}
            for array_id in ids:
                assert http.delete(f"/arrays/{array_id}").status_code == 204
    finally:
        redis_proc.stop()
    print(f"Redis commands per scrape, 5 arrays: {small}; 405 arrays: {big}")
    for path in small:
        # A per-array read would add 400 or more; allow a few for background passes.
        assert big[path] <= small[path] + 10, (path, small, big)

"""The bad-input matrix: every case gets the right 4xx with a JSON error and leaves nothing.

One parametrised test against a real API (a real uvicorn on the session's Redis) with small
caps: 4 MiB uploads, 1 MiB of shared memory, 1 s body timeout. It has a queue of its own
that no worker consumes, so anything wrongly enqueued would still be sitting there. After
each case the test compares, with the state before it: the stack's Redis keys (job and
array records, registrations; counters under `metrics:` and the janitor's lock excepted),
the shared-memory byte counter, both queues' lengths and the stack's /dev/shm segments.
"""

from __future__ import annotations

import io
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import redis

from shared.arrays.npy import build_header
from tests import stack
from tests.http_api import npy_bytes

MAX_UPLOAD = 4 << 20
SHM_LIMIT = 1 << 20


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Ctx:
    url: str
    env: dict[str, str]
    domain: str
    arrays: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.env["FORKLIFT_KEY_PREFIX"]

    @property
    def shm_prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]

    @property
    def queues(self) -> tuple[str, str]:
        queue = self.env["FORKLIFT_QUEUE"]
        return queue, f"{queue}.{self.domain}"

    def http(self, method: str, path: str, **kwargs: object) -> Reply:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            response = client.request(method, path, **kwargs)  # type: ignore[arg-type]
        return Reply(response.status_code, dict(response.headers), response.content)

    def raw(self, head: str, body: bytes = b"", then: bytes = b"") -> Reply:
        """Send a hand-written request; `then` follows once the answer has started to come."""
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                if then:
                    sock.sendall(then)
                    then = b""
                status_line, _, rest = reply.partition(b"\r\n")
                head_text, sep, content = rest.partition(b"\r\n\r\n")
                if sep:
                    headers = dict(
                        line.decode().split(": ", 1) for line in head_text.split(b"\r\n")
                    )
                    headers = {k.lower(): v for k, v in headers.items()}
                    length = int(headers.get("content-length", 0))
                    if len(content) >= length:  # anything after it answers a next request
                        return Reply(int(status_line.split()[1]), headers, content[:length])
        raise AssertionError(f"no complete answer: {reply[:300]!r}")


GOOD = npy_bytes(np.arange(100, dtype=np.float64))


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _structured_npy() -> bytes:
    return npy_bytes(np.zeros(3, dtype=[("x", "<f8"), ("y", "<i4")]))


def job(ctx: Ctx, body: object) -> Reply:
    return ctx.http("POST", "/jobs", json=body)


def upload(ctx: Ctx, body: bytes, **headers: str) -> Reply:
    return ctx.http(
        "POST", "/arrays", content=body, headers={"content-type": "application/x-npy", **headers}
    )


def raw_post(path: str, content_type: str, declared: int) -> str:
    return (
        f"POST {path} HTTP/1.1\nHost: test\nContent-Type: {content_type}\n"
        f"Content-Length: {declared}\n"
    )


def register(ctx: Ctx, segment: str, **overrides: object) -> Reply:
    body = {"segment": segment, "dtype": "float64", "shape": [4], "domain": ctx.domain}
    return ctx.http("POST", "/arrays/register", json={**body, **overrides})


JOB_JSON = b'{"task": "fib", "params": {"n": 5}}'
HEX = uuid.uuid4().hex

# case id -> (request, expected status, expected error code)
CASES: dict[str, tuple[Callable[[Ctx], Reply], int, str]] = {
    # --- POST /jobs ---
    "malformed-json": (
        lambda c: c.http(
            "POST",
            "/jobs",
            content=b'{"task": "fib",',
            headers={"content-type": "application/json"},
        ),
        400,
        "malformed_json",
    ),
    "json-not-an-object": (lambda c: job(c, [1, 2]), 422, "invalid_request"),
    "unknown-task": (lambda c: job(c, {"task": "rm_rf"}), 422, "unknown_task"),
    "task-with-path": (lambda c: job(c, {"task": "../worker/jobs/fib"}), 422, "unknown_task"),
    "wrong-param-type": (
        lambda c: job(c, {"task": "fib", "params": {"n": "x"}}),
        422,
        "invalid_params",
    ),
    "missing-param": (lambda c: job(c, {"task": "fib", "params": {}}), 422, "invalid_params"),
    "unknown-param": (
        lambda c: job(c, {"task": "fib", "params": {"n": 5, "rm": True}}),
        422,
        "invalid_params",
    ),
    "unknown-top-level-field": (
        lambda c: job(c, {"task": "fib", "params": {"n": 5}, "colour": 9}),
        422,
        "invalid_request",
    ),
    "timeout-above-limit": (
        lambda c: job(c, {"task": "fib", "params": {"n": 5}, "timeout": 1e9}),
        422,
        "invalid_timeout",
    ),
    "unknown-array": (
        lambda c: job(c, {"task": "sum", "inputs": {"a": {"array": "f" * 32}}}),
        422,
        "unknown_array",
    ),
    "array-id-with-path": (
        lambda c: job(c, {"task": "sum", "inputs": {"a": {"array": "../../etc/passwd"}}}),
        422,
        "unknown_array",
    ),
    "input-array-id-very-long": (
        lambda c: job(c, {"task": "sum", "inputs": {"a": {"array": "a" * 5000}}}),
        422,
        "unknown_array",
    ),
    "segment-smuggled-into-input": (
        lambda c: job(
            c,
            {
                "task": "sum",
                "inputs": {"a": {"array": c.arrays["f8_2d"], "segment": "/dev/shm/x"}},
            },
        ),
        422,
        "invalid_request",
    ),
    "wrong-dtype-for-job": (
        lambda c: job(c, {"task": "histogram", "inputs": {"a": {"array": c.arrays["c16_1d"]}}}),
        422,
        "invalid_inputs",
    ),
    "wrong-ndim-for-job": (
        lambda c: job(
            c,
            {
                "task": "matmul",
                "inputs": {"a": {"array": c.arrays["f8_3d"]}, "b": {"array": c.arrays["f8_2d"]}},
            },
        ),
        422,
        "invalid_inputs",
    ),
    "missing-input": (lambda c: job(c, {"task": "sum"}), 422, "invalid_inputs"),
    "unknown-input-name": (
        lambda c: job(
            c,
            {
                "task": "sum",
                "inputs": {"a": {"array": c.arrays["f8_2d"]}, "b": {"array": c.arrays["f8_2d"]}},
            },
        ),
        422,
        "invalid_inputs",
    ),
    "json-body-over-cap": (
        lambda c: c.http(
            "POST", "/jobs", content=b" " * (2 << 20), headers={"content-type": "application/json"}
        ),
        413,
        "too_large",
    ),
    "jobs-content-length-larger": (
        lambda c: c.raw(raw_post("/jobs", "application/json", len(JOB_JSON) + 50), JOB_JSON),
        408,
        "body_timeout",
    ),
    "jobs-content-length-smaller": (
        lambda c: c.raw(
            raw_post("/jobs", "application/json", len(JOB_JSON) - 5),
            JOB_JSON[:-5],
            then=JOB_JSON[-5:],
        ),
        400,
        "malformed_json",
    ),
    # --- ids with path characters ---
    "job-id-dotdot": (
        lambda c: c.raw("GET /jobs/../../etc/passwd HTTP/1.1\nHost: test\n"),
        404,
        "not_found",
    ),
    "job-id-encoded-slash": (
        lambda c: c.raw("GET /jobs/..%2F..%2Fetc%2Fpasswd HTTP/1.1\nHost: test\n"),
        404,
        "not_found",
    ),
    "job-id-encoded-dots": (
        lambda c: c.raw("DELETE /jobs/%2e%2e HTTP/1.1\nHost: test\n"),
        404,
        "job_not_found",
    ),
    "job-id-very-long": (lambda c: c.http("GET", "/jobs/" + "a" * 5000), 404, "job_not_found"),
    "job-id-uppercase": (lambda c: c.http("GET", "/jobs/" + "A" * 32), 404, "job_not_found"),
    "array-id-encoded-slash": (
        lambda c: c.raw("DELETE /arrays/..%2F..%2Fdev%2Fshm%2Fx HTTP/1.1\nHost: test\n"),
        404,
        "not_found",
    ),
    "array-id-segment-name": (
        lambda c: c.http("GET", f"/arrays/{c.shm_prefix}{c.arrays['f8_2d']}"),
        404,
        "array_not_found",
    ),
    "array-id-very-long": (
        lambda c: c.http("DELETE", "/arrays/" + "b" * 5000),
        404,
        "array_not_found",
    ),
    # --- POST /arrays ---
    "npy-truncated": (  # chunked: no Content-Length to give it away before the end
        lambda c: c.http(
            "POST",
            "/arrays",
            content=iter([GOOD[:-8]]),
            headers={"content-type": "application/x-npy"},
        ),
        400,
        "truncated",
    ),
    "npy-truncated-in-header": (lambda c: upload(c, GOOD[:30]), 400, "bad_npy"),
    "npy-lying-header-more": (
        lambda c: upload(c, GOOD.replace(b"(100,)", b"(900,)")),
        400,
        "length_mismatch",
    ),
    "npy-lying-header-less": (
        lambda c: upload(c, GOOD.replace(b"(100,)", b"(10,) ")),
        400,
        "length_mismatch",
    ),
    "npy-bad-magic": (lambda c: upload(c, b"NOTNUMPY" + GOOD[8:]), 400, "bad_npy"),
    "npy-object-dtype": (lambda c: upload(c, _object_npy()), 400, "bad_npy"),
    "npy-structured-dtype": (lambda c: upload(c, _structured_npy()), 400, "bad_npy"),
    "npy-wrong-media-type": (
        lambda c: upload(c, GOOD, **{"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    ),
    "raw-without-shape": (
        lambda c: c.http(
            "POST",
            "/arrays",
            params={"dtype": "float64"},
            content=b"\0" * 8,
            headers={"content-type": "application/octet-stream"},
        ),
        422,
        "invalid_request",
    ),
    "raw-object-dtype": (
        lambda c: c.http(
            "POST",
            "/arrays",
            params={"dtype": "O", "shape": "1"},
            content=b"\0" * 8,
            headers={"content-type": "application/octet-stream"},
        ),
        422,
        "invalid_request",
    ),
    "arrays-content-length-larger": (
        lambda c: c.raw(raw_post("/arrays", "application/x-npy", len(GOOD) + 64), GOOD),
        400,
        "length_mismatch",
    ),
    "arrays-content-length-larger-stalls": (
        lambda c: c.raw(
            raw_post("/arrays", "application/octet-stream", 800).replace(
                "/arrays", "/arrays?dtype=float64&shape=100"
            ),
            b"\0" * 400,
        ),
        408,
        "body_timeout",
    ),
    "arrays-content-length-smaller": (
        lambda c: c.raw(
            raw_post("/arrays", "application/x-npy", len(GOOD) - 8), GOOD[:-8], then=GOOD[-8:]
        ),
        400,
        "length_mismatch",
    ),
    "upload-over-cap-refused-before-body": (
        # Only the first 128 bytes of a "1 GB" body are ever sent.
        lambda c: c.raw(raw_post("/arrays", "application/x-npy", 10**9), GOOD[:128]),
        413,
        "too_large",
    ),
    "npy-header-over-cap-chunked": (
        lambda c: c.http(
            "POST",
            "/arrays",
            content=iter([build_header(np.dtype("f8"), (10**6,), False), b"\0" * 1024]),
            headers={"content-type": "application/x-npy"},
        ),
        413,
        "too_large",
    ),
    "shm-over-cap": (lambda c: upload(c, npy_bytes(np.zeros(2 << 17))), 507, "shm_full"),
    # --- POST /arrays/register (segment names from outside) ---
    "register-dev-shm-path": (
        lambda c: register(c, f"/dev/shm/{c.shm_prefix}{HEX}"),
        422,
        "bad_segment_name",
    ),
    "register-no-prefix": (lambda c: register(c, HEX), 422, "bad_segment_name"),
    "register-other-prefix": (
        lambda c: register(c, f"forklift_{HEX}"),
        422,
        "bad_segment_name",
    ),
    "register-dotdot": (
        lambda c: register(c, f"{c.shm_prefix}../../etc/passwd"),
        422,
        "bad_segment_name",
    ),
    "register-very-long": (
        lambda c: register(c, c.shm_prefix + "a" * 400),
        422,
        "invalid_request",
    ),
    "register-object-dtype": (
        lambda c: register(c, f"{c.shm_prefix}{uuid.uuid4().hex}", dtype="O"),
        422,
        "bad_dtype",
    ),
    "register-other-domain": (
        lambda c: register(c, f"{c.shm_prefix}{uuid.uuid4().hex}", domain="elsewhere"),
        409,
        "other_domain",
    ),
}


@pytest.fixture(scope="module")
def ctx(redis_url: str) -> Iterator[Ctx]:
    env = stack.stack_env(
        redis_url,
        FORKLIFT_QUEUE=f"badinput{uuid.uuid4().hex[:8]}",  # consumed by no worker
        FORKLIFT_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        FORKLIFT_SHM_LIMIT_BYTES=str(SHM_LIMIT),
        FORKLIFT_JANITOR_INTERVAL="3600",
        FORKLIFT_BODY_TIMEOUT="1",
    )
    api, url = stack.start_api(env)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        domain = httpx.get(f"{url}/healthz").json()["shm_domain"]
        c = Ctx(url, env, domain)
        for name, arr in {
            "f8_2d": np.ones((3, 4)),
            "f8_3d": np.ones((2, 2, 2)),
            "c16_1d": np.ones(4, dtype=np.complex128),
        }.items():
            reply = upload(c, npy_bytes(arr))
            assert reply.status == 201, reply.body
            c.arrays[name] = reply.json()["id"]
        yield c
        for array_id in c.arrays.values():
            assert c.http("DELETE", f"/arrays/{array_id}").status == 204
        assert not stack.segments(env["FORKLIFT_SHM_PREFIX"])
    finally:
        api.stop()
        for key in client.scan_iter(f"{env['FORKLIFT_KEY_PREFIX']}:*"):
            client.delete(key)
        client.delete(*(env["FORKLIFT_QUEUE"] + s for s in ("", f".{domain}")))
        client.close()


def residue(c: Ctx) -> dict[str, object]:
    client = redis.Redis.from_url(c.env["REDIS_URL"], decode_responses=True)
    try:
        keys = {
            k
            for k in client.scan_iter(f"{c.prefix}:*")
            if ":metrics:" not in k and ":janitor:" not in k
        }
        return {
            "keys": keys,
            "shm_bytes": client.get(f"{c.prefix}:shm_bytes:{c.domain}"),
            "queued": {q: client.llen(q) for q in c.queues},
            "segments": stack.segments(c.shm_prefix),
        }
    finally:
        client.close()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_json_4xx_and_leaves_nothing(ctx: Ctx, case: str) -> None:
    send, status, code = CASES[case]
    before = residue(ctx)
    start = time.monotonic()
    reply = send(ctx)
    elapsed = time.monotonic() - start
    assert reply.status == status, (reply.status, reply.body[:500])
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and "Traceback" not in error["message"]
    assert elapsed < 5, f"answered after {elapsed:.1f} s"
    # An aborted upload is cleaned up as the request ends; give it a moment.
    stack.wait_until(lambda: residue(ctx) == before, 3, what="no residue")

"""What the integration tests say to a forklift API over HTTP: .npy bodies, arrays, jobs.

Plain httpx calls with the status checked, so a test reads as what it asks, and a wrong
status fails with the API's own error body.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator

import httpx
import numpy as np

from shared.arrays.npy import NpyHeader, build_header, parse_header

FINAL = ("succeeded", "failed", "cancelled")


def npy_bytes(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, arr, allow_pickle=False)
    return buffer.getvalue()


def load_npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def upload(http: httpx.Client, arr: np.ndarray, **params: object) -> dict:
    """`POST /arrays` with the whole .npy body; returns the array's metadata."""
    response = http.post(
        "/arrays",
        content=npy_bytes(arr),
        params=params,
        headers={"content-type": "application/x-npy"},
    )
    assert response.status_code == 201, response.text
    return response.json()


def streamed_upload(http: httpx.Client, arr: np.ndarray, chunk: int = 8 << 20) -> dict:
    """Upload without building the whole body: header, then the array's buffer in chunks."""
    header = build_header(arr.dtype, arr.shape, False)
    flat = memoryview(np.ascontiguousarray(arr)).cast("B")

    def body() -> Iterator[bytes]:
        yield header
        for start in range(0, len(flat), chunk):
            yield bytes(flat[start : start + chunk])

    response = http.post(
        "/arrays",
        content=body(),
        headers={
            "content-type": "application/x-npy",
            "content-length": str(len(header) + arr.nbytes),
        },
        timeout=120,
    )
    assert response.status_code == 201, response.text
    return response.json()


def download(http: httpx.Client, array_id: str) -> np.ndarray:
    response = http.get(f"/arrays/{array_id}", timeout=120)
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    return load_npy(response.content)


def digest(arr: np.ndarray) -> str:
    """blake2b of an array's bytes in its memory order: large round trips are compared by this."""
    flat = arr.reshape(-1, order="A")  # a view when arr is C or F contiguous
    return hashlib.blake2b(memoryview(flat).cast("B")).hexdigest()


def download_digest(http: httpx.Client, array_id: str) -> tuple[NpyHeader, str]:
    """Download an array as a stream and hash its data bytes, never holding them all.

    Returns the parsed .npy header and the blake2b of what follows it, to compare with
    `digest()` of the array sent: bit for bit, without a second copy of a large array.
    """
    hasher = hashlib.blake2b()
    head = b""
    header: NpyHeader | None = None
    received = 0
    with http.stream("GET", f"/arrays/{array_id}", timeout=120) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_bytes(8 << 20):
            received += len(chunk)
            if header is None:
                head += chunk
                header = parse_header(head)
                if header is not None:
                    hasher.update(head[header.header_len :])
            else:
                hasher.update(chunk)
        assert int(response.headers["content-length"]) == received
    assert header is not None, "the body ended inside the .npy header"
    assert received == header.header_len + header.nbytes
    return header, hasher.hexdigest()


def submit(
    http: httpx.Client,
    task: str,
    *,
    inputs: dict[str, str] | None = None,
    timeout: float | None = None,
    **params: object,
) -> str:
    """`POST /jobs`; `inputs` maps input names to array ids. Returns the job id."""
    body: dict[str, object] = {"task": task, "params": params}
    if inputs:
        body["inputs"] = {name: {"array": array_id} for name, array_id in inputs.items()}
    if timeout is not None:
        body["timeout"] = timeout
    response = http.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait(http: httpx.Client, job_id: str, within: float = 30) -> dict:
    """Long-polls until the job ends; fails if it is still queued/running after `within` s."""
    deadline = time.monotonic() + within
    unavailable = 0  # 503s with Retry-After honoured, as the client does, a few at most
    while True:
        left = deadline - time.monotonic()
        response = http.get(
            f"/jobs/{job_id}", params={"wait": max(0, min(left, 10))}, timeout=max(left, 0) + 15
        )
        if response.status_code == 503 and "Retry-After" in response.headers and unavailable < 3:
            unavailable += 1  # e.g. a stale pooled connection just after a Redis restart
            time.sleep(float(response.headers["Retry-After"]))
            continue
        assert response.status_code == 200, response.text
        record = response.json()
        if record["status"] in FINAL:
            return record
        assert left > 0, f"job still {record['status']} after {within} s: {record}"

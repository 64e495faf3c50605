"""Array bytes in and out of shared memory for the API, without blocking the event loop.

Uploads are written chunk by chunk into the segment as they arrive (the whole array never
exists as one Python `bytes`), through the array write lifecycle (shared/arrays/lifecycle.py:
nothing is left of a failed upload); downloads stream the `.npy` header and then the segment.

A download holds a read lease on its array (shared/arrays/store.py) from before it maps the
segment until its response ends, renewed while it runs: deleting or expiring the array meanwhile
hides it at once, but its segment is neither recycled nor truncated until the last reader is
done, so the download streams the right bytes to the end and can never SIGBUS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import uuid
from collections.abc import AsyncIterator

import anyio
import numpy as np
import redis.asyncio as aioredis
from anyio import to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from api.deps import AppState
from api.errors import ApiError, not_found
from api.remote import proxy_array
from shared import trust
from shared.arrays import lifecycle, mappings
from shared.arrays.lifecycle import ArrayWrite
from shared.arrays.npy import NpyFormatError, NpyHeader, build_header, parse_header
from shared.arrays.segments import Segment, allocate_pages
from shared.arrays.store import READ_LEASE_S, ArrayRecord
from shared.schemas import is_id

log = logging.getLogger("forklift.api")

DOWNLOAD_CHUNK = 4 << 20
ALLOCATION_BLOCK = 64 << 20
ALLOCATE_AHEAD = 4 * ALLOCATION_BLOCK
MAX_HEADER = 65536

NPY_MEDIA_TYPE = "application/x-npy"


async def load_array(state: AppState, array_id: str, owner: str) -> ArrayRecord:
    record = await state.arrays.get(array_id) if is_id(array_id) else None
    if record is None or not record.visible or record.owner != owner:
        raise not_found("array", array_id)
    return record


def npy_headers(record: ArrayRecord, header_len: int) -> dict[str, str]:
    return {
        "Content-Length": str(header_len + record.nbytes),
        "X-Forklift-Array-Id": record.id,
        "X-Forklift-Shape": ",".join(map(str, record.shape)),
        "X-Forklift-Dtype": record.dtype,
        "X-Forklift-Order": record.order,
    }


async def npy_response(state: AppState, array_id: str, owner: str, *, head: bool) -> Response:
    record = await load_array(state, array_id, owner)
    header = build_header(np.dtype(record.dtype), record.shape, record.order == "F")
    headers = npy_headers(record, len(header))
    if head:
        return Response(status_code=200, headers=headers, media_type=NPY_MEDIA_TYPE)
    if record.domain != state.settings.shm_domain:  # another host's: stream it from its API
        return await proxy_array(state.settings, record, header, headers, NPY_MEDIA_TYPE)
    return await leased_stream(state, record, owner, header, headers, NPY_MEDIA_TYPE)


async def leased_stream(
    state: AppState,
    record: ArrayRecord,
    owner: str | None,
    header: bytes,
    headers: dict[str, str],
    media_type: str,
) -> Response:
    """A streaming response of the array's segment that holds a read lease until it ends.

    `owner`: a client's download (404 unless visible and the caller's); None: an internal
    read (ready is enough). The lease is taken before the segment is mapped, atomically with
    the check, so nothing can free the array in between.
    """
    # The record's segment name is opened only if it is this stack's name for the array.
    trust.segment(record.segment, record.id, state.settings, where="the array record")
    token = uuid.uuid4().hex
    if not await state.arrays.begin_read(record.id, token, owner=owner):
        raise not_found("array", record.id)
    try:
        segment = mappings.attach(record.segment, record.nbytes)  # kept: no faults next time
    except BaseException as exc:
        await end_read(state, record.id, token)
        if isinstance(exc, FileNotFoundError):
            raise not_found("array", record.id) from None
        raise
    body = stream_segment(segment, record.nbytes, header)
    return LeasedStream(state, record.id, token, body, headers=headers, media_type=media_type)


async def end_read(state: AppState, array_id: str, token: str) -> None:
    """Give a read lease back; the last reader of an array deleted meanwhile frees it."""
    if await state.arrays.end_read(array_id, token):
        await lifecycle.free_async(state.arrays, [array_id])


class LeasedStream(StreamingResponse):
    """Streams while renewing a read lease; gives the lease back however the stream ends
    (done, client gone, cancelled), shielded from cancellation.

    A lease found lost (Redis unreachable for longer than the lease, so it lapsed and the
    array may be freed) ends the stream at once: the client gets a body shorter than its
    Content-Length, a clean failure, rather than bytes of a segment that may be reused.
    """

    def __init__(
        self,
        state: AppState,
        array_id: str,
        token: str,
        body: AsyncIterator[bytes],
        **kwargs: object,
    ) -> None:
        super().__init__(body, **kwargs)  # type: ignore[arg-type]
        self._state, self._array_id, self._token = state, array_id, token

    async def _renew(self, group: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.sleep(READ_LEASE_S / 3)
            try:
                held = await self._state.arrays.renew_read(self._array_id, self._token)
            except Exception as exc:  # Redis away for a moment: the next round retries
                log.warning("renewing the read lease of array %s: %s", self._array_id, exc)
                continue
            if not held:
                log.warning("read lease of array %s lost: download ended", self._array_id)
                group.cancel_scope.cancel()
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._renew, group)
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await end_read(self._state, self._array_id, self._token)
                except Exception as exc:  # the lease lapses by itself; the janitor frees
                    log.warning("ending the read lease of array %s: %s", self._array_id, exc)


async def stream_segment(
    segment: Segment, nbytes: int, header: bytes = b""
) -> AsyncIterator[bytes]:
    """`header`, then the segment's bytes in chunks; the segment is closed at the end."""
    try:
        if header:
            yield header
        view = segment.buffer
        for start in range(0, nbytes, DOWNLOAD_CHUNK):
            # bytes(): the transport may buffer what it cannot send yet, and once this
            # generator ends the lease goes and the segment may be freed and recycled.
            yield bytes(view[start : start + DOWNLOAD_CHUNK])
        del view
    finally:
        with contextlib.suppress(BufferError):
            segment.close()


async def _read_header(stream: AsyncIterator[bytes]) -> tuple[NpyHeader, bytes]:
    prefix = bytearray()
    async for chunk in stream:
        prefix += chunk
        header = parse_header(bytes(prefix[:MAX_HEADER]), max_header_len=MAX_HEADER)
        if header is not None:
            return header, bytes(prefix[header.header_len :])
        if len(prefix) > MAX_HEADER:
            raise NpyFormatError("the .npy header is longer than 64 KiB")
    raise NpyFormatError(f"truncated .npy: the body ended after {len(prefix)} bytes, in the header")


def _disconnected() -> ApiError:
    return ApiError(400, "client_disconnected", "the client went away mid-upload")


async def ingest(
    state: AppState,
    request: Request,
    owner: str,
    raw_header: NpyHeader | None,
    ttl: float | None,
) -> ArrayRecord:
    """Stream the request body into a new segment and register it; nothing left on failure."""
    declared = request.headers.get("content-length")
    stream = request.stream()
    try:
        if raw_header is None:
            header, first = await _read_header(stream)
        else:
            header, first = raw_header, b""
    except NpyFormatError as exc:
        raise ApiError(400, "bad_npy", str(exc)) from None
    except ClientDisconnect:
        raise _disconnected() from None
    total = header.header_len + header.nbytes if raw_header is None else header.nbytes
    if declared is not None and int(declared) != total:
        raise ApiError(
            400,
            "length_mismatch",
            f"Content-Length is {declared} but the array needs {total} bytes"
            f" ({header.dtype.str}, shape {header.shape})",
        )
    lifecycle.check_size(header.nbytes, state.settings)
    async with lifecycle.writing(
        state.arrays,
        uuid.uuid4().hex,
        header.shape,
        header.dtype.str,
        header.order,
        header.nbytes,
        owner,
        ttl=ttl,
    ) as write:
        # Per key: bytes its uploads in flight reserve (429 past FORKLIFT_KEY_MAX_UPLOAD_BYTES).
        release_quota = state.limits.take(owner, "upload_bytes", header.nbytes)
        try:
            await _fill(write, first, stream)
        finally:
            release_quota()
    assert write.record is not None
    return write.record


class _PageAllocator:
    """Allocates a sparse segment's pages in a thread, block by block, ahead of the writer.

    Page allocation (the kernel zeroing memory) costs as much as receiving the bytes; doing
    it on another core while the body arrives nearly halves a large upload's time. The
    writer never touches a page before it is allocated, so a full /dev/shm is a clean
    ShmFullError (507) and never a SIGBUS. It stays at most `ALLOCATE_AHEAD` bytes ahead of
    what has arrived, so a body that trickles in does not get its whole size allocated.
    """

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.ready = 0
        self.wanted = 0  # bytes the writer has asked for so far
        self.error: BaseException | None = None
        self.stopped = False
        self._turn = threading.Condition()
        self._loop = asyncio.get_running_loop()
        self._progress = asyncio.Event()
        self._task = asyncio.ensure_future(to_thread.run_sync(self._run))

    def _run(self) -> None:
        size = self.segment.size
        try:
            for start in range(0, size, ALLOCATION_BLOCK):
                with self._turn:
                    self._turn.wait_for(functools.partial(self._may_allocate, start))
                if self.stopped:
                    return
                allocate_pages(self.segment, start, start + ALLOCATION_BLOCK)
                self.ready = min(start + ALLOCATION_BLOCK, size)
                self._loop.call_soon_threadsafe(self._progress.set)
        except BaseException as exc:
            self.error = exc
            self._loop.call_soon_threadsafe(self._progress.set)

    def _may_allocate(self, start: int) -> bool:
        return self.stopped or start < self.wanted + ALLOCATE_AHEAD

    async def wait_for(self, end: int) -> None:
        if end > self.wanted:
            with self._turn:
                self.wanted = end
                self._turn.notify()
        while self.ready < end:
            if self.error is not None:
                raise self.error  # ShmFullError when /dev/shm has no room: a 507
            self._progress.clear()
            await self._progress.wait()

    async def close(self) -> None:
        with self._turn:
            self.stopped = True
            self._turn.notify()
        with contextlib.suppress(BaseException):
            await self._task


async def _fill(
    write: ArrayWrite[aioredis.Redis], first: bytes, stream: AsyncIterator[bytes]
) -> None:
    """Copy the body into the write's segment as it arrives; a new large segment gets its
    pages allocated in a thread, ahead of the bytes."""
    nbytes = write.nbytes
    segment = await to_thread.run_sync(lambda: write.open(sparse_above=ALLOCATION_BLOCK))
    allocator = _PageAllocator(segment) if write.sparse else None
    buffer = segment.buffer
    written = 0
    try:
        chunk: bytes = first
        while True:
            if chunk:
                end = written + len(chunk)
                if end > nbytes:
                    raise ApiError(
                        400,
                        "length_mismatch",
                        f"the body is longer than the {nbytes} bytes the array needs",
                    )
                if allocator is not None:
                    await allocator.wait_for(end)
                buffer[written:end] = chunk
                written = end
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                break
    except ClientDisconnect:
        raise _disconnected() from None
    finally:
        del buffer
        if allocator is not None:
            await allocator.close()
    if written != nbytes:
        raise ApiError(
            400,
            "truncated",
            f"truncated upload: got {written} of {nbytes} data bytes",
        )

"""`.npy` in and out as streams: chunks to send, and a reader fed with chunks as they arrive.

Sending never builds the encoded file: the header from `build_header`, then memoryview
slices of the array's own buffer (contiguous arrays: no copy at all; others are made
contiguous a block of rows at a time). Receiving parses the header with forklift's own
parser (numpy's safe header reader, no pickle, object dtypes refused: `np.load(...,
allow_pickle=False)` semantics), allocates the array once and copies each chunk into place.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from forklift.errors import ForkliftError, InvalidRequest
from shared.arrays.npy import NpyFormatError, NpyHeader, build_header, check_dtype, parse_header

NPY = "application/x-npy"
CHUNK = 4 << 20
MAX_HEADER = 65536

#: A transfer's progress callback: (bytes sent or received so far, bytes in all if known).
ByteProgress = Callable[[int, int | None], None]


def memory_order(arr: np.ndarray) -> str:
    """'F' for an array laid out in Fortran order only, else 'C'."""
    return "F" if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"


def checked_dtype(arr: np.ndarray) -> np.dtype:
    """The array's dtype if forklift accepts it; InvalidRequest (before any I/O) if not."""
    if not isinstance(arr, np.ndarray):
        raise InvalidRequest(f"expected a numpy ndarray, got {type(arr).__name__}")
    try:
        return check_dtype(arr.dtype)
    except NpyFormatError as exc:
        raise InvalidRequest(str(exc), code="bad_dtype") from None


def npy_length(arr: np.ndarray) -> int:
    """Bytes of the .npy encoding: header plus data."""
    dtype = checked_dtype(arr)
    return len(build_header(dtype, arr.shape, memory_order(arr) == "F")) + arr.nbytes


def npy_chunks(arr: np.ndarray, chunk_size: int = CHUNK) -> Iterator[bytes | memoryview]:
    """The .npy encoding of `arr` as a header and chunks of at most `chunk_size` bytes."""
    dtype = checked_dtype(arr)
    order = memory_order(arr)
    yield build_header(dtype, arr.shape, order == "F")
    if arr.nbytes == 0:
        return
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        flat = arr.ravel(order="K").view(np.uint8).data
        for start in range(0, len(flat), chunk_size):
            yield flat[start : start + chunk_size]
        return
    # Not contiguous (a slice, a transpose of a slice...): C order, a block of rows at a time.
    row_bytes = arr.nbytes // arr.shape[0]
    rows = max(1, chunk_size // max(row_bytes, 1))
    for start in range(0, arr.shape[0], rows):
        block = np.ascontiguousarray(arr[start : start + rows])
        yield block.reshape(-1).view(np.uint8).data


async def async_npy_chunks(
    arr: np.ndarray, chunk_size: int = CHUNK
) -> AsyncIterator[bytes | memoryview]:
    """npy_chunks for httpx.AsyncClient (which wants an async iterable)."""
    for chunk in npy_chunks(arr, chunk_size):
        yield chunk


def file_chunks(path: str | os.PathLike[str], chunk_size: int = CHUNK) -> Iterator[bytes]:
    """A .npy file as it is on disk (already the wire format), read a chunk at a time."""
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


async def async_file_chunks(
    path: str | os.PathLike[str], chunk_size: int = CHUNK
) -> AsyncIterator[bytes]:
    """file_chunks for httpx.AsyncClient: each read in a thread, off the event loop."""
    with Path(path).open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, chunk_size):
            yield chunk


def counted(
    chunks: Iterator[bytes | memoryview], total: int | None, progress: ByteProgress | None
) -> Iterator[bytes | memoryview]:
    """`chunks` as they are, `progress(done, total)` called after each one is taken."""
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        if progress is not None:
            progress(done, total)


async def async_counted(
    chunks: AsyncIterator[bytes | memoryview], total: int | None, progress: ByteProgress | None
) -> AsyncIterator[bytes | memoryview]:
    """`counted` for async chunk streams."""
    done = 0
    async for chunk in chunks:
        yield chunk
        done += len(chunk)
        if progress is not None:
            progress(done, total)


class NpyReader:
    """Feed it the chunks of a .npy stream; `finish()` returns the array.

    The array is allocated once when the header is complete; each chunk is copied straight
    into it, so peak memory is the array plus one chunk.
    """

    def __init__(self, max_header: int = MAX_HEADER) -> None:
        self.max_header = max_header
        self.header: NpyHeader | None = None
        self._prefix = bytearray()
        self._flat: np.ndarray | None = None
        self._buffer: memoryview | None = None
        self._written = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        if not chunk:
            return
        if self.header is None:
            self._prefix += chunk
            try:
                self.header = parse_header(bytes(self._prefix[: self.max_header + 16]))
            except NpyFormatError as exc:
                raise ForkliftError(f"the server sent a bad .npy stream: {exc}") from None
            if self.header is None:
                if len(self._prefix) > self.max_header + 16:
                    raise ForkliftError("the server sent a .npy header over 64 KiB")
                return
            self._flat = np.empty(self.header.nbytes, dtype=np.uint8)
            self._buffer = self._flat.data
            rest = bytes(self._prefix[self.header.header_len :])
            self._prefix = bytearray()
            self._write(rest)
        else:
            self._write(chunk)

    def _write(self, chunk: bytes | memoryview) -> None:
        if not chunk:
            return
        assert self._buffer is not None
        end = self._written + len(chunk)
        if end > len(self._buffer):
            raise ForkliftError(f"the .npy stream is longer than its header says ({end} bytes)")
        self._buffer[self._written : end] = chunk
        self._written = end

    def finish(self) -> np.ndarray:
        header = self.header
        if header is None or self._flat is None:
            raise ForkliftError("truncated .npy stream: it ended inside the header")
        if self._written != header.nbytes:
            raise ForkliftError(
                f"truncated .npy stream: got {self._written} of {header.nbytes} data bytes"
            )
        if self._buffer is not None:
            self._buffer.release()
            self._buffer = None
        order: Literal["C", "F"] = "F" if header.order == "F" else "C"
        if math.prod(header.shape) == 0:
            return np.empty(header.shape, dtype=header.dtype, order=order)
        return self._flat.view(header.dtype).reshape(header.shape, order=order)


def read_npy(chunks: Iterable[bytes]) -> np.ndarray:
    reader = NpyReader()
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()

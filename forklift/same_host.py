"""The same-host path: write an array into a shared-memory segment, then the API adopts it.

The API adopts the segment by name (`POST /arrays/register`, then `.../commit`), so the
array never crosses a socket: one memcpy into memory the workers attach directly. The
client asks for a recycled segment (`recycle`): the API only hands out one that an array of
the same key freed. When this process wrote into it before, its mapping is still kept here
(shared/arrays/mappings.py) and the put is just the copy, split across cores. Otherwise the
segment is created here, and its mapping kept for next time.

The API commits only a segment of its own uid, mode 0600, a regular file with one link
(what `create_segment` makes when this process runs as the stack's user): a process of
another uid could truncate its file under a download or a job, so it must upload instead.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import numpy as np

from forklift.npy_stream import checked_dtype, memory_order
from shared.arrays import mappings
from shared.arrays.copying import copy_into
from shared.arrays.segments import ndarray_view, unlink_segment
from shared.settings import derive_shm_domain


def local_domain() -> str:
    """This process's shm domain, computed as the stack computes its own."""
    return os.environ.get("FORKLIFT_SHM_DOMAIN") or derive_shm_domain()


def new_segment_name(prefix: str) -> tuple[str, str]:
    """(segment name, array id): the stack's prefix and a fresh uuid4 hex."""
    array_id = uuid.uuid4().hex
    return f"{prefix}{array_id}", array_id


def registration(
    arr: np.ndarray, ttl: float | None, prefix: str, *, recycle: bool
) -> tuple[str, str, dict[str, Any]]:
    """(segment name, array id, body of `POST /arrays/register`) for a new segment name."""
    name, array_id = new_segment_name(prefix)
    body: dict[str, Any] = {
        "segment": name,
        "dtype": arr.dtype.str,
        "shape": list(arr.shape),
        "order": memory_order(arr),
        "domain": local_domain(),
        "recycle": recycle,
    }
    if ttl:
        body["ttl"] = ttl
    return name, array_id, body


class RecycledSegmentUnavailable(Exception):
    """The API reserved a recycled segment that this process cannot open (gone, other uid)."""


def fill_segment(name: str, arr: np.ndarray, *, recycled: bool = False) -> None:
    """Put exactly `arr`'s bytes into segment `name`; one copy (parallel for big arrays).

    `recycled` (the API answered `created: true`): the segment exists with exactly
    `arr.nbytes` bytes of old data; it is opened, never created, and every byte is
    overwritten. RecycledSegmentUnavailable if it cannot be opened. Otherwise it is created
    here (it must not exist) and unlinked again on any failure.
    """
    dtype = checked_dtype(arr)
    if recycled:
        try:
            segment = mappings.attach(name, arr.nbytes, writable=True)
        except (PermissionError, FileNotFoundError, ValueError) as exc:
            raise RecycledSegmentUnavailable(f"segment {name}: {exc}") from exc
    else:
        segment = mappings.create(name, arr.nbytes)
    try:
        target = ndarray_view(segment, dtype, arr.shape, memory_order(arr))
        copy_into(target, arr, casting="no")
        del target
    except BaseException:
        with contextlib.suppress(BufferError):
            segment.close()
        if not recycled:
            unlink_segment(name)
        raise
    segment.close()


def discard_segment(name: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        unlink_segment(name)

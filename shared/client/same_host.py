"""The same-host path: write an array into a shared-memory segment this process creates.

The API adopts the segment by name (`POST /arrays/register`, then `.../commit`), so the
array never crosses a socket: one memcpy into memory the workers attach directly.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np

from shared.arrays.segments import create_segment, ndarray_view, unlink_segment
from shared.client.npy_stream import checked_dtype, memory_order
from shared.settings import derive_shm_domain


def local_domain() -> str:
    """This process's shm domain, computed as the stack computes its own."""
    return os.environ.get("FORKLIFT_SHM_DOMAIN") or derive_shm_domain()


def new_segment_name(prefix: str) -> tuple[str, str]:
    """(segment name, array id): the stack's prefix and a fresh uuid4 hex."""
    array_id = uuid.uuid4().hex
    return f"{prefix}{array_id}", array_id


def fill_segment(name: str, arr: np.ndarray) -> None:
    """Create segment `name` (it must not exist) holding exactly `arr`'s bytes; one copy.

    On any failure the segment is unlinked again.
    """
    dtype = checked_dtype(arr)
    segment = create_segment(name, arr.nbytes)
    try:
        target = ndarray_view(segment, dtype, arr.shape, memory_order(arr))
        np.copyto(target, arr, casting="no")
        del target
    except BaseException:
        with contextlib.suppress(BufferError):
            segment.close()
        unlink_segment(name)
        raise
    segment.close()


def discard_segment(name: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        unlink_segment(name)

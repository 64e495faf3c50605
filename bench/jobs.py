"""Bench-only jobs, loaded by the bench stacks with FORKLIFT_JOB_MODULES=bench.jobs.

They measure from inside the worker child what the HTTP API cannot show: when the job
function is entered, and how long attaching a segment by name takes.
"""

from __future__ import annotations

import statistics
import time
from typing import Annotated

import numpy as np
from pydantic import Field

from shared.arrays.segments import attach_segment, ndarray_view
from shared.registry import job


@job
def noop() -> int:
    """Does nothing: the trivial job of the throughput bench."""
    return 1


@job
def entered(a: np.ndarray) -> dict:
    """The wall clock when the job function was entered (its input already attached)."""
    now = time.time()
    return {"entered": now, "writeable": bool(a.flags.writeable), "nbytes": int(a.nbytes)}


@job
def identity(a: np.ndarray) -> np.ndarray:
    """Returns its input, so the runner stores an array result of the same size."""
    return a


@job
def attach_probe(
    segment: Annotated[str, Field(max_length=250)],
    nbytes: Annotated[int, Field(ge=8)],
    repeat: Annotated[int, Field(ge=1, le=100)] = 5,
) -> dict:
    """Time `attach_segment` + `ndarray_view` of a float64 segment, by name, `repeat` times.

    Each round maps the segment afresh, builds the view, reads its first and last element
    (so the mapping is real), and unmaps it. Returns seconds: first, min and median.
    """
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        seg = attach_segment(segment, nbytes)
        view = ndarray_view(seg, np.dtype("<f8"), (nbytes // 8,), "C")
        _ = float(view[0]) + float(view[-1])
        elapsed = time.perf_counter() - start
        del view
        seg.close()
        times.append(elapsed)
    return {"first": times[0], "min": min(times), "median": statistics.median(times)}

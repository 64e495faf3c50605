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
from shared.registry import ArraySpec, job
from shared.splits import NotSplittable, Output, PartInfo, Split

# Elements per block of the elementwise kernel: 8 MiB of float64, so the one temporary stays
# small (in cache-sized steps) instead of the size of the array.
BLOCK = 1 << 20


@job
def noop() -> int:
    """Does nothing: the trivial job of the throughput bench."""
    return 1


@job
def pause(ms: Annotated[int, Field(ge=0, le=60_000)]) -> int:
    """Sleeps `ms` milliseconds: a job of a known length that uses no CPU, so on a small machine
    more hosts still add capacity (bench/scale.py)."""
    time.sleep(ms / 1000)
    return ms


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


def elementwise_into(a: np.ndarray, out: np.ndarray) -> None:
    """out[:] = sin(a) * sqrt(|a| + 1), block by block with ufunc `out=`: no private copy of
    the array, one 8 MiB temporary (bench/parallel.py runs this same kernel on every path)."""
    flat_a, flat_out = a.reshape(-1), out.reshape(-1)
    tmp = np.empty(min(BLOCK, flat_a.size), dtype=np.float64)
    for start in range(0, flat_a.size, BLOCK):
        src, dst = flat_a[start : start + BLOCK], flat_out[start : start + BLOCK]
        t = tmp[: src.size]
        np.abs(src, out=t)
        t += 1.0
        np.sqrt(t, out=t)
        np.sin(src, out=dst)
        dst *= t


def _elementwise_part(
    arrays: dict[str, np.ndarray], params: object, out: np.ndarray | None, info: PartInfo
) -> None:
    assert out is not None
    elementwise_into(arrays["a"], out)


def _elementwise_split(arrays: dict, params: object) -> Split:
    a = arrays["a"]
    if len(a.shape) == 0:
        raise NotSplittable("a 0-d array has no axis to split")
    return Split(
        inputs={"a": 0},
        part=_elementwise_part,
        output=Output(shape=tuple(a.shape), dtype=np.dtype(np.float64)),
    )


@job(split=_elementwise_split)
def elementwise(a: Annotated[np.ndarray, ArraySpec(kinds="biuf")]) -> np.ndarray:
    """sin(a) * sqrt(|a| + 1) as float64: bench/parallel.py's elementwise transform, split
    along axis 0 with an in-place output (each part writes its slice of one segment)."""
    out = np.empty(a.shape, dtype=np.float64)
    elementwise_into(np.asarray(a, dtype=np.float64), out)
    return out

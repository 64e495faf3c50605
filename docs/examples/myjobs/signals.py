"""Jobs that run as parts over one signal: docs/jobs.md, "Running a job as parts (parallel)".

`moving_mean` writes its output in place and needs a halo (each output element reads its
neighbours, some of which belong to the next part's slice); `weighted_mean` is a reduction,
each part returning a partial (its sums) that a combine adds up. Loaded like any job module:
`FORKLIFT_JOB_MODULES=myjobs.signals`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from forklift import ArraySpec, HasShapeAndDtype, InputError, job
from shared.splits import NotSplittable, Output, PartInfo, Split

Arrays = Mapping[str, HasShapeAndDtype]
Signal = Annotated[np.ndarray, ArraySpec(kinds="iuf", ndim=1, description="a 1-D signal")]

# Output elements per block: temporaries stay small whatever the slice's length.
BLOCK = 1 << 16


def _window_means(x: np.ndarray, radius: int, out: np.ndarray, first: int) -> None:
    """out[i] = the mean of x[j - radius : j + radius + 1] (clipped to x), j = first + i.

    Every element of `out` is written (an output segment may hold another array's bytes),
    and each sum adds the same neighbours in the same order wherever `x` starts, so a part
    given its halo computes exactly what the whole signal does."""
    for lo in range(0, len(out), BLOCK):
        o = out[lo : lo + BLOCK]
        centre = first + lo  # the index in x of o[0]
        o[...] = 0
        for k in range(-radius, radius + 1):
            a, b = max(0, centre + k), min(len(x), centre + k + len(o))
            if b > a:
                o[a - centre - k : b - centre - k] += x[a:b]
        j = np.arange(centre, centre + len(o))
        counts = np.minimum(j + radius, len(x) - 1) - np.maximum(j - radius, 0) + 1
        np.divide(o, counts, out=o)


def _split_moving_mean(arrays: Arrays, params: Any) -> Split:
    """Parts own ranges of `x` and see `radius` more elements on each side; each writes its
    range of the float64 output (the same length as `x`) in place."""
    if params.edges == "wrap":
        raise NotSplittable("edges='wrap' reads the far end of the signal: run it as one job")
    r = params.radius

    def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> None:
        # arrs["x"] is x[start - before : stop + after]; out is output[start:stop]
        _window_means(arrs["x"], r, out, first=info.before)

    n = arrays["x"].shape[0]
    return Split(
        inputs={"x": 0},
        part=part,
        output=Output(shape=(n,), dtype=np.dtype(np.float64)),
        halo={"x": (r, r)},
    )


@job(split=_split_moving_mean)
def moving_mean(
    x: Signal,
    radius: Annotated[int, Field(ge=0, le=256, description="neighbours on each side")] = 1,
    edges: Literal["shrink", "wrap"] = "shrink",
) -> np.ndarray:
    """The mean of each sample and its `radius` neighbours on each side (float64).

    `edges="shrink"`: near the ends the window holds the samples there are; `"wrap"`: the
    signal is periodic."""
    out = np.empty(len(x), dtype=np.float64)
    if edges == "wrap" and len(x):
        padded = np.pad(x, radius, mode="wrap")  # full windows everywhere
        _window_means(padded, radius, out, first=radius)
    else:
        _window_means(x, radius, out, first=0)
    return out


def _same_length(arrays: Arrays, params: BaseModel) -> None:
    x, w = arrays["x"], arrays["w"]
    if x.shape != w.shape:
        raise InputError(f"'x' has shape {x.shape} and 'w' {w.shape}: one weight per value")


def _weighted_sums(x: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """sum(x * w) and sum(w) in float64, block by block (no full-size temporaries)."""
    total = weight = 0.0
    for lo in range(0, len(x), BLOCK):
        wb = w[lo : lo + BLOCK].astype(np.float64)
        total += float(np.dot(x[lo : lo + BLOCK].astype(np.float64), wb))
        weight += float(wb.sum())
    return {"total": total, "weight": weight}


def _ratio(total: float, weight: float) -> float:
    return total / weight if weight else math.nan  # no weight: NaN, stored as "nan"


def _weighted_part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> Any:
    return _weighted_sums(arrs["x"], arrs["w"])  # the partial: two floats


def _weighted_combine(partials: list[Any], p: Any) -> float:
    return _ratio(sum(q["total"] for q in partials), sum(q["weight"] for q in partials))


def _split_weighted_mean(arrays: Arrays, params: Any) -> Split:
    """`x` and `w` cut along the same axis; each part returns its two sums."""
    return Split(
        inputs={"x": 0, "w": 0},
        part=_weighted_part,
        combine=_weighted_combine,
        partial_bytes=128,  # two floats as JSON: far below the 16 MiB a partial may take
    )


@job(check=_same_length, split=_split_weighted_mean)
def weighted_mean(x: Signal, w: Signal) -> float:
    """sum(x * w) / sum(w), in float64 (NaN when the weights add up to 0)."""
    sums = _weighted_sums(x, w)
    return _ratio(sums["total"], sums["weight"])

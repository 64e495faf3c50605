"""Jobs of one's own: what docs/jobs.md walks through, loaded with FORKLIFT_JOB_MODULES.

The API and every worker import this module (`FORKLIFT_JOB_MODULES=myjobs.stats`, with the
directory holding `myjobs/` on their path), so a submission is validated in the API against
these signatures before anything is queued, and the workers run the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, Field

from forklift import ArraySpec, HasShapeAndDtype, InputError, ProgressReporter, job

Arrays = Mapping[str, HasShapeAndDtype]

Points = Annotated[
    np.ndarray, ArraySpec(kinds="iuf", ndim=2, description="one point per row, float or int")
]
Values = Annotated[np.ndarray, ArraySpec(kinds="iuf")]

# Rows of `x` per block: the job reports progress (and can be cancelled) between blocks.
BLOCK_ELEMENTS = 1 << 22


def _same_dimension(arrays: Arrays, params: BaseModel) -> None:
    """A shape rule across two inputs: metadata only, so the API can run it before enqueue."""
    x = arrays["x"]
    y = arrays.get("y", x)
    if x.shape[1] != y.shape[1]:
        raise InputError(
            f"points of 'x' have {x.shape[1]} coordinates and points of 'y' {y.shape[1]};"
            " both must have the same number of columns"
        )


def _block_rows(m: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, m))


def _distances_bytes(arrays: Arrays, params: BaseModel) -> int:
    """What `pairwise_distances` allocates: the (n, m) result, float64 copies of the points
    and their squared norms, and three (block, m) temporaries."""
    x = arrays["x"]
    y = arrays.get("y", x)
    (n, d), m = x.shape, y.shape[0]
    block = min(n, _block_rows(m))
    return 8 * (n * m + (n + m) * (d + 1) + 3 * block * m) + (1 << 20)


@job(check=_same_dimension, memory=_distances_bytes)
def pairwise_distances(
    x: Points,
    progress: ProgressReporter,
    y: Points | None = None,
    metric: Literal["euclidean", "sqeuclidean"] = "euclidean",
) -> np.ndarray:
    """Distances between every row of `x` and every row of `y` (default: `x` itself)."""
    xf = np.asarray(x, dtype=np.float64)  # the input itself when it is float64: read-only
    yf = xf if y is None else np.asarray(y, dtype=np.float64)
    xx = np.einsum("ij,ij->i", xf, xf)
    yy = xx if y is None else np.einsum("ij,ij->i", yf, yf)
    n, m = xf.shape[0], yf.shape[0]
    out = np.empty((n, m))
    step = _block_rows(m)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = xx[start:stop, None] + yy[None, :] - 2.0 * (xf[start:stop] @ yf.T)
        np.maximum(block, 0.0, out=block)  # rounding can make a zero distance negative
        out[start:stop] = block if metric == "sqeuclidean" else np.sqrt(block)
        progress(stop / n, f"{stop} of {n} rows")
    return out


def _describe_bytes(arrays: Arrays, params: BaseModel) -> int:
    # A float64 copy of the values, the NaN mask and the values left once NaNs are dropped.
    return 17 * math.prod(arrays["a"].shape) + (1 << 20)


@job(memory=_describe_bytes)
def describe(
    a: Values,
    ddof: Annotated[int, Field(ge=0, le=1, description="1: the sample standard deviation")] = 0,
) -> dict[str, int | float]:
    """Count, NaNs, mean, standard deviation, min and max of all values, NaNs left out."""
    values = np.asarray(a, dtype=np.float64).ravel()
    finite = values[~np.isnan(values)]
    count = int(finite.size)
    # Nothing to describe is NaN, which the job's result carries as the string "nan".
    mean = float(finite.mean()) if count else math.nan
    std = float(finite.std(ddof=ddof)) if count > ddof else math.nan
    low = float(finite.min()) if count else math.nan
    high = float(finite.max()) if count else math.nan
    return {
        "count": count,
        "nan": int(values.size) - count,
        "mean": mean,
        "std": std,
        "min": low,
        "max": high,
    }

"""NumPy built-ins: reductions and statistics, linear algebra, FFT, sorting, filters.

Inputs arrive as read-only views of shared memory; results that are arrays are written by
the runner into new segments. Checks that metadata can answer run in the API before enqueue.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from shared.registry import ArraySpec, job

Numeric = Annotated[np.ndarray, ArraySpec(kinds="biufc")]


@job(name="sum")
def sum_(a: Numeric, axis: int | None = None) -> float | int | complex | np.ndarray:
    """Sum of the elements, over all of them or along `axis`."""
    return np.sum(a, axis=axis)

"""Jobs only the tests load (via FORKLIFT_JOB_MODULES, as a user would add their own)."""

from __future__ import annotations

import os
import time
from typing import Annotated

import numpy as np
from pydantic import Field

from shared.registry import job


@job
def boom(message: Annotated[str, Field(max_length=200)] = "boom") -> None:
    """Always fails with `message`."""
    raise ValueError(message)


@job
def whoami() -> int:
    """The pid of the worker process running the job."""
    return os.getpid()


def _anonymous_kib() -> int:
    """Private anonymous memory of this process (heap), in KiB.

    Shared-memory pages mapped by one process only show up as Private_* in smaps even though
    they are shmem, so `Anonymous` is the honest measure of copies a job made.
    """
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return -1


@job
def inspect_input(a: np.ndarray, hold: Annotated[float, Field(ge=0, le=30)] = 0.0) -> dict:
    """How the job sees its input: writeable flag, and the memory reading it all costs."""
    before = _anonymous_kib()
    total = float(np.sum(a, dtype=np.float64))
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return {
        "writeable": bool(a.flags.writeable),
        "owndata": bool(a.flags.owndata),
        "sum": total,
        "anon_growth_kib": _anonymous_kib() - before,
        "pid": os.getpid(),
    }

"""CPU-bound built-ins that need no arrays: the seed's `fib`, `prime_count`, `sleep`."""

from __future__ import annotations

import math
import time
from typing import Annotated

from pydantic import Field

from shared.registry import ProgressReporter, job


def _fib(n: int) -> int:
    if n == 1 or n == 2:
        return 1
    return _fib(n - 1) + _fib(n - 2)


@job
def fib(n: Annotated[int, Field(ge=1, le=45, description="which Fibonacci number")]) -> int:
    """The n-th Fibonacci number, computed by naive recursion as in the seed: real CPU work
    (fib(32) takes about a second in CPython)."""
    return _fib(n)


@job
def prime_count(
    limit: Annotated[int, Field(ge=0, le=200_000_000, description="count primes below this")],
    progress: ProgressReporter,
) -> int:
    """How many primes are below `limit`, by trial division in pure Python (CPU-bound)."""
    count = 0
    step = max(1, limit // 20)
    for k in range(2, limit):
        if k % step == 0:
            progress(k / limit, f"{k} of {limit}")
        root = math.isqrt(k)
        if all(k % p for p in range(2, root + 1)):
            count += 1
    return count


@job(idempotent=True)
def sleep(
    seconds: Annotated[float, Field(ge=0, le=3600, description="how long to sleep")],
    progress: ProgressReporter,
) -> float:
    """Sleep, reporting progress ten times a second; returns the seconds slept. For tests."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        progress(elapsed / seconds if seconds else 1.0, f"{elapsed:.1f} s")
        time.sleep(min(0.1, seconds - elapsed))
    return seconds

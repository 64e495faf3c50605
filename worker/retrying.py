"""When a job that raised runs again, and how long it waits first (`@job(retries=...)`).

The wait before retry n (n = retries made so far, from 0) is drawn from
`[c / 2, c]` with `c = min(backoff_max, backoff * 2**n)`: "equal jitter", half of the
exponential step fixed and half random. Full jitter (`[0, c]`) spreads a burst of failures
best but may retry almost at once, hammering what just failed; no jitter retries a burst in
lockstep. Equal jitter keeps every gap at least half its step and still spreads them.

Only an exception the job itself raised is retried, and only if it is one of the job's
`retry_on`: the runner asks here from its catch-all branch only, after cancellation, the
soft time limit, MemoryError and forklift's own refusals (JobFailure) took theirs. A part of
a parallel job is never retried (its failure fails the job), nor is a combine.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from billiard.exceptions import SoftTimeLimitExceeded

from shared.registry import JobSpec
from shared.schemas import TaskPayload
from worker.cancel import JobCancelled

# Never retried whatever `retry_on` says (retry_on=(Exception,) would otherwise match some).
NEVER_RETRIED: tuple[type[BaseException], ...] = (
    JobCancelled,
    SoftTimeLimitExceeded,
    MemoryError,
)


def ceiling(retried: int, backoff: float, backoff_max: float) -> float:
    """The exponential step before retry `retried` (0-based), capped at `backoff_max`."""
    if backoff <= 0:
        return 0.0
    # 2**n past ~1000 overflows a float; the cap is reached long before that.
    return min(backoff_max, backoff * 2.0 ** min(retried, 1000))


def delay(
    retried: int,
    backoff: float,
    backoff_max: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry `retried`: uniform in [ceiling / 2, ceiling]."""
    top = ceiling(retried, backoff, backoff_max)
    return top / 2 + rand() * top / 2


def retry_delay(exc: BaseException, spec: JobSpec | None, payload: TaskPayload) -> float | None:
    """How long before the job runs again after raising `exc`, or None: it fails now."""
    if spec is None or payload.part is not None:
        return None
    if payload.retried >= payload.retries:
        return None
    if isinstance(exc, NEVER_RETRIED) or not isinstance(exc, spec.retry_on):
        return None
    return delay(payload.retried, spec.backoff, spec.backoff_max)

"""Jobs only the tests load (via FORKLIFT_JOB_MODULES, as a user would add their own)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from shared.registry import HasShapeAndDtype, job
from shared.splits import Output, PartInfo, Split


@job
def boom(message: Annotated[str, Field(max_length=200)] = "boom") -> None:
    """Always fails with `message`."""
    raise ValueError(message)


@job
def whoami() -> int:
    """The pid of the worker process running the job (and a log line of the job's own)."""
    logging.getLogger("tests.jobs").info("whoami: pid %d", os.getpid())
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


@job
def slow_copy(a: np.ndarray, seconds: Annotated[float, Field(ge=0, le=30)] = 1.0) -> np.ndarray:
    """Sleeps, then returns a copy of `a`: an upstream still running when the job that takes
    its result is submitted (tests/integration/test_client_parallel.py)."""
    time.sleep(seconds)
    return np.array(a)


# --- fault-injection jobs (tests/integration/test_faults.py, test_leaks.py) ---------------


@job
def suicide() -> None:
    """SIGKILLs the worker child running it, every time: a job that crashes its process."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@job
def record_run(
    log: Annotated[str, Field(pattern=r"^/tmp/[A-Za-z0-9_./-]{1,200}$")],
    tag: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
    seconds: Annotated[float, Field(ge=0, le=60)] = 0.0,
) -> str:
    """Sleeps, then appends `done <tag>` to the file `log`: one line per run to completion."""
    time.sleep(seconds)
    with open(log, "a") as out:
        out.write(f"done {tag} {os.getpid()}\n")
    return tag


@job
def ignore_soft_limit(seconds: Annotated[float, Field(ge=0, le=600)] = 60.0) -> str:
    """Blocks the soft-time-limit signal (SIGUSR1) and sleeps: C code that never yields."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    return "finished"


@job
def hog(
    megabytes: Annotated[int, Field(ge=1, le=1 << 20)],
    step_megabytes: Annotated[int, Field(ge=1, le=4096)] = 64,
    pause: Annotated[float, Field(ge=0, le=1)] = 0.0,
) -> int:
    """Allocates and touches `megabytes` of private memory in steps; returns MiB held."""
    held = []
    for _ in range(0, megabytes, step_megabytes):
        held.append(np.ones(step_megabytes << 20, dtype=np.uint8))
        time.sleep(pause)
    return sum(a.nbytes for a in held) >> 20


def _slow_double_split(arrays: Mapping[str, HasShapeAndDtype], params: Any) -> Split:
    a = arrays["a"]
    return Split(
        inputs={"a": 0},
        part=_slow_double_part,
        output=Output(shape=tuple(a.shape), dtype=np.dtype(a.dtype)),
    )


def _slow_double_part(
    arrays: dict[str, np.ndarray], params: Any, out: np.ndarray | None, info: PartInfo
) -> None:
    if info.index == params.fail_part:
        raise ValueError(f"part {info.index} fails on purpose")
    time.sleep(params.seconds)
    assert out is not None
    np.multiply(arrays["a"], 2, out=out)


@job(split=_slow_double_split)
def slow_double(
    a: np.ndarray,
    seconds: Annotated[float, Field(ge=0, le=30)] = 0.5,
    fail_part: int = -1,
) -> np.ndarray:
    """a * 2 after `seconds`; as parts, each part sleeps, and part `fail_part` raises."""
    time.sleep(seconds)
    return a * 2


# --- retries (tests/integration/test_retries.py) -------------------------------------------


def flaky(
    a: np.ndarray,
    runs: Annotated[str, Field(pattern=r"^/tmp/[A-Za-z0-9_./-]{1,200}$")],
    fail_times: Annotated[int, Field(ge=0, le=20)] = 2,
    error: Literal["ValueError", "TypeError"] = "ValueError",
) -> float:
    """Fails its first `fail_times` runs (raising `error`), then returns `a`'s sum. Each run
    appends a line to the file `runs`, which the test reads too (no shared memory needed)."""
    with open(runs, "a") as out:
        out.write(f"run {os.getpid()}\n")
    with open(runs) as done:
        n = sum(1 for _ in done)
    if n <= fail_times:
        raise (ValueError if error == "ValueError" else TypeError)(f"run {n} fails on purpose")
    return float(np.sum(a, dtype=np.float64))


# Retried on ValueError only: a TypeError fails at once. Small backoffs keep the tests quick;
# `flaky_slow` waits seconds, long enough to see (and cancel) a job waiting for its retry.
job(name="flaky", retries=3, backoff=0.3, backoff_max=2.0, retry_on=(ValueError,))(flaky)
job(name="flaky_slow", retries=2, backoff=4.0, backoff_max=8.0, retry_on=(ValueError,))(flaky)

"""The few primitives where the async client and the generated sync client differ.

The client source (`forklift/_async/client.py`) calls the async member of each pair;
`forklift._unasync` renames it to the blocking member (`async_sleep` → `sleep`,
`AsyncPending` → `Pending`), as httpcore's `_synchronization.py` pairs `AsyncLock` with `Lock`.
Everything else the two clients share is ordinary code, written once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("forklift")

AsyncWatcher = asyncio.Task[None]
Watcher = threading.Thread


async def async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


async def async_offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Blocking work (copying into shared memory, unmapping) in a thread, off the loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


class AsyncPending(Generic[T]):
    """A call started now on the running loop and awaited later (`Executor.submit`'s part)."""

    def __init__(self, call: Coroutine[Any, Any, T]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            call.close()  # never started: no "never awaited" warning on top of the error
            raise RuntimeError("AsyncClient.submit needs a running event loop") from None
        self._task: asyncio.Task[T] = loop.create_task(call)

    def peek(self) -> T | None:
        """Its value if it has finished well, else None (never waits, never raises)."""
        task = self._task
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        return None

    async def get(self) -> T:
        """Its value once it finishes; its exception if it failed (each time asked)."""
        return await self._task


class Pending(Generic[T]):
    """The blocking twin: the call has already run (a failure was raised to the caller)."""

    def __init__(self, value: T) -> None:
        self._value = value

    def peek(self) -> T | None:
        return self._value

    def get(self) -> T:
        return self._value


def async_watch(wait: Callable[[], Awaitable[object]], then: Callable[[], None]) -> AsyncWatcher:
    """A task on the running loop that awaits `wait()` (whatever it raises) and runs `then`."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "AsyncJob.add_done_callback needs a running event loop until the job has ended"
        ) from None

    async def watch() -> None:
        try:
            await wait()
        except Exception as exc:  # the callbacks run anyway; `result()` raises it again
            log.debug("waiting for a job failed: %s", exc)
        then()

    return loop.create_task(watch())


def watch(wait: Callable[[], object], then: Callable[[], None]) -> Watcher:
    """A daemon thread that calls `wait()` (whatever it raises), then `then`."""

    def run() -> None:
        try:
            wait()
        except Exception as exc:
            log.debug("waiting for a job failed: %s", exc)
        then()

    thread = threading.Thread(target=run, name="forklift-job-watcher", daemon=True)
    thread.start()
    return thread

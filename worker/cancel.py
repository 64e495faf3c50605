"""Cancelling a running job hits that job and no other.

`revoke(terminate=True)` signals whatever the child runs *now*, which may already be the next
job. Instead each child watches the cancel channel itself and interrupts only the job it is
running, identified by id, at the moment the message arrives: SIGUSR2 to its own main thread
raises `JobCancelled` between bytecodes; if the job is stuck in C code (a long NumPy call)
and does not stop within the grace period, the child kills itself and the pool refills. The
redelivered message then finds the record `cancelled` and is dropped.

The same thread sweeps the child's kept mappings (shared/arrays/mappings.py) every few
seconds, so a child sitting idle does not keep freed segments' memory allocated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

from shared.arrays import mappings
from shared.redis_io import sync_redis
from worker.runtime import runtime

log = logging.getLogger("forklift.worker")


class JobCancelled(BaseException):
    """Raised inside a cancelled job (a BaseException, so `except Exception` cannot eat it)."""


_lock = threading.Lock()
_current: str | None = None  # the job this process is running (watching), if any
_cancelled: str | None = None  # set by the watcher when _current was cancelled
_armed = False  # True while the job's own code runs: only then may a signal interrupt it


def _on_sigusr2(signum: int, frame: object) -> None:
    with _lock:
        hit = _armed and _current is not None and _current == _cancelled
    if hit:
        raise JobCancelled(_current)


def _kill_if_still_running(job_id: str, grace: float) -> None:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.1)
        with _lock:
            if _current != job_id or not _armed:
                return
    log.warning("job %s ignored cancellation for %.0f s; ending its process", job_id, grace)
    os.kill(os.getpid(), signal.SIGKILL)


def _interrupt(job_id: str, grace: float) -> None:
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR2)
    threading.Thread(target=_kill_if_still_running, args=(job_id, grace), daemon=True).start()


def _on_cancel(job_id: str, grace: float) -> None:
    global _cancelled
    with _lock:
        if job_id != _current:
            return
        _cancelled = job_id
        armed = _armed
    if armed:
        _interrupt(job_id, grace)


def _watch() -> None:
    rt = runtime()
    channel = rt.jobs.cancel_channel
    while True:
        try:
            client = sync_redis(rt.settings, socket_timeout=None)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel)
            next_sweep = time.monotonic() + mappings.SWEEP_INTERVAL_S
            while True:
                message = pubsub.get_message(timeout=mappings.SWEEP_INTERVAL_S)
                if message is not None:
                    _on_cancel(message.get("data"), rt.settings.job_kill_grace)
                if time.monotonic() >= next_sweep:
                    mappings.sweep()  # an fstat per kept mapping
                    next_sweep = time.monotonic() + mappings.SWEEP_INTERVAL_S
        except Exception as exc:  # reconnect after Redis restarts
            log.debug("cancel watcher reconnecting: %s", exc)
            time.sleep(1)


def install() -> None:
    """Run in each child right after the fork."""
    signal.signal(signal.SIGUSR2, _on_sigusr2)
    mappings.close_in_background()  # the jobs' sweeps never wait for an unmap
    threading.Thread(target=_watch, name="forklift-cancel-watch", daemon=True).start()


@contextlib.contextmanager
def watching(job_id: str) -> Iterator[None]:
    """From before the job's start until its end, a cancel of `job_id` is noted.

    Watching begins before the record turns `running` (when the API can first publish a
    cancel for it), so no cancel falls between the start and the job's code.
    """
    global _current, _cancelled, _armed
    with _lock:
        _current, _cancelled, _armed = job_id, None, False
    try:
        yield
    finally:
        with _lock:
            _current = _cancelled = None
            _armed = False


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """While the job's own code runs, a cancel interrupts it (or one noted earlier does now)."""
    global _armed
    with _lock:
        _armed = True
        already = _current is not None and _current == _cancelled
    try:
        if already:
            raise JobCancelled(_current)
        yield
    finally:
        with _lock:
            _armed = False

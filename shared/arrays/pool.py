"""Recycled segments: freed pages stay allocated for the next array of a similar size.

A fresh segment costs the kernel zeroing every page (about 0.45 s per GiB here), three times
what copying the bytes into it costs. Ray's object store is fast because its memory is
already faulted in; forklift gets the same by renaming a freed segment into the pool
(`<prefix>pool_<hex>`) instead of unlinking it, and renaming it back out for the next upload
or job result that needs at most its size. Bounded by `FORKLIFT_SHM_POOL_BYTES`; the janitor
unlinks what sat unused for a while, and the API and workers empty it when they stop.

Only writers that overwrite every byte before the array becomes visible take from the pool
(uploads, which fail unless complete, job results, and same-host clients that registered
with `recycle`, whose commit is their promise to have done so), so old contents are never
shown. Renames are atomic: two processes claiming the same segment cannot both win.

A rename keeps the inode, so a process that mapped the segment before still has a valid
mapping of it: `claim` attaches through the mapping cache (mappings.py), and a process that
wrote into this segment before copies into memory it has mapped already (no page faults).
When the pool unlinks segments (full, trimmed, drained), this process's kept mappings of them
are swept at once; other processes sweep their own.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass

from shared.arrays import mappings
from shared.arrays.segments import SHM_DIR, Segment, ensure_allocated, unlink_segment
from shared.settings import Settings

POOL_MARK = "pool_"
MIN_POOLED = 4 << 20  # small segments are cheap to allocate; not worth keeping
MAX_SLACK = 2  # a pooled segment serves arrays of at least 1/MAX_SLACK of its size


@dataclass(frozen=True)
class Pooled:
    name: str
    size: int
    since: float  # when it entered the pool (rename sets ctime)


def pool_prefix(settings: Settings) -> str:
    return settings.shm_prefix + POOL_MARK


def pooled(settings: Settings) -> list[Pooled]:
    """The pool's segments, oldest first."""
    prefix = pool_prefix(settings)
    entries = []
    with contextlib.suppress(FileNotFoundError), os.scandir(SHM_DIR) as listing:
        for entry in listing:
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    entries.append(Pooled(entry.name, stat.st_size, stat.st_ctime))
    return sorted(entries, key=lambda p: p.since)


def release(name: str, settings: Settings) -> None:
    """Free a segment whose record is gone: into the pool if it fits, else unlink it."""
    limit = settings.shm_pool_limit
    try:
        size = os.stat(SHM_DIR / name).st_size
    except FileNotFoundError:
        return
    try:
        if limit <= 0 or size < MIN_POOLED or size > limit:
            unlink_segment(name)
            return
        entries = pooled(settings)
        total = sum(p.size for p in entries)
        while entries and total + size > limit:
            oldest = entries.pop(0)
            if unlink_segment(oldest.name):
                total -= oldest.size
        target = f"{pool_prefix(settings)}{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(SHM_DIR / name, SHM_DIR / target)
    finally:
        mappings.sweep()  # this process's mappings of what was unlinked pin its memory


def take(name: str, size: int, settings: Settings) -> bool:
    """Rename a fitting pooled segment to `name`, cut to exactly `size` bytes; False if none.

    Nothing is mapped: for a caller that hands the segment to another process (a same-host
    client's registration). `name` must not exist (a rename would replace it). The segment
    still holds a previous array's bytes; whoever fills it must overwrite every one. Every
    page is allocated (ShmFullError if /dev/shm cannot), so writing it cannot SIGBUS.
    """
    if settings.shm_pool_limit <= 0 or size < MIN_POOLED:
        return False
    # Smallest fit first; among equal sizes the most recently freed: whoever used it last
    # (a client in a put/delete loop, a worker child) most likely still has it mapped.
    fitting = sorted(
        (p for p in pooled(settings) if size <= p.size <= size * MAX_SLACK),
        key=lambda p: (p.size, -p.since),
    )
    for candidate in fitting:
        try:
            os.rename(SHM_DIR / candidate.name, SHM_DIR / name)
        except FileNotFoundError:
            continue  # another process took it first
        try:
            if candidate.size != size:
                os.truncate(SHM_DIR / name, size)
            ensure_allocated(name, size)  # a no-op unless a client left it sparse
        except BaseException:
            unlink_segment(name)
            raise
        return True
    return False


def claim(name: str, size: int, settings: Settings) -> Segment | None:
    """A pooled segment renamed to `name`, cut to `size`, mapped writable; None if none fits.

    Mapped through this process's mapping cache: if it mapped this segment writable before
    (it wrote an earlier array into it), the pages are mapped already and nothing faults.
    """
    if not take(name, size, settings):
        return None
    try:
        return mappings.attach(name, size, writable=True)
    except BaseException:
        unlink_segment(name)
        raise


def trim(settings: Settings, idle_s: float) -> int:
    """Unlink pooled segments unused for `idle_s` seconds; returns how many."""
    cutoff = time.time() - idle_s
    count = sum(1 for p in pooled(settings) if p.since < cutoff and unlink_segment(p.name))
    if count:
        mappings.sweep()
    return count


def drain(settings: Settings) -> int:
    """Empty the pool (a stopping API or worker gives the memory back, kept mappings too)."""
    count = sum(1 for p in pooled(settings) if unlink_segment(p.name))
    mappings.clear()
    return count

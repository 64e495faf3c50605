"""Recycled segments: freed pages stay allocated for the next array of a similar size.

A fresh segment costs the kernel zeroing every page (about 0.45 s per GiB here), three times
what copying the bytes into it costs. Ray's object store is fast because its memory is
already faulted in; forklift gets the same by renaming a freed segment into the pool
(`<prefix>pool_<owner tag>_<hex>`) instead of unlinking it, and renaming it back out for the
next upload or job result that needs at most its size. Bounded by `FORKLIFT_SHM_POOL_BYTES`;
the janitor unlinks what sat unused for a while, and the API and workers empty it when they
stop.

Who may get which bytes back. A pooled segment still holds the freed array's bytes, and its
name carries a tag of that array's owner (a digest of the API key, `open` without keys):
- writers that overwrite every byte before the array becomes visible (uploads, which fail
  and are unlinked unless complete, and job results) take any owner's segment: nobody ever
  sees the old bytes;
- a same-host registration with `recycle` hands the segment itself to the client, who can
  read it before writing, so it only ever gets a segment its own key freed (`take(owner=)`):
  at worst it reads bytes it wrote. A segment goes back into the pool tagged with an owner
  only when every byte in it is that owner's (failed uploads and results are unlinked).
Renames are atomic: two processes claiming the same segment cannot both win.

/dev/shm is world-writable, so every file the pool looks at is opened with O_NOFOLLOW and
checked on its descriptor (regular, our uid, mode 0600, one link: `segments.open_own`) before
it is renamed, cut or handed out; a planted file (a sparse `pool_` file of another user, a
symlink to something the stack may write) is logged once and left untouched.

A rename keeps the inode, so a process that mapped the segment before still has a valid
mapping of it: `claim` attaches through the mapping cache (mappings.py), and a process that
wrote into this segment before copies into memory it has mapped already (no page faults).
When the pool unlinks segments (full, trimmed, drained), this process's kept mappings of them
are swept at once; other processes sweep their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from dataclasses import dataclass

from shared.arrays import mappings
from shared.arrays.segments import (
    SHM_DIR,
    ForeignFile,
    Segment,
    ensure_allocated,
    foreign_reason,
    open_own,
    report_foreign,
    unlink_own,
    unlink_segment,
)
from shared.settings import Settings

POOL_MARK = "pool_"
MIN_POOLED = 4 << 20  # small segments are cheap to allocate; not worth keeping
MAX_SLACK = 2  # a pooled segment serves arrays of at least 1/MAX_SLACK of its size
OPEN_TAG = "open"  # the owner tag when the API runs without keys


@dataclass(frozen=True)
class Pooled:
    name: str
    size: int
    since: float  # when it entered the pool (rename sets ctime)
    tag: str  # owner_tag() of the array it held; '' if the name carries none


def pool_prefix(settings: Settings) -> str:
    return settings.shm_prefix + POOL_MARK


def owner_tag(owner: str) -> str:
    """The part of a pooled segment's name that says whose bytes it holds (a digest)."""
    return hashlib.sha256(owner.encode()).hexdigest()[:24] if owner else OPEN_TAG


def pooled(settings: Settings) -> list[Pooled]:
    """The pool's segments, oldest first; files that are not ours are logged and skipped."""
    prefix = pool_prefix(settings)
    entries = []
    with contextlib.suppress(FileNotFoundError), os.scandir(SHM_DIR) as listing:
        for entry in listing:
            if not entry.name.startswith(prefix):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            reason = foreign_reason(info)
            if reason is not None:
                report_foreign(f"{entry.name}: {reason}")
                continue
            rest = entry.name[len(prefix) :]
            tag = rest.split("_", 1)[0] if "_" in rest else ""
            entries.append(Pooled(entry.name, info.st_size, info.st_ctime, tag))
    return sorted(entries, key=lambda p: p.since)


def release(name: str, settings: Settings, *, owner: str) -> None:
    """Free a segment whose record is gone: into the pool if it fits, else unlink it.

    `owner` is the freed array's owner: the pooled name carries its tag. A segment that is
    sparse (a client only ftruncated it) is unlinked rather than pooled. A file under
    `name` that is not ours is left alone.
    """
    limit = settings.shm_pool_limit
    try:
        fd, info = open_own(name)
    except FileNotFoundError:
        return
    except ForeignFile as exc:
        report_foreign(exc)
        return
    try:
        size = info.st_size
        allocated = info.st_blocks * 512 >= size
        if limit <= 0 or size < MIN_POOLED or size > limit or not allocated:
            unlink_segment(name)
            return
        entries = pooled(settings)
        total = sum(p.size for p in entries)
        while entries and total + size > limit:
            oldest = entries.pop(0)
            if unlink_own(oldest.name):
                total -= oldest.size
        target = f"{pool_prefix(settings)}{owner_tag(owner)}_{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(SHM_DIR / name, SHM_DIR / target)
    finally:
        os.close(fd)
        mappings.sweep()  # this process's mappings of what was unlinked pin its memory


def take(name: str, size: int, settings: Settings, *, owner: str | None = None) -> bool:
    """Rename a fitting pooled segment to `name`, cut to exactly `size` bytes; False if none.

    `owner`: only a segment that this owner's array freed (a registration, whose client
    reads the segment); None: any (a writer that overwrites every byte before anyone sees
    it). Nothing is mapped: for a caller that hands the segment to another process. `name`
    must not exist (a rename would replace it). Every page is allocated (ShmFullError if
    /dev/shm cannot), so writing it cannot SIGBUS.
    """
    if settings.shm_pool_limit <= 0 or size < MIN_POOLED:
        return False
    tag = None if owner is None else owner_tag(owner)
    # Smallest fit first; among equal sizes the most recently freed: whoever used it last
    # (a client in a put/delete loop, a worker child) most likely still has it mapped.
    fitting = sorted(
        (
            p
            for p in pooled(settings)
            if size <= p.size <= size * MAX_SLACK and (tag is None or p.tag == tag)
        ),
        key=lambda p: (p.size, -p.since),
    )
    return any(_take_one(candidate.name, name, size) for candidate in fitting)  # first win


def _take_one(pooled_name: str, name: str, size: int) -> bool:
    """Rename one pooled segment to `name` and cut it, all checked on one descriptor."""
    try:
        fd, info = open_own(pooled_name, writable=True)
    except FileNotFoundError:
        return False  # another process took it first
    except ForeignFile as exc:
        report_foreign(exc)
        return False
    try:
        if not size <= info.st_size <= size * MAX_SLACK:
            return False
        try:
            os.rename(SHM_DIR / pooled_name, SHM_DIR / name)
        except FileNotFoundError:
            return False
        moved = os.lstat(SHM_DIR / name)
        if (moved.st_dev, moved.st_ino) != (info.st_dev, info.st_ino):
            # Not the file checked (the name was replaced in between): give it its name back.
            with contextlib.suppress(OSError):
                os.rename(SHM_DIR / name, SHM_DIR / pooled_name)
            report_foreign(f"{pooled_name}: replaced while it was being taken")
            return False
        try:
            if info.st_size != size:
                os.ftruncate(fd, size)  # on the descriptor: never through a symlink
            ensure_allocated(name, size, fd)  # a no-op unless it was left sparse
        except BaseException:
            unlink_own(name)
            raise
        return True
    finally:
        os.close(fd)


def claim(name: str, size: int, settings: Settings) -> Segment | None:
    """A pooled segment renamed to `name`, cut to `size`, mapped writable; None if none fits.

    Any owner's segment: for writers that fill every byte before the array is visible.
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
    count = sum(1 for p in pooled(settings) if p.since < cutoff and unlink_own(p.name))
    if count:
        mappings.sweep()
    return count


def drain(settings: Settings) -> int:
    """Empty the pool (a stopping API or worker gives the memory back, kept mappings too)."""
    count = sum(1 for p in pooled(settings) if unlink_own(p.name))
    mappings.clear()
    return count

"""Kept mappings: each process maps a segment once and reuses that mapping, as Ray does.

Mapping a segment is cheap; touching its pages the first time is not. For 1 GiB here, a
fresh read-only mapping costs ~90 ms of page faults before a 42 ms sum, and a fresh writable
one ~250 ms of MADV_POPULATE_WRITE before an 86 ms copy. Ray's object store is fast because
every process maps the store once and keeps the mapping. forklift gets the same with this
cache and the segment pool (pool.py): recycling a segment renames it, and a rename keeps the
inode, so a process that mapped it once finds its mapping here, keyed by (st_dev, st_ino,
writable), under whatever name the segment has now.

The memory consequence: a kept mapping of a segment that was unlinked (freed with the pool
off or full, trimmed from the pool, expired) keeps its pages allocated until the mapping
goes, invisible in /dev/shm. `sweep()` drops those (one fstat per entry, microseconds); it
runs on every miss here, after each job in a worker child and every few seconds while the
child is idle, every few seconds in the API and whenever the pool frees memory, and on each
client put or delete. Entries are bounded (LRU, `MAX_ENTRIES`). A view is never longer than
the file is at attach time, so a segment shrunk since it was mapped cannot SIGBUS through it.

Unmapping the last mapping of an unlinked segment frees its pages, which costs about as
much as faulting them in (0.1-1.1 s per GiB measured on the 2-core VM, whose freed pages go
back to the host). A worker child sweeps on its jobs' path (an input's first attach, after
the job), so there `close_in_background()` hands the dropped mappings to a thread of their
own: the memory goes a moment later, the job does not wait for it (munmap releases the GIL).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from shared.arrays.segments import (
    Segment,
    attach_segment,
    create_segment,
    open_segment,
    prefault,
)

log = logging.getLogger("forklift.mappings")

MAX_ENTRIES = 32
# How often an idle process (worker child, API) sweeps: how long a freed segment's memory may
# outlive it at most.
SWEEP_INTERVAL_S = 5.0
# Below this a fresh mapping costs microseconds: not worth an entry (and an fd) that would push
# a big segment's mapping out of the LRU.
MIN_BYTES = 1 << 20

_Key = tuple[int, int, bool]  # (st_dev, st_ino, writable)


@dataclass(eq=False)
class _Entry:
    key: _Key
    fd: int  # kept open so sweep() can fstat the inode whatever its name is now
    mapping: mmap.mmap
    used: int  # bytes of the latest view handed out


class MappingCache:
    """Per-process mappings of segments, reused across attaches by inode; thread-safe."""

    def __init__(self, max_entries: int = MAX_ENTRIES, min_bytes: int = MIN_BYTES) -> None:
        self.max_entries = max_entries
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._closer: _Closer | None = None  # close_in_background(): unmaps off the caller
        self.mapped = 0  # mmaps this cache has made or adopted (for tests and stats)
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def attach(self, name: str, size: int, *, writable: bool = False) -> Segment:
        """A Segment of `size` bytes over this process's kept mapping of `name`'s inode.

        Same checks as `attach_segment`. A hit maps nothing and faults nothing; a miss maps
        the whole file (writable mappings populated at once, like `create_segment`) and keeps
        it. Closing the Segment releases only its view. Segments under `min_bytes` get a
        plain `attach_segment` mapping of their own.
        """
        if type(size) is int and 0 <= size < self.min_bytes:  # bad sizes: open_segment says
            return attach_segment(name, size, writable=writable)
        fd, info = open_segment(name, size, writable=writable)
        key = (info.st_dev, info.st_ino, writable)
        needed = max(size, 1)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and len(entry.mapping) >= needed and not entry.mapping.closed:
                self._entries.move_to_end(key)
                entry.used = needed
                self.hits += 1
                os.close(fd)
                return _segment(name, size, entry.mapping, writable)
        try:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            mapping = mmap.mmap(fd, info.st_size, access=access)
        except BaseException:
            os.close(fd)
            raise
        if writable:
            prefault(mapping)  # outside the lock: ~0.25 s/GiB
        segment = _segment(name, size, mapping, writable)  # not shared yet: nothing evicts it
        self.sweep()  # a good moment to let go of dead mappings
        self._keep(_Entry(key, fd, mapping, needed))
        return segment

    def create(self, name: str, size: int) -> Segment:
        """`create_segment(name, size)`, its mapping kept for when the segment is reused."""
        segment = create_segment(name, size)  # checks name and size
        if size < self.min_bytes:
            return segment
        try:
            fd, info = open_segment(name, size, writable=True)
        except OSError:
            return segment  # renamed or unlinked already: not worth keeping
        assert segment._mmap is not None
        segment.owns_mapping = False
        self._keep(_Entry((info.st_dev, info.st_ino, True), fd, segment._mmap, max(size, 1)))
        return segment

    def _keep(self, entry: _Entry) -> None:
        """Insert `entry`, replacing one of the same key, evicting the least recently used."""
        dropped: list[_Entry] = []
        with self._lock:
            old = self._entries.pop(entry.key, None)
            if old is not None:
                dropped.append(old)
            self._entries[entry.key] = entry
            self.mapped += 1
            while len(self._entries) > self.max_entries:
                dropped.append(self._entries.popitem(last=False)[1])
        self._drop(dropped)

    def sweep(self) -> int:
        """Drop mappings of unlinked or shrunk segments; returns how many went.

        Unlinked (st_nlink 0): the mapping is all that keeps the memory allocated. Shrunk
        below the latest view: that view's tail is gone; a new attach maps afresh.
        """
        dropped: list[_Entry] = []
        with self._lock:
            for key, entry in list(self._entries.items()):
                try:
                    info = os.fstat(entry.fd)
                except OSError:
                    gone = True
                else:
                    gone = info.st_nlink == 0 or info.st_size < entry.used
                if gone:
                    del self._entries[key]
                    dropped.append(entry)
        self._drop(dropped)
        return len(dropped)

    def close_in_background(self) -> None:
        """From now on, mappings that sweeps and evictions drop are unmapped by a thread.

        For a process whose sweeps sit on a latency path (a worker child); `clear()` still
        unmaps at once. Undone in a forked child, which has no such thread.
        """
        with self._lock:
            if self._closer is None:
                self._closer = _Closer()

    def _drop(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        closer = self._closer
        if closer is None:
            _close(entries)
        else:
            closer.put(entries)

    def clear(self) -> None:
        """Drop every kept mapping (a stopping process, tests)."""
        with self._lock:
            dropped = list(self._entries.values())
            self._entries.clear()
        _close(dropped)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it
        closer, self._closer = self._closer, None
        if closer is not None:  # its thread did not come along: unmap what it had left
            _close(closer.take_all())


class _Closer:
    """A daemon thread that unmaps dropped mappings handed to it, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[_Entry] = []
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="forklift-unmap", daemon=True).start()

    def put(self, entries: list[_Entry]) -> None:
        with self._lock:
            self._pending.extend(entries)
        self._wake.set()

    def take_all(self) -> list[_Entry]:
        with self._lock:
            entries, self._pending = self._pending, []
        return entries

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            _close(self.take_all())


def _segment(name: str, size: int, mapping: mmap.mmap, writable: bool) -> Segment:
    return Segment(name, size, mapping, readonly=not writable, owns_mapping=False)


def _close(entries: list[_Entry]) -> None:
    """Close fds and unmap; a mapping NumPy views still use is unmapped by GC after them."""
    for entry in entries:
        try:
            os.close(entry.fd)
        except OSError as exc:
            log.debug("closing a kept mapping's fd: %s", exc)
        with contextlib.suppress(BufferError):  # views alive: unmapped when they are gone
            entry.mapping.close()


cache = MappingCache()
os.register_at_fork(after_in_child=cache._after_fork)

close_in_background = cache.close_in_background

attach = cache.attach
create = cache.create
sweep = cache.sweep
clear = cache.clear

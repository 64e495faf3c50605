"""Named POSIX shared-memory segments, created and attached without resource_tracker.

Python 3.11's `multiprocessing.shared_memory.SharedMemory` registers every segment it opens,
even one merely attached, with `resource_tracker`, which unlinks it when that process exits
(CPython gh-82300). Celery recycles worker children, so an input would vanish under the jobs
still queued on it. This module therefore never uses `SharedMemory`: it calls `_posixshmem`
(what CPython uses underneath) and `mmap` directly. A segment's lifetime belongs to the array
registry, which decides when to call `unlink_segment`; no process exit ever removes one.
"""

from __future__ import annotations

import _posixshmem
import errno
import logging
import math
import mmap
import os
import re
import stat
from pathlib import Path
from types import TracebackType

import numpy as np

from shared.arrays.npy import check_dtype

log = logging.getLogger("forklift.segments")

SHM_DIR = Path("/dev/shm")
SEGMENT_MODE = 0o600  # what create_segment makes; anything else in /dev/shm is not ours
# Kernel limit is NAME_MAX (255); stay well inside it.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,250}")
_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,50}")
_SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,200}")
_MAX_SIZE = 2**63 - 1
# Linux >= 5.14; Python 3.11's mmap module does not export the constant yet.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_populate_write_supported = True


class ShmFullError(OSError):
    """Shared memory cannot take `nbytes` more: the domain's cap is reached, or /dev/shm
    itself has no room (ENOSPC/ENOMEM). A domain error: the API answers 507 `shm_full`, a
    job's result or a pull fails with this message. One message whatever the cause, which
    `why` completes."""

    def __init__(self, nbytes: int, why: str, code: int = errno.ENOSPC) -> None:
        super().__init__(code, f"shared memory full: no room for {nbytes} more bytes ({why})")
        self.nbytes = nbytes

    @classmethod
    def over_cap(cls, nbytes: int, used: int, limit: int) -> ShmFullError:
        """The domain's reservations would pass FORKLIFT_SHM_LIMIT_BYTES."""
        return cls(nbytes, f"{used} of the cap of {limit} in use; delete arrays or wait")

    def __str__(self) -> str:
        return str(self.strerror)


class ForeignFile(Exception):
    """A file in /dev/shm with a segment's name that this stack did not make (or may not use).

    /dev/shm is world-writable: another local user can plant a file, a FIFO or a symlink
    under any name that is free. Whatever the pool or the janitor would do to such a file
    (rename it, truncate it, fill it with an array, unlink it) is refused instead.
    """


class Segment:
    """An open mapping of a named segment; `buffer` is a memoryview of its `size` bytes.

    Closing drops the mapping. If NumPy views of `buffer` are still alive, the mapping stays
    until the last of them is gone (unmapping under them would crash the process), so
    `close()` never fails; it reports whether it unmapped right away. A segment handed out
    by the mapping cache (shared/arrays/mappings.py) has `owns_mapping=False`: closing it
    releases only its own view, and the cache keeps the mapping for the next attach.
    """

    def __init__(
        self,
        name: str,
        size: int,
        mapping: mmap.mmap,
        *,
        readonly: bool,
        owns_mapping: bool = True,
    ) -> None:
        self.name = name
        self.size = size
        self.readonly = readonly
        self.owns_mapping = owns_mapping
        self._mmap: mmap.mmap | None = mapping
        # The mapping is at least 1 byte (mmap refuses 0); a 0-byte array sees an empty slice.
        self.buffer: memoryview = memoryview(mapping)[:size]

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._mmap is None

    def close(self) -> bool:
        """Release the view and the mapping; True if unmapped now, False if views delay it.

        A segment that does not own its mapping never unmaps: True once its view is released.
        """
        if self._mmap is None:
            return True
        mapping, self._mmap = self._mmap, None
        try:
            self.buffer.release()
            if self.owns_mapping:
                mapping.close()
            released = True
        except BufferError:
            released = False  # arrays still use it; mmap unmaps when they are garbage
        self.buffer = memoryview(b"")
        return released

    def __enter__(self) -> Segment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        state = "closed" if self.closed else "open"
        return f"<Segment {self.name} {self.size} bytes {mode} {state}>"


def validate_segment_name(name: str, prefix: str) -> str:
    """Check a segment name that arrived from outside; return it unchanged.

    Only `prefix` followed by 1-200 of [A-Za-z0-9_-] passes, so no path, no '..', no other
    application's segment can be named.
    """
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ValueError(f"bad segment prefix {prefix!r}: use 1-50 of [A-Za-z0-9_-]")
    if not isinstance(name, str) or not name.startswith(prefix):
        raise ValueError(f"segment name {name!r} refused: it must start with {prefix!r}")
    if not _SUFFIX.fullmatch(name[len(prefix) :]):
        raise ValueError(
            f"segment name {name!r} refused: after {prefix!r} only 1-200 letters, digits, "
            "'_' or '-' are allowed"
        )
    return name


def segment_path(name: str) -> Path:
    """Where the segment shows up on Linux (for listing, stats and debugging)."""
    return SHM_DIR / _check_name(name)


def create_segment(name: str, size: int, *, allocate: bool = True) -> Segment:
    """Create a new segment of `size` bytes, its memory allocated up front, mapped writable.

    Allocation strategy, measured with bench/fill_strategies.py (2-core VM, Linux 6.x, two runs
    of medians of 5; GB/s for create + fill by 1 MiB slice assignments, 16 MiB / 256 MiB / 1 GiB):
        ftruncate only (sparse)          1.4-1.5 / 1.5-1.7 / 1.3-1.5  full /dev/shm = SIGBUS later
        fallocate                        1.5-1.6 / 1.7-1.8 / 1.6-1.9  256 write faults/MiB left
        fallocate + MAP_POPULATE         1.6     / 1.6-1.7 / 1.7      slower to create
        fallocate + MADV_POPULATE_WRITE  1.8     / 2.0     / 2.1      chosen: fastest, 0 faults
    Receiving from a socketpair (recv_into) is noisier, 1.2-1.75 GB/s; the chosen one was best
    in 5 of 6 cells.
    Page allocation dominates: for 1 GiB, create takes ~0.46 s and the copy ~0.06 s.
    With `allocate=False` the segment is sparse: the caller must `allocate_pages` each range
    before writing it (an upload does so in a thread, ahead of the bytes arriving, so the
    kernel zeroes pages while the network delivers).
    posix_fallocate is not optional: it turns a full /dev/shm into ENOSPC here (ShmFullError)
    instead of SIGBUS in the middle of a later write. MADV_POPULATE_WRITE then maps every page
    with one syscall instead of one fault per 4 KiB page.
    """
    _check_name(name)
    _check_size(size)
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        if allocate:
            _allocate(fd, name, max(size, 1))
        else:
            os.ftruncate(fd, max(size, 1))
        mapping = mmap.mmap(fd, max(size, 1))
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        os.close(fd)
    if allocate:
        prefault(mapping)
    return Segment(name, size, mapping, readonly=False)


def allocate_pages(segment: Segment, start: int, stop: int) -> None:
    """Allocate and map pages [start, stop) of a sparse segment before anything writes there.

    Safe to call from a thread: both syscalls release the GIL. ShmFullError when /dev/shm is
    full, which a write into unallocated pages would have turned into SIGBUS.
    """
    if segment._mmap is None or segment.readonly:
        raise ValueError(f"segment {segment.name} is not open for writing")
    length = min(stop, max(segment.size, 1)) - start
    if length <= 0:
        return
    fd = _posixshmem.shm_open("/" + segment.name, os.O_RDWR, 0)
    try:
        _allocate(fd, segment.name, length, offset=start)
    finally:
        os.close(fd)
    page = mmap.PAGESIZE
    aligned = start - start % page
    prefault(segment._mmap, aligned, length + start - aligned)


def _allocate(fd: int, name: str, size: int, offset: int = 0) -> None:
    """Reserve every page now, so that running out of memory is an error and not a SIGBUS."""
    try:
        os.posix_fallocate(fd, offset, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise ShmFullError(
                size, f"segment {name}: {_free_bytes()} bytes free in {SHM_DIR}", exc.errno
            ) from None
        raise


def prefault(mapping: mmap.mmap, start: int = 0, length: int = 0) -> None:
    """Map pages into this process in one call; a speed-up only, so failures are ignored."""
    global _populate_write_supported
    if not _populate_write_supported:
        return
    try:
        mapping.madvise(_MADV_POPULATE_WRITE, start, length or len(mapping) - start)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # kernel older than 5.14: stop trying
            _populate_write_supported = False


def _free_bytes() -> int:
    """Free bytes in /dev/shm, for error messages."""
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return -1
    return stats.f_bavail * stats.f_frsize


def open_segment(name: str, size: int, *, writable: bool = False) -> tuple[int, os.stat_result]:
    """(fd, fstat) of an existing segment that holds at least `size` bytes; the caller closes fd.

    The checks every attach makes: a plain name, a sane size, and a file at least as long as
    the registry's record says (a view past the end of the file would SIGBUS on access).
    FileNotFoundError propagates when it is gone.
    """
    _check_name(name)
    _check_size(size)
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR if writable else os.O_RDONLY, 0)
    try:
        info = os.fstat(fd)
        needed = max(size, 1)
        if info.st_size < needed:
            raise ValueError(
                f"segment {name} is smaller than its record says ({info.st_size} bytes,"
                f" need {needed})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def attach_segment(name: str, size: int, *, writable: bool = False) -> Segment:
    """Map an existing segment; read-only unless `writable`, and never tracked.

    Read-only uses O_RDONLY and PROT_READ, so the memoryview and any array over it are
    read-only for real. The segment must hold at least `size` bytes (the registry's record);
    FileNotFoundError propagates when it is gone. A fresh mapping every call: to reuse one
    across calls, see shared/arrays/mappings.py.
    """
    fd, _ = open_segment(name, size, writable=writable)
    try:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mapping = mmap.mmap(fd, max(size, 1), access=access)
    finally:
        os.close(fd)
    return Segment(name, size, mapping, readonly=not writable)


def ensure_allocated(name: str, size: int, fd: int | None = None) -> None:
    """Allocate any page of the segment's first `size` bytes that has none yet.

    A segment somebody else created may be sparse (a client may ftruncate instead of
    fallocate); writing into it, or reading a hole through a mapping, could then SIGBUS on a
    full /dev/shm. One fstat tells whether every page is there already (st_blocks), so the
    usual fully allocated case costs nothing. `fd`: an open, writable descriptor of it.
    """
    _check_name(name)
    _check_size(size)
    own = fd is None
    if fd is None:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0)
    try:
        if os.fstat(fd).st_blocks * 512 < max(size, 1):
            _allocate(fd, name, max(size, 1))
    finally:
        if own:
            os.close(fd)


def foreign_reason(info: os.stat_result) -> str | None:
    """Why a file is not one of this stack's segments, or None if it may be one.

    Ours means: a regular file (no FIFO, socket or symlink), owned by this process's uid,
    mode exactly 0600 (nobody else can open it) and one link (no hard link elsewhere that
    would keep, or expose, its pages under another name).
    """
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by the stack's uid {os.geteuid()}"
    if stat.S_IMODE(info.st_mode) != SEGMENT_MODE:
        return f"mode {stat.S_IMODE(info.st_mode):04o}, not {SEGMENT_MODE:04o}"
    if info.st_nlink != 1:
        return f"{info.st_nlink} hard links, not 1"
    return None


def open_own(name: str, *, writable: bool = False) -> tuple[int, os.stat_result]:
    """(fd, fstat) of segment `name`, opened without following a symlink and checked ours.

    Every decision about a file found in /dev/shm (pool, janitor, a client's registration)
    is made on this descriptor, never on the path again, so the file checked is the file
    used. ForeignFile when it is a symlink, not openable, or fails `foreign_reason`;
    FileNotFoundError when it is gone. The caller closes fd.
    """
    _check_name(name)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(SHM_DIR / name, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP (a symlink), EACCES (another user's), ENXIO (a socket)
        raise ForeignFile(f"{name}: cannot be opened as a segment ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        reason = foreign_reason(info)
        if reason is not None:
            raise ForeignFile(f"{name}: {reason}")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


_reported: set[str] = set()


def report_foreign(problem: ForeignFile | str) -> None:
    """Log a skipped foreign file once per process (a janitor pass every few seconds would
    otherwise repeat it forever); it is left exactly as it is."""
    text = str(problem)
    if text in _reported:
        return
    if len(_reported) > 10_000:
        _reported.clear()
    _reported.add(text)
    log.warning("skipping a file in %s that is not this stack's segment: %s", SHM_DIR, text)


def unlink_segment(name: str) -> bool:
    """Remove the segment's name; True if this call removed it, False if it was already gone.

    Processes that still map it keep their memory until they close it.
    """
    _check_name(name)
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


def unlink_reserved(name: str) -> None:
    """Remove whatever of the stack's uid is under a name the stack reserved (a segment, a
    client's file of a wrong mode, a hard link, a symlink: unlinking a name never touches
    what it points to); another uid's file is logged and left to its owner."""
    try:
        info = os.lstat(segment_path(name))
    except FileNotFoundError:
        return
    if info.st_uid != os.geteuid():
        report_foreign(f"{name}: owned by uid {info.st_uid}, left to its owner")
        return
    unlink_segment(name)


def unlink_own(name: str) -> bool:
    """Unlink `name` if it is a regular file of this uid (checked on its lstat); True if removed.

    For the pool and the janitors, which unlink what they find by listing /dev/shm. Mode and
    link count do not matter here (removing a name of ours neither shows nor changes any
    byte; an orphan with a loose mode is one more reason to remove it); a symlink, a FIFO,
    another user's file, or one that cannot be unlinked (immutable) is logged once and left
    as it is. It never raises for such a file, so one planted file cannot stop a pass.
    """
    try:
        info = os.lstat(segment_path(name))
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        reason = "not a regular file"
    elif info.st_uid != os.geteuid():
        reason = f"owned by uid {info.st_uid}, not by the stack's uid {os.geteuid()}"
    else:
        try:
            return unlink_segment(name)
        except OSError as exc:
            reason = f"cannot be unlinked ({exc.strerror})"
    report_foreign(f"{name}: {reason}")
    return False


def list_segments(prefix: str) -> list[str]:
    """Names of the segments in /dev/shm that start with `prefix`, sorted."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(prefix))


def ndarray_view(
    segment: Segment, dtype: np.dtype, shape: tuple[int, ...], order: str
) -> np.ndarray:
    """A zero-copy array over the segment; read-only segments give read-only arrays.

    The dtype goes through check_dtype first: an object array over raw bytes would
    dereference garbage pointers. Built with np.frombuffer, which holds a buffer export
    that pins the mapping; np.ndarray(buffer=...) does not (it releases the export and keeps
    only the mmap object), so Segment.close() would unmap memory under a live array.
    """
    dtype = check_dtype(dtype)
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes > len(segment.buffer):
        raise ValueError(
            f"array of {nbytes} bytes does not fit segment {segment.name} "
            f"({len(segment.buffer)} bytes{', closed' if segment.closed else ''})"
        )
    flat = np.frombuffer(segment.buffer, dtype=dtype, count=math.prod(shape))
    view: np.ndarray = flat.reshape(shape, order="F" if order == "F" else "C")
    return view  # a view: flat is contiguous


def _check_name(name: str) -> str:
    """Refuse anything that is not a plain segment name (no '/', no '..', no path)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad segment name {name!r}: use 1-250 of [A-Za-z0-9_-]")
    return name


def _check_size(size: int) -> int:
    """Sizes are byte counts a 64-bit off_t can hold."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"bad segment size {size!r}: need an int in [0, 2**63)")
    return size

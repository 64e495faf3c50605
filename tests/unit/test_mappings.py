"""Kept mappings (shared/arrays/mappings.py), pool.take/claim and the parallel copy.

Against the real /dev/shm; every test has its own prefix and its own MappingCache (the
module-level one is left alone except where pool.claim uses it, and cleared after).
"""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from shared.arrays import copying, mappings, pool
from shared.arrays.mappings import MappingCache
from shared.arrays.segments import (
    SHM_DIR,
    create_segment,
    list_segments,
    ndarray_view,
    unlink_segment,
)
from shared.settings import Settings


@pytest.fixture
def prefix() -> Iterator[str]:
    """A prefix unique to this test; fails the test if any of its segments survive it."""
    value = f"forklift_t{uuid.uuid4().hex[:8]}_"
    yield value
    mappings.clear()
    left = list_segments(value)
    for name in left:
        unlink_segment(name)
    assert left == [], f"test left segments behind: {left}"


@pytest.fixture
def cache() -> Iterator[MappingCache]:
    kept = MappingCache(max_entries=4, min_bytes=0)
    yield kept
    kept.clear()


def make(name: str, values: np.ndarray) -> None:
    with create_segment(name, values.nbytes) as segment:
        view = ndarray_view(segment, values.dtype, values.shape, "C")
        view[...] = values
        del view


def kept_mapping(cache: MappingCache, name: str, writable: bool = False) -> object:
    """The mmap object the cache keeps for `name`'s inode."""
    info = os.stat(SHM_DIR / name)
    return cache._entries[(info.st_dev, info.st_ino, writable)].mapping


def test_same_inode_reuses_the_mapping(prefix: str, cache: MappingCache) -> None:
    name = prefix + "a"
    make(name, np.arange(1000.0))
    first = cache.attach(name, 8000)
    mapping = first._mmap
    assert first.readonly and not first.owns_mapping
    assert np.array_equal(ndarray_view(first, np.dtype("f8"), (1000,), "C"), np.arange(1000.0))
    assert first.close() is True
    assert not mapping.closed, "closing the segment must leave the kept mapping alone"

    second = cache.attach(name, 4000)  # a smaller view of the same inode: still a hit
    assert second._mmap is mapping
    assert len(second.buffer) == 4000
    assert (cache.mapped, cache.hits) == (1, 1)
    second.close()
    unlink_segment(name)


def test_a_renamed_segment_still_hits(prefix: str, cache: MappingCache) -> None:
    name, renamed = prefix + "a", prefix + "pool_b"
    make(name, np.ones(100))
    cache.attach(name, 800).close()
    os.rename(SHM_DIR / name, SHM_DIR / renamed)
    again = cache.attach(renamed, 800)
    assert again._mmap is kept_mapping(cache, renamed)
    assert (cache.mapped, cache.hits) == (1, 1)
    assert again.name == renamed
    again.close()
    unlink_segment(renamed)


def test_writable_and_read_only_are_kept_apart(prefix: str, cache: MappingCache) -> None:
    name = prefix + "a"
    make(name, np.zeros(10))
    reader = cache.attach(name, 80)
    writer = cache.attach(name, 80, writable=True)
    assert reader._mmap is not writer._mmap
    assert reader.readonly and not writer.readonly
    ndarray_view(writer, np.dtype("f8"), (10,), "C")[:] = 5.0
    assert ndarray_view(reader, np.dtype("f8"), (10,), "C")[3] == 5.0  # same pages
    with pytest.raises(ValueError, match="read-only"):
        ndarray_view(reader, np.dtype("f8"), (10,), "C")[0] = 1.0
    reader.close()
    writer.close()
    assert cache.attach(name, 80, writable=True)._mmap is kept_mapping(cache, name, True)
    assert cache.attach(name, 80)._mmap is kept_mapping(cache, name, False)
    assert cache.mapped == 2
    gc.collect()
    unlink_segment(name)


def test_an_unlinked_segment_is_swept(prefix: str, cache: MappingCache) -> None:
    keep, gone = prefix + "keep", prefix + "gone"
    make(keep, np.ones(10))
    make(gone, np.ones(10))
    cache.attach(keep, 80).close()
    cache.attach(gone, 80).close()
    mapping = kept_mapping(cache, gone)
    assert len(cache) == 2
    unlink_segment(gone)
    assert cache.sweep() == 1
    assert len(cache) == 1
    assert mapping.closed, "the sweep unmaps what the unlinked segment's memory hung on"
    assert cache.sweep() == 0
    unlink_segment(keep)


def test_a_background_closer_unmaps_what_a_sweep_drops(prefix: str) -> None:
    """close_in_background (worker children): the sweep returns before the unmap, which
    still happens, in the closer's thread."""
    cache = MappingCache(max_entries=4, min_bytes=0)
    cache.close_in_background()
    gone = prefix + "gone"
    make(gone, np.ones(10))
    cache.attach(gone, 80).close()
    mapping = kept_mapping(cache, gone)
    unlink_segment(gone)
    assert cache.sweep() == 1 and len(cache) == 0
    deadline = time.monotonic() + 10
    while not mapping.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mapping.closed, "the closer thread never unmapped the dropped mapping"
    assert [t for t in threading.enumerate() if t.name == "forklift-unmap"]


def test_sweep_leaves_a_mapping_in_use_to_its_views(prefix: str, cache: MappingCache) -> None:
    name = prefix + "a"
    make(name, np.arange(10.0))
    segment = cache.attach(name, 80)
    mapping = segment._mmap
    view = ndarray_view(segment, np.dtype("f8"), (10,), "C")
    unlink_segment(name)
    assert cache.sweep() == 1 and len(cache) == 0
    segment.close()
    assert not mapping.closed  # the array still needs the memory
    assert view[9] == 9.0  # still mapped: no crash
    del view
    gc.collect()


def test_a_shrunk_segment_is_never_viewed_past_its_end(prefix: str, cache: MappingCache) -> None:
    name = prefix + "a"
    make(name, np.arange(1000.0))
    cache.attach(name, 8000).close()
    os.truncate(SHM_DIR / name, 4000)
    with pytest.raises(ValueError, match="smaller than its record says"):
        cache.attach(name, 8000)
    smaller = cache.attach(name, 4000)  # within the file: the kept mapping serves
    assert len(smaller.buffer) == 4000
    assert np.array_equal(ndarray_view(smaller, np.dtype("f8"), (500,), "C"), np.arange(500.0))
    smaller.close()
    assert cache.sweep() == 0  # the latest view fits the file
    os.truncate(SHM_DIR / name, 1000)
    assert cache.sweep() == 1 and len(cache) == 0  # shrunk below the latest view: dropped
    unlink_segment(name)


def test_a_grown_segment_is_mapped_again(prefix: str, cache: MappingCache) -> None:
    name = prefix + "a"
    make(name, np.zeros(10))
    cache.attach(name, 80).close()
    os.truncate(SHM_DIR / name, 800)
    bigger = cache.attach(name, 800)
    assert len(bigger.buffer) == 800 and cache.mapped == 2 and len(cache) == 1
    bigger.close()
    unlink_segment(name)


def test_entries_are_bounded_least_recently_used_first(prefix: str, cache: MappingCache) -> None:
    names = [f"{prefix}{i}" for i in range(6)]
    for name in names:
        make(name, np.ones(8))
    for name in names[:4]:
        cache.attach(name, 64).close()
    first = kept_mapping(cache, names[0])
    cache.attach(names[0], 64).close()  # used again: now the most recent
    cache.attach(names[4], 64).close()  # evicts names[1]
    cache.attach(names[5], 64).close()  # evicts names[2]
    assert len(cache) == 4
    held = {key[1] for key in cache._entries}
    inodes = {name: os.stat(SHM_DIR / name).st_ino for name in names}
    assert held == {inodes[n] for n in (names[0], names[3], names[4], names[5])}
    assert kept_mapping(cache, names[0]) is first
    cache.clear()
    assert len(cache) == 0 and first.closed
    for name in names:
        unlink_segment(name)


def test_create_keeps_the_new_mapping(prefix: str, cache: MappingCache) -> None:
    name = prefix + "a"
    segment = cache.create(name, 800)
    assert not segment.owns_mapping and not segment.readonly
    ndarray_view(segment, np.dtype("f8"), (100,), "C")[:] = 2.0
    mapping = segment._mmap
    segment.close()
    again = cache.attach(name, 800, writable=True)
    assert again._mmap is mapping and cache.hits == 1
    again.close()
    unlink_segment(name)


def test_small_segments_are_not_kept(prefix: str) -> None:
    small = MappingCache(min_bytes=1 << 20)
    name = prefix + "a"
    segment = small.create(name, 4096)
    assert segment.owns_mapping and len(small) == 0
    segment.close()
    again = small.attach(name, 4096, writable=True)
    assert again.owns_mapping and len(small) == 0 and small.mapped == 0
    again.close()
    unlink_segment(name)


def test_attach_refuses_what_attach_segment_refuses(prefix: str, cache: MappingCache) -> None:
    with pytest.raises(FileNotFoundError):
        cache.attach(prefix + "missing", 8)
    with pytest.raises(ValueError, match="bad segment name"):
        cache.attach("../etc/passwd", 8)
    for bad in (-1, "8", True, 2.0):
        for kept in (cache, MappingCache()):
            with pytest.raises(ValueError, match="bad segment size"):
                kept.attach(prefix + "a", bad)  # type: ignore[arg-type]


def test_concurrent_attaches_share_one_cache(prefix: str, cache: MappingCache) -> None:
    names = [f"{prefix}{i}" for i in range(3)]
    for i, name in enumerate(names):
        make(name, np.full(512, float(i)))
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for round_ in range(200):
                i = round_ % len(names)
                with cache.attach(names[i], 4096) as segment:
                    assert ndarray_view(segment, np.dtype("f8"), (512,), "C")[7] == float(i)
                if round_ % 50 == 0:
                    cache.sweep()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) == 3
    gc.collect()
    for name in names:
        unlink_segment(name)


# -- pool.take / pool.claim -----------------------------------------------------------------


def settings_for(prefix: str, pool_bytes: int = 64 << 20) -> Settings:
    return Settings(shm_prefix=prefix, shm_pool_bytes=pool_bytes)


def test_take_renames_a_fitting_pooled_segment_without_mapping_it(prefix: str) -> None:
    settings = settings_for(prefix)
    freed = prefix + "a" * 32
    size = pool.MIN_POOLED * 2
    make(freed, np.full(size // 8, 3.0))
    inode = os.stat(SHM_DIR / freed).st_ino
    pool.release(freed, settings, owner="")
    assert [p.size for p in pool.pooled(settings)] == [size]

    target = prefix + "b" * 32
    assert pool.take(target, size - 4096, settings) is True
    info = os.stat(SHM_DIR / target)
    assert (info.st_ino, info.st_size) == (inode, size - 4096)  # cut to exactly the ask
    assert pool.pooled(settings) == []
    assert pool.take(prefix + "c" * 32, size, settings) is False  # the pool is empty now
    unlink_segment(target)


def test_take_refuses_what_does_not_fit(prefix: str) -> None:
    settings = settings_for(prefix)
    freed = prefix + "a" * 32
    make(freed, np.zeros(pool.MIN_POOLED * 2 // 8))
    pool.release(freed, settings, owner="")
    target = prefix + "b" * 32
    assert pool.take(target, pool.MIN_POOLED * 4, settings) is False  # bigger than it
    assert pool.take(target, pool.MIN_POOLED // 2, settings) is False  # too small to pool
    assert pool.take(target, pool.MIN_POOLED, settings_for(prefix, 0)) is False  # pool off
    assert not (SHM_DIR / target).exists()
    assert pool.drain(settings) == 1


def test_take_allocates_a_sparse_pooled_segment(prefix: str) -> None:
    settings = settings_for(prefix)
    size = pool.MIN_POOLED
    sparse = pool.pool_prefix(settings) + "c" * 32  # as a client that only ftruncated left it
    fd = os.open(SHM_DIR / sparse, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    assert os.stat(SHM_DIR / sparse).st_blocks == 0
    target = prefix + "d" * 32
    assert pool.take(target, size, settings) is True
    assert os.stat(SHM_DIR / target).st_blocks * 512 >= size  # writing it cannot SIGBUS
    unlink_segment(target)


def test_claim_maps_through_the_kept_mappings(prefix: str) -> None:
    settings = settings_for(prefix)
    size = pool.MIN_POOLED
    first = prefix + "a" * 32
    segment = mappings.create(first, size)
    mapping = segment._mmap
    ndarray_view(segment, np.dtype("u1"), (size,), "C")[:] = 7
    segment.close()
    pool.release(first, settings, owner="")  # renamed into the pool: the kept mapping stays valid
    assert len(mappings.cache) == 1 and not mapping.closed

    second = prefix + "b" * 32
    claimed = pool.claim(second, size, settings)
    assert claimed is not None and claimed._mmap is mapping  # no new mmap, no faults
    assert not claimed.readonly
    claimed.close()
    pool.release(second, settings_for(prefix, 0), owner="")  # pool off: unlinked, and swept at once
    assert not (SHM_DIR / second).exists()
    assert len(mappings.cache) == 0 and mapping.closed


def test_drain_drops_kept_mappings(prefix: str) -> None:
    settings = settings_for(prefix)
    name = prefix + "a" * 32
    mappings.create(name, pool.MIN_POOLED).close()
    pool.release(name, settings, owner="")
    assert len(mappings.cache) == 1
    assert pool.drain(settings) == 1
    assert len(mappings.cache) == 0


# -- copying.copy_into ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_parallel_copy_is_exact(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copying, "PARALLEL_MIN_BYTES", 1024)
    monkeypatch.setattr(copying, "copy_threads", lambda: 3)
    monkeypatch.setattr(copying, "_executor", None)
    base = np.random.default_rng(0).standard_normal((301, 257))
    src = {"C": base, "F": np.asfortranarray(base), "strided": base[::2, 3:]}[layout]
    dst = np.empty(src.shape, order="F" if layout == "F" else "C")
    copying.copy_into(dst, src)
    assert np.array_equal(dst, src)
    copying._pool().shutdown()


def test_parallel_copy_refuses_unsafe_casts() -> None:
    with pytest.raises(TypeError):
        copying.copy_into(np.empty(10, np.int32), np.ones(10), casting="no")

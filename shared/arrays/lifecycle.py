"""One array write, from reservation to a visible array or to nothing at all; and its free.

Every array that enters shared memory (an HTTP upload, a same-host registration, a job's
result) goes the same way; a replica of another domain's array too, with a replica record
as its reservation and the /dev/shm half (`SegmentWrite`) as is (shared/arrays/replicas.py):

1. **begin**: the record is reserved (`uploading`, invisible) and its bytes counted against
   the domain's cap *before* the segment exists, since the janitor unlinks every
   `<prefix><32 hex>` segment without a record. Over the cap: `ShmFullError`.
2. **writer**: a writable mapping of the segment, a pooled one renamed to the array's name
   (any owner's: the writer overwrites every byte before anyone can see it) or a new one.
   A same-host client is its own writer: the API only checks its segment at commit.
3. **commit**: the record turns `ready` with its expiry (a client's segment is checked
   first, on a descriptor: `check_client_segment`); or **abandon**: the record is
   dropped and the segment unlinked, never pooled (it may hold a partial array or a
   previous owner's bytes), except a pooled segment handed to a registration, which held
   only its own key's bytes and goes back to the pool.

`writing` drives the steps, under `with` (sync store: workers) or `async with` (the API:
the blocking steps run in a thread), and abandons on any exception, cancellation included.
`free` and `free_async` are the other end: drop the record, then pool or unlink the segment.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Generic

import redis
import redis.asyncio as aioredis
from anyio import CancelScope, to_thread

from shared.arrays import mappings, pool
from shared.arrays.segments import (
    ForeignFile,
    Segment,
    ShmFullError,
    create_segment,
    ensure_allocated,
    open_own,
    unlink_reserved,
)
from shared.arrays.store import ArrayRecord, ArrayStore, Dropped
from shared.redis_io import ClientT, MaybeAwaitable, round_trip, then
from shared.settings import Settings


class ArrayTooLarge(ValueError):
    """An array (or an upload's body) over FORKLIFT_MAX_UPLOAD_BYTES; the API answers 413."""

    def __init__(self, nbytes: int, limit: int, what: str = "array") -> None:
        super().__init__(
            f"the {what} has {nbytes} bytes; the limit is {limit} (FORKLIFT_MAX_UPLOAD_BYTES)"
        )
        self.nbytes = nbytes
        self.limit = limit


def check_size(nbytes: int, settings: Settings, what: str = "array") -> None:
    """ArrayTooLarge past the one array size a client may put into shared memory."""
    if nbytes > settings.max_upload_bytes:
        raise ArrayTooLarge(nbytes, settings.max_upload_bytes, what)


@dataclass
class SegmentWrite:
    """The /dev/shm half of a write: the segment under a reserved name, being filled.

    Every step blocks (the API runs them in a thread). A replica (shared/arrays/replicas.py)
    is written with this half alone: its record is a replica record, not an array's.
    """

    name: str
    nbytes: int
    settings: Settings
    owner: str = ""
    segment: Segment | None = None
    sparse: bool = False  # a new segment whose pages the caller allocates (`open`)
    # The segment came from the pool holding only `owner`'s bytes (a registration): an
    # abandoned write gives it back instead of unlinking it.
    recycled: bool = False

    def open(self, *, sparse_above: int | None = None) -> Segment:
        """The writer: a pooled segment renamed to the reserved name, or a new one.

        Mapped writable through this process's kept mappings (a segment it wrote before is
        mapped already). `sparse_above`: a new segment larger than this is left sparse, for
        a caller that allocates its pages ahead of the bytes (`allocate_pages`).
        """
        segment = pool.claim(self.name, self.nbytes, self.settings)
        if segment is None:
            self.sparse = sparse_above is not None and self.nbytes > sparse_above
            if self.sparse:
                segment = create_segment(self.name, self.nbytes, allocate=False)
            else:
                segment = mappings.create(self.name, self.nbytes)
        self.segment = segment
        return segment

    def take_pooled(self) -> bool:
        """For a client that writes itself: a pooled segment its own key freed, renamed to
        the reserved name and cut to size, not mapped here; False if none fits."""
        self.recycled = pool.take(self.name, self.nbytes, self.settings, owner=self.owner)
        return self.recycled

    def close(self) -> None:
        """Release this process's view of the segment (before commit)."""
        if self.segment is not None:
            with contextlib.suppress(BufferError):
                self.segment.close()
            self.segment = None

    def discard(self, dropped: Dropped | None = None) -> None:
        """Remove the segment of a write that will not commit (abandon's blocking half).

        A recycled segment goes back into the pool under its owner's tag (`dropped`: the
        record was really dropped, so nobody else holds the name); anything else of the
        stack's uid under the name is unlinked (a client's file of another uid is left).
        """
        self.close()
        if self.recycled and dropped is not None:
            pool.release(self.name, self.settings, owner=dropped.owner)
        else:
            unlink_reserved(self.name)

    def check_client_segment(self) -> str | None:
        """A same-host client's segment at commit: None if it may become the array, else
        why not. Checked on one descriptor opened with O_NOFOLLOW: a regular file with one
        link, the stack's uid, mode 0600, exactly the array's size (a 0-byte array has a
        1-byte segment). Its holes are then allocated (ShmFullError if /dev/shm cannot).
        """
        name = self.name
        try:
            fd, info = open_own(name, writable=True)
        except FileNotFoundError:
            return (
                f"segment {name} does not exist in this API's /dev/shm: the client is not in"
                " this shm domain, or has not created it yet"
            )
        except ForeignFile as exc:
            return (
                f"segment {exc} (create it as the stack's user, mode 0600, as"
                " forklift.same_host does; otherwise upload with POST /arrays)"
            )
        try:
            expected = max(self.nbytes, 1)
            if info.st_size != expected:
                return (
                    f"segment {name} has {info.st_size} bytes; the array needs exactly {expected}"
                )
            ensure_allocated(name, expected, fd)
            return None
        finally:
            os.close(fd)


class ArrayWrite(SegmentWrite, Generic[ClientT]):
    """One array being written: its record reserved, its segment being filled.

    The record steps (`begin`, `commit`, `drop`, `fetch`) are one round trip each, sync or
    async like the store's client.
    """

    def __init__(
        self,
        store: ArrayStore[ClientT],
        array_id: str,
        nbytes: int,
        owner: str,
        recycled: bool = False,
    ) -> None:
        super().__init__(
            store.segment_name(array_id), nbytes, store.settings, owner, recycled=recycled
        )
        self.store = store
        self.array_id = array_id
        self.record: ArrayRecord | None = None

    @property
    def client(self) -> ClientT:
        """The store's client: the steps are sync or async like it (`round_trip`)."""
        return self.store.client

    @round_trip
    def begin(
        self, shape: tuple[int, ...], dtype: str, order: str, job: str = ""
    ) -> MaybeAwaitable[None]:
        """Reserve the record and its bytes; ShmFullError past the domain's cap."""
        reply = self.store.reserve(self.array_id, shape, dtype, order, self.nbytes, self.owner, job)
        return then(reply, self._reserved)

    def _reserved(self, used: int | None) -> None:
        if used is not None:
            raise ShmFullError.over_cap(self.nbytes, used, self.settings.shm_limit_bytes)

    @round_trip
    def commit(self, ttl: float | None = None) -> MaybeAwaitable[bool]:
        """Make the array visible; False if its reservation expired meanwhile."""
        return self.store.commit(self.array_id, ttl)

    @round_trip
    def drop(self) -> MaybeAwaitable[Dropped | None]:
        """Drop the record and uncount its bytes (abandon's Redis half): `Dropped` or None."""
        return self.store.drop(self.array_id)

    @round_trip
    def fetch(self) -> MaybeAwaitable[ArrayRecord]:
        """The committed record, kept in `record`."""
        return then(self.store.get(self.array_id), self._fetched)

    def _fetched(self, record: ArrayRecord | None) -> ArrayRecord:
        if record is None:
            raise LookupError(f"array {self.array_id} vanished right after its commit")
        self.record = record
        return record


def writing(
    store: ArrayStore[ClientT],
    array_id: str,
    shape: tuple[int, ...],
    dtype: str,
    order: str,
    nbytes: int,
    owner: str,
    *,
    job: str = "",
    ttl: float | None = None,
) -> Writing[ClientT]:
    """Begin; the body opens and fills `write.segment`; commit (the record then in
    `write.record`). Any exception abandons: nothing is left. `with` for a sync store (the
    workers), `async with` for an async one (the API)."""
    return Writing(ArrayWrite(store, array_id, nbytes, owner), shape, dtype, order, job, ttl)


@dataclass
class Writing(Generic[ClientT]):
    """`writing`'s steps around the body, one sequence for both kinds of store; the async
    abandon is shielded from cancellation."""

    write: ArrayWrite[ClientT]
    shape: tuple[int, ...]
    dtype: str
    order: str
    job: str
    ttl: float | None

    def __enter__(self: Writing[redis.Redis]) -> ArrayWrite[redis.Redis]:
        self.write.begin(self.shape, self.dtype, self.order, self.job)
        return self.write

    def __exit__(self: Writing[redis.Redis], kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            abandon(self.write)
            return
        try:
            self.write.close()
            self.write.commit(self.ttl)
            self.write.fetch()
        except BaseException:
            abandon(self.write)
            raise

    async def __aenter__(self: Writing[aioredis.Redis]) -> ArrayWrite[aioredis.Redis]:
        await self.write.begin(self.shape, self.dtype, self.order, self.job)
        return self.write

    async def __aexit__(
        self: Writing[aioredis.Redis], kind: type[BaseException] | None, *_: object
    ) -> None:
        if kind is not None:
            await self._abandon_shielded()
            return
        try:
            self.write.close()
            await self.write.commit(self.ttl)
            await self.write.fetch()
        except BaseException:
            await self._abandon_shielded()
            raise

    async def _abandon_shielded(self: Writing[aioredis.Redis]) -> None:
        with CancelScope(shield=True):
            await abandon_async(self.write)


def abandon(write: ArrayWrite[redis.Redis]) -> None:
    """Drop the record, then free the segment (sync store)."""
    write.close()  # first: a failed drop (Redis away) must not leave the mapping open
    write.discard(write.drop())


async def abandon_async(write: ArrayWrite[aioredis.Redis]) -> None:
    """Drop the record, then free the segment in a thread (async store)."""
    write.close()  # first: a failed drop (Redis away) must not leave the mapping open
    dropped = await write.drop()
    await to_thread.run_sync(write.discard, dropped)


def release(dropped: Dropped | None, settings: Settings) -> None:
    """The segment of a dropped record: into the pool if it fits, else unlinked."""
    if dropped is not None:
        pool.release(dropped.segment, settings, owner=dropped.owner)


def free(store: ArrayStore[redis.Redis], array_ids: list[str]) -> None:
    """Drop records and release their segments (sync store). An array a download still
    reads is not dropped now: its last reader does it (`drop` returns None)."""
    for array_id in array_ids:
        release(store.drop(array_id), store.settings)


async def free_async(store: ArrayStore[aioredis.Redis], array_ids: list[str]) -> None:
    """`free` for an async store; renaming or unlinking a segment runs in a thread."""
    for array_id in array_ids:
        dropped = await store.drop(array_id)
        if dropped is not None:
            await to_thread.run_sync(release, dropped, store.settings)

"""Same-host registrations: adopt a segment a client filled itself (no HTTP upload).

The routes are in api/routes/arrays.py; each step here is the array write lifecycle
(shared/arrays/lifecycle.py) with the client as the writer.

A client in this API's shm domain can skip the upload: it writes the array into a segment of
its own and hands over the name, so a 1 GiB input costs one memcpy instead of a trip through
a socket. It takes two calls because the janitor unlinks every `<prefix><32 hex>` segment
that has no record; as for uploads and array results, the record must exist before the
segment does:

1. `POST /arrays/register` `{"segment", "dtype", "shape", "order", "domain", "ttl"?,
   "recycle"?}`: the name must be this stack's prefix + 32 hex digits (the hex part becomes
   the array id), the domain must be this API's, the dtype one forklift accepts, and neither
   a record nor a segment of that name may exist yet. The record is reserved (invisible,
   counted against the shared-memory cap, and against the key's FORKLIFT_KEY_MAX_UPLOAD_BYTES
   until it ends: api/limits.py `RegisteredBytes`, 429 past it) and the caller gets `{"id",
   "segment", "nbytes", "expires_in", "created"}`. With `"recycle": true` and a fitting
   segment in the pool (shared/arrays/pool.py), the API renames that segment to the
   reserved name, cut to exactly `nbytes`, and answers `"created": true`.
2. `created: false`: the client creates the segment (exclusively, exactly `nbytes` bytes)
   and copies the array in. `created: true`: the segment exists; the client opens it (it
   must not create it) and overwrites every byte. A client that cannot open it abandons the
   reservation (`DELETE`, below) and registers again without `recycle`.
3. `POST /arrays/register/{id}/commit`: the segment must exist here (that is what proves the
   same `/dev/shm`), and is checked on a descriptor opened without following links: a
   regular file with one link, owned by the stack's uid, mode 0600, of exactly `nbytes`
   bytes. Holes a client left (it ftruncated instead of writing) are allocated now, so a
   reader can never SIGBUS on them. The array becomes visible like an upload (201,
   `ArrayMeta`). A refused commit drops the reservation and unlinks the segment (unless it
   is not ours: another user's file is left alone): nothing is left behind.

`DELETE /arrays/register/{id}` abandons a reservation: a segment the API took from the pool
goes back into it (or is unlinked if the pool has no room), any other is unlinked.
Reservations expire after an hour; the janitor then unlinks a segment left without its
record, recycled or not. `GET /arrays/register/info` tells a client the prefix and domain it
needs.

Who can register, and what they could do afterwards. Only a process running as the stack's
uid can make a segment that passes the commit: a client of another uid (or a remote one
that merely claims the domain) is refused, because the owner of a file can truncate or
rewrite it at any time, under a download or a job, and no check at commit could stop it.
A process of the stack's uid can already open, read and truncate every segment in /dev/shm,
so the same-host path gives it nothing new; key isolation protects clients that are not the
stack's uid, which is every HTTP-only client.

Why a recycled segment exposes nothing: until the client overwrites it, it holds a freed
array's bytes, and the client can read them (it maps the segment). So `recycle` only ever
hands out a segment that an array of the caller's own key freed (shared/arrays/pool.py tags
pooled segments by owner): at worst the caller reads bytes it wrote itself; with none of its
own in the pool it creates a fresh segment (`created: false`). Committing at once without
writing shows the caller its own old bytes, nobody else's.
Why recycle at all: a fresh segment costs ~0.45 s/GiB of page allocation; a recycled one
the client mapped before (shared/arrays/mappings.py keeps mappings by inode) costs a memcpy.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Annotated, Literal

import redis.asyncio as aioredis
from anyio import to_thread
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AppState
from api.errors import ApiError
from api.limits import RegisteredBytes
from shared.arrays import lifecycle
from shared.arrays.lifecycle import ArrayWrite
from shared.arrays.npy import MAX_NDIM, NpyFormatError, dtype_from_string
from shared.arrays.segments import segment_path, unlink_own, validate_segment_name
from shared.arrays.store import UPLOAD_TIMEOUT_S, ArrayRecord
from shared.schemas import ArrayMeta, ShmInfo

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_MAX_NBYTES = 2**63 - 1


class Registration(BaseModel):
    """Body of `POST /arrays/register`: the segment the caller is about to fill."""

    model_config = ConfigDict(extra="forbid")

    segment: str = Field(
        min_length=1, max_length=300, description="<shm_prefix><32 hex digits>, not yet created"
    )
    dtype: str = Field(min_length=1, max_length=16, examples=["float64", "<f8"])
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_NDIM)
    order: Literal["C", "F"] = "C"
    domain: str = Field(min_length=1, max_length=100, description="the client's shm domain")
    ttl: float | None = Field(None, gt=0, description="seconds; at most the default")
    recycle: bool = Field(
        False,
        description="take a segment an array of the caller's own key freed, if one fits;"
        " the caller then opens it instead of creating it and must overwrite every byte",
    )


class Reservation(BaseModel):
    id: str
    segment: str
    nbytes: int
    expires_in: int = Field(description="seconds left to create, fill and commit the segment")
    created: bool = Field(
        False,
        description="true: the API made the segment (a recycled one of exactly nbytes bytes"
        " holding old data of the caller's key); open it, do not create it, and overwrite"
        " every byte",
    )


def shm_info(state: AppState) -> ShmInfo:
    return ShmInfo(
        shm_prefix=state.settings.shm_prefix,
        shm_domain=state.settings.shm_domain,
        reservation_timeout=UPLOAD_TIMEOUT_S,
    )


def _not_found(array_id: str) -> ApiError:
    return ApiError(404, "registration_not_found", f"no open registration with id '{array_id}'")


async def _close(state: AppState, array_id: str, owner: str) -> None:
    """The reservation is over (committed, abandoned, refused or gone): its marker goes and
    its bytes stop counting against the key's limit, in one script."""
    await RegisteredBytes(state.redis, state.settings).release(
        owner, array_id, state.registrations.key(array_id)
    )


def _array_id(state: AppState, name: str) -> str:
    prefix = state.settings.shm_prefix
    try:
        validate_segment_name(name, prefix)
    except ValueError as exc:
        raise ApiError(422, "bad_segment_name", str(exc)) from None
    array_id = name[len(prefix) :]
    if not _HEX_ID.fullmatch(array_id):
        raise ApiError(
            422,
            "bad_segment_name",
            f"segment name {name!r} refused: it must be {prefix!r} followed by exactly 32"
            " lowercase hex digits (a uuid4 hex)",
        )
    return array_id


async def reserve(state: AppState, body: Registration, owner: str) -> Reservation:
    """Step 1 (begin): reserve a record for a segment the caller will create and fill."""
    settings = state.settings
    array_id = _array_id(state, body.segment)
    if body.domain != settings.shm_domain:
        raise ApiError(
            409,
            "other_domain",
            f"not in this shm domain: the client is in {body.domain!r}, the API in"
            f" {settings.shm_domain!r}; upload the array with POST /arrays instead",
        )
    try:
        dtype = dtype_from_string(body.dtype)
    except NpyFormatError as exc:
        raise ApiError(422, "bad_dtype", str(exc)) from None
    shape = tuple(body.shape)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes > _MAX_NBYTES:
        raise ApiError(422, "bad_shape", f"shape {shape} is too large to address")
    lifecycle.check_size(nbytes, settings)
    ledger = RegisteredBytes(state.redis, settings)
    ledger.refuse_oversized(nbytes)  # 413 before anything is claimed
    markers = state.registrations
    if not await markers.open(array_id, owner, body.ttl):
        raise ApiError(409, "already_registered", f"segment {body.segment} is already taken")
    write = ArrayWrite(state.arrays, array_id, nbytes, owner)
    try:
        if await state.arrays.exists(array_id):
            raise ApiError(
                409, "already_registered", f"segment {body.segment} is already registered"
            )
        if await to_thread.run_sync(os.path.lexists, segment_path(body.segment)):
            raise ApiError(
                409,
                "segment_exists",
                f"segment {body.segment} already exists; reserve a new name first, then"
                " create the segment",
            )
        # The key's open registrations plus its HTTP uploads in this process: 429 past the limit.
        uploading = state.limits.holds(owner, "upload_bytes")
        await ledger.take(owner, array_id, nbytes, UPLOAD_TIMEOUT_S, uploading)
        order = "F" if body.order == "F" and len(shape) > 1 else "C"
        await write.begin(shape, dtype.str, order)
    except BaseException:
        await _close(state, array_id, owner)
        raise
    if body.recycle:
        try:
            # after the "segment_exists" check: a rename would replace an existing file
            if await to_thread.run_sync(write.take_pooled):
                # an abandoned reservation gives it back to the pool
                await markers.mark_recycled(array_id, owner, body.ttl)
        except BaseException:
            await _abandon(state, write)
            raise
    return Reservation(
        id=array_id,
        segment=body.segment,
        nbytes=nbytes,
        expires_in=UPLOAD_TIMEOUT_S,
        created=write.recycled,
    )


async def _open(state: AppState, array_id: str, owner: str) -> _Open:
    """The caller's open registration, or 404 (unknown, expired, committed or not theirs)."""
    registration = await state.registrations.get(array_id)
    if registration is None or registration.owner != owner:
        raise _not_found(array_id)
    record = await state.arrays.get(array_id)
    nbytes = record.nbytes if record is not None else 0
    write = ArrayWrite(state.arrays, array_id, nbytes, owner, recycled=registration.recycled)
    reserved = record is not None and record.state == "uploading" and record.owner == owner
    return _Open(write, record, reserved, registration.ttl)


@dataclass
class _Open:
    """An open registration as a write whose writer is the client."""

    write: ArrayWrite[aioredis.Redis]
    record: ArrayRecord | None
    reserved: bool  # the record is still the caller's reservation
    ttl: float | None


async def _abandon(state: AppState, write: ArrayWrite[aioredis.Redis]) -> None:
    """Drop the reservation and free its segment: a segment the API took from the pool goes
    back to it, tagged with the caller's key (it held only that key's bytes, plus what the
    caller wrote); any other is the client's file, removed if it is of the stack's uid."""
    await lifecycle.abandon_async(write)
    await _close(state, write.array_id, write.owner)


async def _forget(
    state: AppState, write: ArrayWrite[aioredis.Redis], record: ArrayRecord | None
) -> None:
    """A reservation whose record is gone (expired): its segment, if any, is an orphan."""
    if record is None:
        await to_thread.run_sync(unlink_own, write.name)
    await _close(state, write.array_id, write.owner)


async def commit(state: AppState, array_id: str, owner: str) -> ArrayMeta:
    """Step 3: check the client's segment and make it an array like any upload; a refused
    commit abandons the reservation."""
    found = await _open(state, array_id, owner)
    write = found.write
    if not found.reserved:
        await _forget(state, write, found.record)
        raise _not_found(array_id)
    try:
        problem = await to_thread.run_sync(write.check_client_segment)
    except BaseException:  # ShmFullError: its holes cannot be allocated
        await _abandon(state, write)
        raise
    if problem is not None:
        await _abandon(state, write)
        raise ApiError(422, "bad_segment", problem)
    if not await write.commit(found.ttl):
        await _forget(state, write, await state.arrays.get(array_id))
        raise ApiError(
            404, "registration_not_found", f"registration '{array_id}' expired meanwhile"
        )
    await _close(state, array_id, owner)
    record: ArrayRecord = await write.fetch()
    return record.meta()


async def abandon(state: AppState, array_id: str, owner: str) -> None:
    """Give up a reservation: drops the record; frees the segment if it was created.

    A recycled segment (`created: true`) goes back into the pool; any other is unlinked.
    """
    found = await _open(state, array_id, owner)
    if found.reserved:
        await _abandon(state, found.write)
    else:
        await _forget(state, found.write, found.record)

"""/arrays/register: adopt a segment a same-host client filled itself (no HTTP upload).

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

import contextlib
import json
import math
import os
import re
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AppState, Owner, State
from api.errors import ApiError
from api.limits import RegisteredBytes
from shared.arrays import pool
from shared.arrays.npy import MAX_NDIM, NpyFormatError, dtype_from_string
from shared.arrays.segments import (
    ForeignFile,
    ShmFullError,
    ensure_allocated,
    open_own,
    report_foreign,
    segment_path,
    unlink_own,
    validate_segment_name,
)
from shared.arrays.store import UPLOAD_TIMEOUT_S, ArrayRecord
from shared.schemas import ID_PATTERN, ArrayMeta

router = APIRouter(prefix="/arrays", tags=["arrays"])

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_MAX_NBYTES = 2**63 - 1

RegistrationId = Annotated[str, Path(pattern=ID_PATTERN)]


class ShmInfo(BaseModel):
    shm_prefix: str = Field(description="segment names must start with this")
    shm_domain: str = Field(description="only clients in this domain can register segments")
    reservation_timeout: int = Field(description="seconds between reserve and commit")


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


def _marker_key(state: AppState, array_id: str) -> str:
    return state.settings.key("register", array_id)


async def _close(state: AppState, array_id: str, owner: str) -> None:
    """The reservation is over (committed, abandoned, refused or gone): its marker goes and
    its bytes stop counting against the key's limit, in one script."""
    ledger = RegisteredBytes(state.redis, state.settings)
    await ledger.release(owner, array_id, _marker_key(state, array_id))


@router.get("/register/info", response_model=ShmInfo)
async def shm_info(state: State, owner: Owner) -> Any:
    """What a same-host client needs to register segments: this stack's prefix and domain."""
    return ShmInfo(
        shm_prefix=state.settings.shm_prefix,
        shm_domain=state.settings.shm_domain,
        reservation_timeout=UPLOAD_TIMEOUT_S,
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


@router.post(
    "/register",
    status_code=201,
    response_model=Reservation,
    responses={
        409: {"description": "other shm domain, or the name is taken"},
        413: {"description": "over FORKLIFT_MAX_UPLOAD_BYTES or FORKLIFT_KEY_MAX_UPLOAD_BYTES"},
        422: {"description": "bad name, dtype or shape"},
        429: {"description": "the key's open reservations hold FORKLIFT_KEY_MAX_UPLOAD_BYTES"},
        507: {"description": "shared memory full"},
    },
)
async def reserve_segment(body: Registration, state: State, owner: Owner) -> Any:
    """Step 1: reserve a record for a segment the caller will create and fill itself."""
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
    if nbytes > settings.max_upload_bytes:
        raise ApiError(
            413,
            "too_large",
            f"the array has {nbytes} bytes; the limit is {settings.max_upload_bytes}"
            " (FORKLIFT_MAX_UPLOAD_BYTES)",
        )
    ledger = RegisteredBytes(state.redis, settings)
    ledger.refuse_oversized(nbytes)  # 413 before anything is claimed
    marker = _marker_key(state, array_id)
    claimed = await state.redis.set(
        marker, json.dumps({"owner": owner, "ttl": body.ttl}), nx=True, ex=UPLOAD_TIMEOUT_S
    )
    if not claimed:
        raise ApiError(409, "already_registered", f"segment {body.segment} is already taken")
    try:
        if await state.redis.exists(state.arrays.key(array_id)):
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
        used = await state.arrays.reserve(array_id, shape, dtype.str, order, nbytes, owner)
        if used is not None:
            raise ApiError(
                507,
                "shm_full",
                f"shared memory is full: {nbytes} more bytes would pass the cap of"
                f" {settings.shm_limit_bytes} ({used} in use); delete arrays or wait",
            )
    except BaseException:
        await _close(state, array_id, owner)
        raise
    created = False
    if body.recycle:
        try:
            # after the "segment_exists" check: a rename would replace an existing file
            created = await to_thread.run_sync(
                lambda: pool.take(body.segment, nbytes, settings, owner=owner)
            )
            if created:  # an abandoned reservation gives it back to the pool
                await state.redis.set(
                    marker,
                    json.dumps({"owner": owner, "ttl": body.ttl, "recycled": True}),
                    xx=True,
                    keepttl=True,
                )
        except BaseException as exc:
            await _abandon(state, array_id, owner)
            if isinstance(exc, ShmFullError):
                raise ApiError(507, "shm_full", str(exc)) from None
            raise
    return Reservation(
        id=array_id,
        segment=body.segment,
        nbytes=nbytes,
        expires_in=UPLOAD_TIMEOUT_S,
        created=created,
    )


async def _claim(state: AppState, array_id: str, owner: str) -> dict[str, Any]:
    """The caller's open reservation, or 404 (unknown, expired, committed or not theirs)."""
    raw = await state.redis.get(_marker_key(state, array_id))
    marker = json.loads(raw) if raw else None
    if not marker or marker.get("owner") != owner:
        raise ApiError(404, "registration_not_found", f"no open registration with id '{array_id}'")
    return marker


async def _abandon(state: AppState, array_id: str, owner: str, *, recycled: bool = False) -> None:
    """Drop the reservation and free its segment (the name was reserved by the caller).

    A segment the API took from the pool (`recycled`) goes back to it, tagged with the
    caller's key (it held only that key's bytes, plus what the caller wrote); any other is
    the client's file, removed if it is of the stack's uid (a file of another uid is left to
    its owner).
    """
    dropped = await state.arrays.drop(array_id)
    name = state.arrays.segment_name(array_id)
    if recycled and dropped:
        await to_thread.run_sync(lambda: pool.release(name, state.settings, owner=dropped.owner))
    else:
        await to_thread.run_sync(_discard_client_file, name)
    await _close(state, array_id, owner)


def _discard_client_file(name: str) -> None:
    """Remove what a client of the stack's uid left under the name it reserved, whatever it
    is (a file of a wrong mode, a hard link, a symlink: unlinking a name never touches what
    it points to); another uid's file is logged and left."""
    try:
        info = os.lstat(segment_path(name))
    except FileNotFoundError:
        return
    if info.st_uid != os.geteuid():
        report_foreign(f"{name}: owned by uid {info.st_uid}, left to its owner")
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(segment_path(name))


async def _forget(state: AppState, array_id: str, owner: str, record: ArrayRecord | None) -> None:
    """A reservation whose record is gone (expired): its segment, if any, is an orphan."""
    if record is None:
        await to_thread.run_sync(unlink_own, state.arrays.segment_name(array_id))
    await _close(state, array_id, owner)


def _inspect_segment(name: str, nbytes: int) -> str | None:
    """None if the client's segment may become an array, else why not (for a 422).

    Checked on one descriptor opened with O_NOFOLLOW: a regular file with one link, the
    stack's uid, mode 0600, exactly the array's size (a 0-byte array has a 1-byte segment).
    Its holes are then allocated (ShmFullError if /dev/shm cannot hold them).
    """
    try:
        fd, info = open_own(name, writable=True)
    except FileNotFoundError:
        return (
            f"segment {name} does not exist in this API's /dev/shm: the client is not in this"
            " shm domain, or has not created it yet"
        )
    except ForeignFile as exc:
        return (
            f"segment {exc} (create it as the stack's user, mode 0600, as"
            " forklift.same_host does; otherwise upload with POST /arrays)"
        )
    try:
        expected = max(nbytes, 1)
        if info.st_size != expected:
            return f"segment {name} has {info.st_size} bytes; the array needs exactly {expected}"
        ensure_allocated(name, expected, fd)
        return None
    finally:
        os.close(fd)


@router.post(
    "/register/{array_id}/commit",
    status_code=201,
    response_model=ArrayMeta,
    responses={
        404: {"description": "no open registration with this id"},
        422: {"description": "segment missing, not the stack's (uid, mode) or wrong size"},
        507: {"description": "shared memory full (the segment's holes cannot be allocated)"},
    },
)
async def commit_segment(
    array_id: RegistrationId, state: State, owner: Owner, response: Response
) -> Any:
    """Step 3: check the filled segment and make it an array like any upload."""
    marker = await _claim(state, array_id, owner)
    record = await state.arrays.get(array_id)
    if record is None or record.state != "uploading" or record.owner != owner:
        await _forget(state, array_id, owner, record)
        raise ApiError(404, "registration_not_found", f"no open registration with id '{array_id}'")
    try:
        problem = await to_thread.run_sync(_inspect_segment, record.segment, record.nbytes)
    except ShmFullError as exc:
        await _abandon(state, array_id, owner)
        raise ApiError(507, "shm_full", str(exc)) from None
    if problem is not None:
        await _abandon(state, array_id, owner)
        raise ApiError(422, "bad_segment", problem)
    if not await state.arrays.commit(array_id, marker.get("ttl")):
        await _forget(state, array_id, owner, await state.arrays.get(array_id))
        raise ApiError(
            404, "registration_not_found", f"registration '{array_id}' expired meanwhile"
        )
    await _close(state, array_id, owner)
    committed = await state.arrays.get(array_id)
    response.headers["Location"] = f"/arrays/{array_id}"
    return committed.meta() if committed else None


@router.delete(
    "/register/{array_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"description": "no open registration with this id"}},
)
async def abandon_segment(array_id: RegistrationId, state: State, owner: Owner) -> Response:
    """Give up a reservation: drops the record; frees the segment if it was created.

    A recycled segment (`created: true`) goes back into the pool; any other is unlinked.
    """
    marker = await _claim(state, array_id, owner)
    record = await state.arrays.get(array_id)
    if record is not None and record.state == "uploading" and record.owner == owner:
        await _abandon(state, array_id, owner, recycled=bool(marker.get("recycled")))
    else:
        await _forget(state, array_id, owner, record)
    return Response(status_code=204)

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
   counted against the shared-memory cap) and the caller gets `{"id", "segment", "nbytes",
   "expires_in", "created"}`. With `"recycle": true` and a fitting segment in the pool
   (shared/arrays/pool.py), the API renames that segment to the reserved name, cut to
   exactly `nbytes`, and answers `"created": true`.
2. `created: false`: the client creates the segment (exclusively, exactly `nbytes` bytes)
   and copies the array in. `created: true`: the segment exists; the client opens it (it
   must not create it) and overwrites every byte. A client that cannot open it abandons the
   reservation (`DELETE`, below) and registers again without `recycle`.
3. `POST /arrays/register/{id}/commit`: the segment must exist here (that is what proves the
   same `/dev/shm`), be a plain file readable by the stack, and hold exactly `nbytes` bytes.
   The array becomes visible like an upload (201, `ArrayMeta`). A refused commit drops the
   reservation and unlinks the segment: nothing is left behind.

`DELETE /arrays/register/{id}` abandons a reservation: a segment the API took from the pool
goes back into it (or is unlinked if the pool has no room), any other is unlinked.
Reservations expire after an hour; the janitor then unlinks a segment left without its
record, recycled or not. `GET /arrays/register/info` tells a client the prefix and domain it
needs.

Why handing a recycled segment to a client exposes nothing: until the client overwrites it,
it holds a freed array's bytes, possibly another owner's. But segments are created 0600 by
the stack's uid, so only a process running as that uid can open it at all, and such a
process can already open every segment in /dev/shm, live arrays included. Recycling gives
the client nothing it could not read anyway; the commit is its promise to have overwritten
every byte (the same rule the API's uploads and the workers' results follow).
Why recycle at all: a fresh segment costs ~0.45 s/GiB of page allocation; a recycled one
the client mapped before (shared/arrays/mappings.py keeps mappings by inode) costs a memcpy.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AppState, Owner, State
from api.errors import ApiError
from shared.arrays import pool
from shared.arrays.npy import MAX_NDIM, NpyFormatError, dtype_from_string
from shared.arrays.segments import (
    ShmFullError,
    segment_path,
    unlink_segment,
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
        description="take a freed segment from the pool if one fits; the caller then opens"
        " it instead of creating it and must overwrite every byte",
    )


class Reservation(BaseModel):
    id: str
    segment: str
    nbytes: int
    expires_in: int = Field(description="seconds left to create, fill and commit the segment")
    created: bool = Field(
        False,
        description="true: the API made the segment (a recycled one of exactly nbytes bytes"
        " holding old data); open it, do not create it, and overwrite every byte",
    )


def _marker_key(state: AppState, array_id: str) -> str:
    return state.settings.key("register", array_id)


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
        413: {"description": "over FORKLIFT_MAX_UPLOAD_BYTES"},
        422: {"description": "bad name, dtype or shape"},
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
        await state.redis.delete(marker)
        raise
    created = False
    if body.recycle:
        try:
            # after the "segment_exists" check: a rename would replace an existing file
            created = await to_thread.run_sync(pool.take, body.segment, nbytes, settings)
            if created:  # an abandoned reservation gives it back to the pool
                await state.redis.set(
                    marker,
                    json.dumps({"owner": owner, "ttl": body.ttl, "recycled": True}),
                    xx=True,
                    keepttl=True,
                )
        except BaseException as exc:
            await _abandon(state, array_id)
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


async def _abandon(state: AppState, array_id: str, *, recycled: bool = False) -> None:
    """Drop the reservation and free its segment (the name was reserved by the caller).

    A segment the API took from the pool (`recycled`) goes back to it; any other is unlinked
    (the client made it: it may be another uid's, or sparse, and does not belong in the pool).
    """
    await state.arrays.drop(array_id)
    name = state.arrays.segment_name(array_id)
    if recycled:
        await to_thread.run_sync(pool.release, name, state.settings)
    else:
        await to_thread.run_sync(unlink_segment, name)
    await state.redis.delete(_marker_key(state, array_id))


async def _forget(state: AppState, array_id: str, record: ArrayRecord | None) -> None:
    """A reservation whose record is gone (expired): its segment, if any, is an orphan."""
    if record is None:
        await to_thread.run_sync(unlink_segment, state.arrays.segment_name(array_id))
    await state.redis.delete(_marker_key(state, array_id))


def _inspect_segment(name: str) -> tuple[str, int]:
    """('ok', size) or (reason, 0) for the file behind a segment name, without following links."""
    try:
        fd = os.open(segment_path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return "missing", 0
    except PermissionError:
        return "unreadable", 0
    except OSError:  # ELOOP: a symlink
        return "not_a_segment", 0
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        return "not_a_segment", 0
    return "ok", info.st_size


@router.post(
    "/register/{array_id}/commit",
    status_code=201,
    response_model=ArrayMeta,
    responses={
        404: {"description": "no open registration with this id"},
        422: {"description": "segment missing, unreadable or of the wrong size"},
    },
)
async def commit_segment(
    array_id: RegistrationId, state: State, owner: Owner, response: Response
) -> Any:
    """Step 3: check the filled segment and make it an array like any upload."""
    marker = await _claim(state, array_id, owner)
    record = await state.arrays.get(array_id)
    if record is None or record.state != "uploading" or record.owner != owner:
        await _forget(state, array_id, record)
        raise ApiError(404, "registration_not_found", f"no open registration with id '{array_id}'")
    outcome, size = await to_thread.run_sync(_inspect_segment, record.segment)
    expected = max(record.nbytes, 1)  # a 0-byte array still has a 1-byte segment
    problem = None
    if outcome == "missing":
        problem = (
            f"segment {record.segment} does not exist in this API's /dev/shm: the client is"
            " not in this shm domain, or has not created it yet"
        )
    elif outcome == "unreadable":
        problem = f"segment {record.segment} is not readable by the stack (another user's?)"
    elif outcome == "not_a_segment":
        problem = f"{record.segment} is not a plain shared-memory segment"
    elif size != expected:
        problem = (
            f"segment {record.segment} has {size} bytes; a {record.dtype} array of shape"
            f" {tuple(record.shape)} needs exactly {expected}"
        )
    if problem is not None:
        await _abandon(state, array_id)
        raise ApiError(422, "bad_segment", problem)
    if not await state.arrays.commit(array_id, marker.get("ttl")):
        await _forget(state, array_id, await state.arrays.get(array_id))
        raise ApiError(
            404, "registration_not_found", f"registration '{array_id}' expired meanwhile"
        )
    await state.redis.delete(_marker_key(state, array_id))
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
        await _abandon(state, array_id, recycled=bool(marker.get("recycled")))
    else:
        await _forget(state, array_id, record)
    return Response(status_code=204)

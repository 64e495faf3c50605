"""/arrays: upload `.npy` (or raw bytes) into shared memory, register a segment a same-host
client filled, download, inspect, free.

A thin list of routes: uploads and downloads are `api/arrays_io.py`, same-host
registrations `api/registrations.py`, both the array write lifecycle of
`shared/arrays/lifecycle.py`; records are read through `ArrayStore`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from api import registrations
from api.arrays_io import MAX_HEADER, NPY_MEDIA_TYPE, ingest, load_array, npy_response
from api.deps import Owner, State
from api.errors import ApiError, not_found
from api.openapi import LOCATION
from api.registrations import Registration, Reservation
from shared.arrays import lifecycle
from shared.arrays.npy import NpyFormatError, NpyHeader, dtype_from_string, parse_shape
from shared.schemas import ID_PATTERN, ArrayMeta, ShmInfo

router = APIRouter(prefix="/arrays", tags=["arrays"])

_ACCEPTED_TYPES = (NPY_MEDIA_TYPE, "application/octet-stream")
_NPY_BODY = {
    "required": True,
    "content": {
        NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

RegistrationId = Annotated[str, Path(pattern=ID_PATTERN)]


def _raw_header(dtype: str | None, shape: str | None, order: str) -> NpyHeader | None:
    if dtype is None and shape is None:
        return None
    if dtype is None or shape is None:
        raise ApiError(422, "invalid_request", "raw uploads need both ?dtype= and ?shape=")
    try:
        parsed_dtype = dtype_from_string(dtype)
        parsed_shape = parse_shape(shape)
    except NpyFormatError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    return NpyHeader(
        dtype=parsed_dtype, shape=parsed_shape, fortran_order=order == "F", header_len=0
    )


@router.post(
    "",
    status_code=201,
    response_model=ArrayMeta,
    summary="Upload an array",
    openapi_extra={"requestBody": _NPY_BODY},
    responses={
        201: {"description": "the array, stored", "headers": LOCATION},
        400: {"description": "malformed or truncated body"},
        413: {"description": "over FORKLIFT_MAX_UPLOAD_BYTES"},
        415: {"description": "not .npy or octet-stream"},
        507: {"description": "shared memory full"},
    },
)
async def upload_array(
    request: Request,
    state: State,
    owner: Owner,
    response: Response,
    dtype: Annotated[str | None, Query(max_length=16, description="raw body: dtype")] = None,
    shape: Annotated[str | None, Query(max_length=400, description="raw body: '3,4'")] = None,
    order: Annotated[str, Query(pattern="^[CF]$", description="raw body: C or F order")] = "C",
    ttl: Annotated[float | None, Query(gt=0, description="seconds; at most the default")] = None,
) -> ArrayMeta:
    """Stream a `.npy` body (or raw bytes with `?dtype=&shape=`) into shared memory."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in _ACCEPTED_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the array as {' or '.join(_ACCEPTED_TYPES)}, not '{media_type or 'none'}'",
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_length", "Content-Length is not a number")
        # refused before the body is read: at most the array and its .npy header
        if int(declared) > state.settings.max_upload_bytes + MAX_HEADER:
            raise lifecycle.ArrayTooLarge(int(declared), state.settings.max_upload_bytes, "body")
    record = await ingest(state, request, owner, _raw_header(dtype, shape, order), ttl)
    response.headers["Location"] = f"/arrays/{record.id}"
    return record.meta()


@router.get(
    "/register/info",
    response_model=ShmInfo,
    summary="Same-host registration settings",
)
async def get_registration_info(state: State, owner: Owner) -> ShmInfo:
    """What a same-host client needs to register segments: this stack's prefix and domain."""
    return registrations.shm_info(state)


@router.post(
    "/register",
    status_code=201,
    response_model=Reservation,
    summary="Reserve a same-host segment",
    responses={
        409: {"description": "other shm domain, or the name is taken"},
        413: {"description": "over FORKLIFT_MAX_UPLOAD_BYTES or FORKLIFT_KEY_MAX_UPLOAD_BYTES"},
        422: {"description": "bad name, dtype or shape"},
        429: {"description": "the key's open reservations hold FORKLIFT_KEY_MAX_UPLOAD_BYTES"},
        507: {"description": "shared memory full"},
    },
)
async def register_array(body: Registration, state: State, owner: Owner) -> Reservation:
    """Step 1 of a same-host put: reserve a record for a segment the caller will create and
    fill itself (see api/registrations.py)."""
    return await registrations.reserve(state, body, owner)


@router.post(
    "/register/{array_id}/commit",
    status_code=201,
    response_model=ArrayMeta,
    summary="Commit a same-host segment",
    responses={
        201: {"description": "the array, stored", "headers": LOCATION},
        404: {"description": "no open registration with this id"},
        422: {"description": "segment missing, not the stack's (uid, mode) or wrong size"},
        507: {"description": "shared memory full (the segment's holes cannot be allocated)"},
    },
)
async def commit_registration(
    array_id: RegistrationId, state: State, owner: Owner, response: Response
) -> ArrayMeta:
    """Step 3 (the client filled it): check the segment and make it an array like any upload."""
    meta = await registrations.commit(state, array_id, owner)
    response.headers["Location"] = f"/arrays/{array_id}"
    return meta


@router.delete(
    "/register/{array_id}",
    status_code=204,
    response_class=Response,
    summary="Abandon a same-host reservation",
    responses={404: {"description": "no open registration with this id"}},
)
async def abandon_registration(array_id: RegistrationId, state: State, owner: Owner) -> Response:
    """Give up a reservation: drops the record; frees the segment if it was created.

    A recycled segment (`created: true`) goes back into the pool; any other is unlinked.
    """
    await registrations.abandon(state, array_id, owner)
    return Response(status_code=204)


@router.get(
    "/{array_id}",
    response_class=Response,
    summary="Download an array",
    responses={
        200: {"content": {NPY_MEDIA_TYPE: {}}, "description": "the array as .npy"},
        404: {"description": "unknown array"},
        502: {"description": "held in another shm domain whose API cannot be read"},
    },
)
async def get_array(array_id: str, state: State, owner: Owner) -> Response:
    """The array as a `.npy` stream, with `Content-Length`."""
    return await npy_response(state, array_id, owner, head=False)


@router.head("/{array_id}", response_class=Response, include_in_schema=False)
async def head_array(array_id: str, state: State, owner: Owner) -> Response:
    return await npy_response(state, array_id, owner, head=True)


@router.get("/{array_id}/meta", response_model=ArrayMeta, summary="Array metadata")
async def get_array_meta(array_id: str, state: State, owner: Owner) -> ArrayMeta:
    """The array's metadata as JSON."""
    return (await load_array(state, array_id, owner)).meta()


@router.delete(
    "/{array_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an array",
    responses={202: {"description": "freed when the jobs using it end"}, 404: {}},
)
async def delete_array(array_id: str, state: State, owner: Owner) -> Response:
    """Free the array now, or when the last queued or running job using it ends."""
    await load_array(state, array_id, owner)
    outcome = await state.arrays.request_delete(array_id, owner)
    if outcome == "missing":
        raise not_found("array", array_id)
    if outcome == "pending":
        return Response(status_code=202)
    await lifecycle.free_async(state.arrays, [array_id])
    return Response(status_code=204)

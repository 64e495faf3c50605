"""/arrays: upload `.npy` (or raw bytes) into shared memory, download, inspect, free."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.arrays_io import NPY_MEDIA_TYPE, free_arrays, ingest, load_array, npy_response
from api.deps import Owner, State
from api.errors import ApiError
from shared.arrays.npy import NpyFormatError, NpyHeader, dtype_from_string, parse_shape
from shared.schemas import ArrayMeta

router = APIRouter(prefix="/arrays", tags=["arrays"])

_ACCEPTED_TYPES = (NPY_MEDIA_TYPE, "application/octet-stream")
_NPY_BODY = {
    "required": True,
    "content": {
        NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


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
    openapi_extra={"requestBody": _NPY_BODY},
    responses={
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
) -> Any:
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
        if int(declared) > state.settings.max_upload_bytes + 65536:
            raise ApiError(
                413,
                "too_large",
                f"the body has {declared} bytes; the limit is"
                f" {state.settings.max_upload_bytes} (FORKLIFT_MAX_UPLOAD_BYTES)",
            )
    record = await ingest(state, request, owner, _raw_header(dtype, shape, order), ttl)
    response.headers["Location"] = f"/arrays/{record.id}"
    return record.meta()


@router.get(
    "/{array_id}",
    response_class=Response,
    responses={
        200: {"content": {NPY_MEDIA_TYPE: {}}, "description": "the array as .npy"},
        404: {"description": "unknown array"},
    },
)
async def download_array(array_id: str, state: State, owner: Owner) -> Response:
    """The array as a `.npy` stream, with `Content-Length`."""
    return await npy_response(state, array_id, owner, head=False)


@router.head("/{array_id}", response_class=Response, include_in_schema=False)
async def head_array(array_id: str, state: State, owner: Owner) -> Response:
    return await npy_response(state, array_id, owner, head=True)


@router.get("/{array_id}/meta", response_model=ArrayMeta)
async def array_meta(array_id: str, state: State, owner: Owner) -> Any:
    """The array's metadata as JSON."""
    return (await load_array(state, array_id, owner)).meta()


@router.delete(
    "/{array_id}",
    status_code=204,
    response_class=Response,
    responses={202: {"description": "freed when the jobs using it end"}, 404: {}},
)
async def delete_array(array_id: str, state: State, owner: Owner) -> Response:
    """Free the array now, or when the last queued or running job using it ends."""
    await load_array(state, array_id, owner)
    outcome = await state.arrays.request_delete(array_id, owner)
    if outcome == "missing":
        raise ApiError(404, "array_not_found", f"no array with id '{array_id}'")
    if outcome == "pending":
        return Response(status_code=202)
    await free_arrays(state, [array_id])
    return Response(status_code=204)

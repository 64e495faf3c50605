"""/internal: what the APIs and workers of other shm domains ask this domain's API for.

The serving end of the cross-host contract of shared/arrays/replicas.py. Not for clients:
every call must carry `X-Forklift-Internal-Token: <FORKLIFT_INTERNAL_TOKEN>`
(compared in constant time; without the setting these endpoints answer 404). Kept out of the
OpenAPI schema.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from api.arrays_io import leased_stream
from api.deps import State
from api.errors import ApiError, not_found
from api.remote import InternalCaller
from shared.schemas import is_id

router = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False)


@router.get("/arrays/{array_id}", summary="Serve an array to another shm domain")
async def serve_array(array_id: str, state: State, _: InternalCaller) -> Response:
    """The raw bytes of an array held in this domain (no `.npy` header), for another domain.

    No owner check: the caller checked the owner (an API) or holds a job that pins the array
    (a worker). An array whose deletion waits for its jobs is still served. The stream holds
    a read lease like a client's download, so the segment cannot be recycled under it.
    """
    record = await state.arrays.get(array_id) if is_id(array_id) else None
    if record is None or record.state != "ready":
        raise not_found("array", array_id)
    here = state.settings.shm_domain
    if record.domain != here:
        raise ApiError(
            409,
            "other_domain",
            f"array {array_id} lives in shm domain {record.domain}, not in {here}",
        )
    headers = {"Content-Length": str(record.nbytes), "X-Forklift-Array-Id": record.id}
    response = await leased_stream(
        state, record, None, b"", headers, media_type="application/octet-stream"
    )
    await state.replicas.count_transfer("serve", record.nbytes)
    return response

"""Cross-host arrays, the API's side: serving this domain's arrays to other domains (the
internal token check) and streaming another domain's array to a client.

The contract (the internal endpoint, its token, `PullError`) lives in shared/arrays/replicas.py.
`GET /arrays/{id}` on any API streams an array of another domain from the owner's
`GET /internal/arrays/{id}` behind the `.npy` header it builds itself; the bytes pass
through in chunks and are not stored here.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
from fastapi import Depends, Header
from starlette.responses import Response, StreamingResponse

from api.deps import State
from api.errors import ApiError, not_found
from shared.arrays import replicas
from shared.arrays.replicas import TOKEN_HEADER
from shared.arrays.store import ArrayRecord
from shared.settings import Settings


async def _check_token(
    state: State,
    token: Annotated[str | None, Header(alias=TOKEN_HEADER, include_in_schema=False)] = None,
) -> None:
    """Internal endpoints: off (404) without FORKLIFT_INTERNAL_TOKEN, 403 for a wrong token."""
    expected = state.settings.internal_token
    if expected is None:
        raise ApiError(
            404,
            "internal_disabled",
            "internal endpoints are off: FORKLIFT_INTERNAL_TOKEN is not set on this API",
        )
    if not hmac.compare_digest((token or "").encode(), expected.get_secret_value().encode()):
        raise ApiError(403, "forbidden", f"missing or wrong {TOKEN_HEADER}")


InternalCaller = Annotated[None, Depends(_check_token)]


async def proxy_array(
    settings: Settings, record: ArrayRecord, prefix: bytes, headers: dict[str, str], media_type: str
) -> Response:
    """`prefix` (the `.npy` header) and then the array's bytes, streamed from its owner's API."""
    source = replicas.source(record.id, record.domain, record.api_url, settings)
    client = httpx.AsyncClient(timeout=replicas.timeout())
    try:
        upstream = await client.send(
            client.build_request("GET", source.url, headers=source.headers), stream=True
        )
    except httpx.HTTPError as exc:
        await client.aclose()
        raise replicas.unreachable(record.id, source.url, exc) from None
    if upstream.status_code != 200:
        text = (await upstream.aread())[:300].decode(errors="replace")
        await upstream.aclose()
        await client.aclose()
        if upstream.status_code == 404 and "array_not_found" in text:
            raise not_found("array", record.id)
        raise replicas.refused(record.id, upstream.status_code, text)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield prefix
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()
            await client.aclose()

    return StreamingResponse(body(), headers=headers, media_type=media_type)

"""Arrays held in another shm domain: read from the owner's API, never through Redis.

Every array record names the API of the domain that holds it (`api_url`, from that domain's
FORKLIFT_API_INTERNAL_URL). `GET /arrays/{id}` on any API streams such an array from the owner's
`GET /internal/arrays/{id}` (raw bytes, authenticated by FORKLIFT_INTERNAL_TOKEN) behind the
`.npy` header it builds itself; the bytes pass through in chunks and are not stored here.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
from fastapi import Depends, Header
from starlette.responses import Response, StreamingResponse

from api.deps import AppState, State
from api.errors import ApiError, not_found
from shared.arrays.replicas import TOKEN_HEADER
from shared.arrays.store import ArrayRecord

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0


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
    state: AppState, record: ArrayRecord, prefix: bytes, headers: dict[str, str], media_type: str
) -> Response:
    """`prefix` (the `.npy` header) and then the array's bytes, streamed from its owner's API."""
    where = f"array {record.id} lives in shm domain {record.domain}"
    secret = state.settings.internal_token
    if secret is None:
        raise ApiError(
            502,
            "cross_domain_disabled",
            f"{where}; reading it through this API needs FORKLIFT_INTERNAL_TOKEN (the same value"
            " on every API and worker)",
        )
    if not record.api_url:
        raise ApiError(
            502,
            "owner_unknown",
            f"{where}, whose API did not record its address (FORKLIFT_API_INTERNAL_URL);"
            " download it from that domain's API",
        )
    url = f"{record.api_url.rstrip('/')}/internal/arrays/{record.id}"
    client = httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
    try:
        request = client.build_request(
            "GET", url, headers={TOKEN_HEADER: secret.get_secret_value()}
        )
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise ApiError(
            502, "owner_unreachable", f"{where}; its API ({record.api_url}) does not answer: {exc}"
        ) from None
    if upstream.status_code != 200:
        text = (await upstream.aread())[:300].decode(errors="replace")
        await upstream.aclose()
        await client.aclose()
        if upstream.status_code == 404 and "array_not_found" in text:
            raise not_found("array", record.id)
        raise ApiError(
            502,
            "owner_refused",
            f"{where}; its API answered {upstream.status_code}: {text}",
        )

    async def body() -> AsyncIterator[bytes]:
        try:
            yield prefix
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()
            await client.aclose()

    return StreamingResponse(body(), headers=headers, media_type=media_type)

"""One JSON error shape for every failure: `{"error": {"code", "message", "detail"}}`.

Clients (and people reading curl output) get a message they can act on; the API never
answers with a stack trace. Redis or broker outages become 503 with `Retry-After`. The
domain errors of `shared/` (shared memory full, an array too large, another domain's array
unreadable) carry no HTTP: `DOMAIN_ERRORS` says which answer each becomes, in one handler.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.arrays.lifecycle import ArrayTooLarge
from shared.arrays.replicas import PullError
from shared.arrays.segments import ShmFullError
from shared.redis_io import REDIS_ERRORS
from shared.trust import Untrusted

log = logging.getLogger("forklift.api")

RETRY_AFTER_S = 5


class ApiError(Exception):
    """Raise anywhere in a handler to answer with the error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


# Domain error -> (status, code); a PullError names its own code (why the owner's API could
# not be read).
DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    ShmFullError: (507, "shm_full"),
    ArrayTooLarge: (413, "too_large"),
    PullError: (502, "owner_refused"),
    # A name or address in Redis that failed its check (shared/trust.py): nothing was opened.
    Untrusted: (502, "untrusted"),
}


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"no {kind} with id '{ident}'")


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "detail": detail}}
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable(what: str) -> JSONResponse:
    return error_response(
        503,
        "unavailable",
        f"{what} is unavailable; retry in a few seconds",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _validation_message(errors: list[dict[str, Any]]) -> tuple[int, str, str]:
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {})
        return (
            400,
            "malformed_json",
            f"the body is not valid JSON: {ctx.get('error', 'parse error')}",
        )
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return 422, "invalid_request", "; ".join(parts)


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("type", "loc", "msg")
    return [{k: e[k] for k in keep if k in e} for e in errors]


async def drop_stale_connections(client: aioredis.Redis, exc: BaseException) -> None:
    """After a Redis restart every idle pooled connection is stale and fails its next
    command the same way (a 503 each, for as long as the pool keeps it, which a burst of
    requests finds long after the restart): at the first connection error, drop them all;
    the next requests connect afresh."""
    if isinstance(exc, redis.exceptions.ConnectionError):
        await client.connection_pool.disconnect(inuse_connections=False)


def install(app: FastAPI) -> None:
    """Answer every failure with the one error shape (documented by `api.openapi`)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

    async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
        status, code = DOMAIN_ERRORS[next(t for t in type(exc).__mro__ if t in DOMAIN_ERRORS)]
        if isinstance(exc, PullError):
            code = exc.code
        return error_response(status, code, str(exc))

    for domain_error in DOMAIN_ERRORS:
        app.add_exception_handler(domain_error, _domain_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status, code, message = _validation_message(errors)
        return error_response(status, code, message, _clean_errors(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            404: "not_found",
            405: "method_not_allowed",
            408: "body_timeout",
            413: "too_large",
        }.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        state = getattr(request.app.state, "forklift", None)
        if state is not None:
            await drop_stale_connections(state.redis, exc)
        return unavailable("Redis")

    for error_type in REDIS_ERRORS:
        app.add_exception_handler(error_type, _redis_down)

    @app.exception_handler(OperationalError)
    async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("broker unavailable: %s", exc)
        return unavailable("the broker")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the API's log")

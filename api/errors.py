"""One JSON error shape for every failure: `{"error": {"code", "message", "detail"}}`.

Clients (and people reading curl output) get a message they can act on; the API never
answers with a stack trace. Redis or broker outages become 503 with `Retry-After`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.redis_io import REDIS_ERRORS
from shared.schemas import ErrorBody

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


_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
# Operations counted per key by api.limits.KeyLimitMiddleware (429 past a limit).
_KEY_LIMITED = {
    ("post", "/arrays"),
    ("get", "/jobs/{job_id}"),
    ("get", "/jobs/{job_id}/result"),
    ("get", "/jobs/{job_id}/events"),
    ("post", "/jobs/wait"),
}
_COMMON_ERRORS = {
    "400": "malformed body (not JSON, a broken .npy, a length that does not add up)",
    "401": "missing or unknown API key (when FORKLIFT_API_KEYS is set)",
    "404": "no such id (or not the caller's: existence is not told)",
    "408": "the request body stopped arriving (FORKLIFT_BODY_TIMEOUT)",
    "413": "request body over its cap",
    "422": "invalid request",
    "429": "the key holds its limit of these requests already; retry after `Retry-After` s",
    "503": "Redis or the broker is unavailable; retry after `Retry-After` seconds",
}


def _honest_openapi(app: FastAPI, secured: bool) -> None:
    """Every error an operation can answer is in its schema, with the one error shape.

    Security is what the running configuration asks: bearer keys on every keyed operation
    when FORKLIFT_API_KEYS is set, none at all when the API runs open (a schema that demands
    a token the API never checks is a lie clients and fuzzers act on).

    FastAPI documents only the success and its own 422 (`{"detail": [...]}`, which forklift
    never sends). Added per operation: 400/408/413 where there is a body, 401 and 503 where
    the caller's key and Redis are involved, 404 where the path holds an id, 422 where
    anything is validated; every 4xx/5xx answer is `ErrorBody`.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error_schema.pop("$defs", {}))
        components["ErrorBody"] = error_schema
        if not secured:
            schema.get("components", {}).pop("securitySchemes", None)
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                if method not in ("get", "put", "post", "delete", "patch", "head"):
                    continue
                keyed = bool(op.get("security"))  # the route takes the caller's key
                if not secured:
                    op.pop("security", None)
                codes = set()
                if "requestBody" in op:
                    codes |= {"400", "408", "413", "422"}
                if op.get("parameters"):
                    codes.add("422")
                if "{" in path:
                    codes.add("404")
                if keyed:
                    codes |= {"401", "503"} if secured else {"503"}
                if (method, path) in _KEY_LIMITED:
                    codes.add("429")
                responses = op.setdefault("responses", {})
                for code in sorted(codes):
                    responses.setdefault(code, {"description": _COMMON_ERRORS[code]})
                for code, response in responses.items():
                    if code[0] in "45":
                        response["content"] = {"application/json": {"schema": _ERROR_REF}}
                        response.setdefault("description", _COMMON_ERRORS.get(code, "error"))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, secured: bool = False) -> None:
    _honest_openapi(app, secured)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

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
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    for error_type in REDIS_ERRORS:

        @app.exception_handler(error_type)
        async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
            log.warning("redis unavailable: %s", exc)
            return unavailable("Redis")

    @app.exception_handler(OperationalError)
    async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("broker unavailable: %s", exc)
        return unavailable("the broker")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the API's log")

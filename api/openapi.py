"""The OpenAPI document, curated: what a reader and a client generator should see.

FastAPI documents what the route decorators say, names operations `submit_job_jobs_post`,
and adds its own 422 (`{"detail": [...]}`, a shape forklift never sends) to every operation
with a parameter. Curated here, once for every route:

- operationIds are the route functions' names (`submit_job`), so a generated client's
  methods are the names the code has;
- every error an operation can answer is documented with the one error shape (`ErrorBody`),
  and none it cannot: 400/408/413 where there is a body, 422 where a body or a parameter is
  validated, 404 where the path holds an id, 401 where the caller's key is checked, 503
  where the operation reaches Redis or the broker (every keyed one but those answered
  from the API's own settings, `_SETTINGS_ONLY`), 429 where `api.limits` counts the
  request; `Retry-After` on every 429 and 503 (`api.errors.unavailable`,
  `api.limits.limit_reached`);
- security is what the running configuration asks: bearer keys on every keyed operation
  when FORKLIFT_API_KEYS is set, none at all when the API runs open (a schema that demands
  a token the API never checks is a lie clients and fuzzers act on).

Summaries, success headers (`LOCATION`) and the errors only one route answers stay in each
route's decorator, beside the code that sends them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from shared.schemas import ErrorBody

# A response's `headers=` entry for the created resource's path (`response.headers["Location"]`).
LOCATION: dict[str, Any] = {
    "Location": {
        "description": "the path of what was created, to GET",
        "required": True,
        "schema": {"type": "string"},
    }
}
RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_FASTAPI_422 = {"$ref": "#/components/schemas/HTTPValidationError"}
_METHODS = ("get", "put", "post", "delete", "patch", "head")

# Operations counted per key by api.limits.KeyLimitMiddleware (its `_kind`): 429 past a limit.
_KEY_LIMITED = {
    ("post", "/arrays"),
    ("get", "/jobs/{job_id}"),
    ("get", "/jobs/{job_id}/result"),
    ("get", "/jobs/{job_id}/events"),
    ("post", "/jobs/wait"),
}
# Keyed operations answered from the API's settings alone: no Redis, no broker, so no 503.
_SETTINGS_ONLY = {
    ("get", "/arrays/register/info"),
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


def operation_id(route: APIRoute) -> str:
    """The route function's name: `generate_unique_id_function` of the app."""
    return route.name


def _validated(parameter: dict[str, Any]) -> bool:
    """Whether a value of this parameter can be refused (422): anything but a plain string
    in the path (always present, any text matches)."""
    schema = parameter.get("schema", {})
    plain = schema.get("type") == "string" and set(schema) <= {"type", "title", "description"}
    return not plain or (parameter.get("in") != "path" and bool(parameter.get("required")))


def _error_codes(path: str, method: str, op: dict[str, Any], secured: bool) -> set[str]:
    codes = set()
    if "requestBody" in op:
        codes |= {"400", "408", "413", "422"}
    if any(_validated(p) for p in op.get("parameters", ())):
        codes.add("422")
    if "{" in path:
        codes.add("404")
    if op.get("security"):  # the route takes the caller's key
        if secured:
            codes.add("401")
        if (method, path) not in _SETTINGS_ONLY:
            codes.add("503")
    if (method, path) in _KEY_LIMITED:
        codes.add("429")
    return codes


def _curate_operation(path: str, method: str, op: dict[str, Any], secured: bool) -> None:
    codes = _error_codes(path, method, op, secured)
    if not secured:
        op.pop("security", None)
    responses: dict[str, Any] = op.setdefault("responses", {})
    fastapi_422 = responses.get("422", {}).get("content", {}).get("application/json", {})
    if fastapi_422.get("schema") == _FASTAPI_422 and "422" not in codes:
        del responses["422"]  # FastAPI's own, on a parameter that cannot be refused
    for code in sorted(codes):
        responses.setdefault(code, {"description": _COMMON_ERRORS[code]})
    for code, response in responses.items():
        if code[0] not in "45":
            continue
        response.setdefault("description", _COMMON_ERRORS.get(code, "error"))
        content = response.get("content", {}).get("application/json", {})
        if content.get("schema") in (None, _FASTAPI_422):  # no shape of its own: the error's
            response["content"] = {"application/json": {"schema": _ERROR_REF}}
        if code in ("429", "503"):
            response["headers"] = {**RETRY_AFTER, **response.get("headers", {})}


def curate(app: FastAPI, secured: bool) -> None:
    """Install the curated document as `app.openapi` (built once, on first request).

    Built from FastAPI's own generator, whatever `app.openapi` was before.
    """

    def build() -> dict[str, Any]:
        return FastAPI.openapi(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorBody"] = error_schema
        if not secured:
            components.pop("securitySchemes", None)
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                if method in _METHODS:
                    _curate_operation(path, method, op, secured)
        if _FASTAPI_422 not in _refs(schema.get("paths", {})):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _refs(node: Any) -> list[dict[str, Any]]:
    """Every `{"$ref": ...}` object under `node`."""
    if isinstance(node, dict):
        found = [node] if set(node) == {"$ref"} else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []

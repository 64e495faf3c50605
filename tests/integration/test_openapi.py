"""The OpenAPI document is curated (api/openapi.py): read from the live API's /openapi.json.

operationIds are the route functions' names, every operation has a summary a person wrote,
the `Location` and `Retry-After` headers are declared where they are sent, `/healthz` is
typed, security is declared only when keys are set, and the errors a few routes document
are the ones they really answer (the fuzz test, tests/integration/test_fuzz.py, checks the
other way round: every status it sees is documented).
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

import api.routes
from api.main import create_app
from shared.schemas import Health, ShmInfo
from shared.settings import Settings
from tests.conftest import Stack

METHODS = ("get", "put", "post", "delete", "patch", "head")
ERROR_REF = "#/components/schemas/ErrorBody"


@pytest.fixture(scope="module")
def doc(live: Stack) -> dict[str, Any]:
    reply = httpx.get(f"{live.url}/openapi.json", timeout=30)
    assert reply.status_code == 200
    return reply.json()


@pytest.fixture
def client(live: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        yield http


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def route_names() -> dict[tuple[str, str], str]:
    """(method, path) -> the route function's name, for every documented route of api/routes."""
    names = {}
    for module in pkgutil.iter_modules(api.routes.__path__):
        router = getattr(importlib.import_module(f"api.routes.{module.name}"), "router", None)
        for route in getattr(router, "routes", ()):
            if isinstance(route, APIRoute) and route.include_in_schema:
                names |= {(method.lower(), route.path): route.name for method in route.methods}
    return names


def test_operation_ids_are_the_route_function_names(doc: dict[str, Any]) -> None:
    ids = {(method, path): op.get("operationId") for path, method, op in operations(doc)}
    assert ids == route_names()
    assert len(set(ids.values())) == len(ids), "operationIds must be unique"
    assert ids[("post", "/jobs")] == "submit_job"


def test_every_operation_has_a_summary_a_person_wrote(doc: dict[str, Any]) -> None:
    missing = []
    for path, method, op in operations(doc):
        generated = op["operationId"].replace("_", " ").title()  # FastAPI's own default
        if not op.get("summary") or op["summary"] == generated:
            missing.append(f"{method.upper()} {path}")
    assert missing == [], f"operations without a written summary: {missing}"


def test_location_is_declared_where_it_is_sent(doc: dict[str, Any]) -> None:
    sent = {
        ("post", "/jobs"): "202",
        ("post", "/arrays"): "201",
        ("post", "/arrays/register/{array_id}/commit"): "201",
    }
    for (method, path), status in sent.items():
        headers = doc["paths"][path][method]["responses"][status].get("headers", {})
        assert headers.get("Location", {}).get("required") is True, (method, path, headers)


def test_retry_after_is_declared_on_every_429_and_503(doc: dict[str, Any]) -> None:
    seen = 0
    for path, method, op in operations(doc):
        for status in ("429", "503"):
            if status in op["responses"]:
                seen += 1
                header = op["responses"][status].get("headers", {}).get("Retry-After")
                assert header is not None and header["required"], (method, path, status)
    assert seen >= 5, "the keyed operations document 503 (Redis down)"


def test_errors_have_the_one_error_shape(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas, "FastAPI's 422 shape is never sent"
    for path, method, op in operations(doc):
        for status, response in op["responses"].items():
            if status[0] in "45" and not (path == "/healthz" and status == "503"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (method, path, status)


def test_healthz_is_typed(doc: dict[str, Any], client: httpx.Client) -> None:
    responses = doc["paths"]["/healthz"]["get"]["responses"]
    ok = responses["200"]["content"]["application/json"]["schema"]
    down = responses["503"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Health"}
    assert down == {"$ref": "#/components/schemas/HealthDown"}
    assert set(doc["components"]["schemas"]["Health"]["required"]) == set(Health.model_fields)
    reply = client.get("/healthz")
    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == set(Health.model_fields)
    assert Health.model_validate(body).redis is True


def test_no_status_is_documented_that_the_route_never_sends(doc: dict[str, Any]) -> None:
    def codes(method: str, path: str) -> set[str]:
        return set(doc["paths"][path][method]["responses"])

    # An unknown input array is a 422 (unknown_array), not a 404.
    assert "404" not in codes("post", "/jobs")
    # A plain string in the path cannot be refused: an unknown name is a 404, not a 422.
    assert "422" not in codes("get", "/tasks/{name}")
    assert codes("get", "/tasks") == {"200"}
    # Open API: nothing asks for a key, so nothing answers 401.
    assert all("401" not in op["responses"] for _, _, op in operations(doc))
    # Answered from the API's settings, never from Redis: no 503 (and no 404, no 422).
    assert codes("get", "/arrays/register/info") == {"200"}
    # Not counted per key: no 429.
    assert "429" not in codes("post", "/jobs")
    assert "429" in codes("post", "/jobs/wait")


def _documented(doc: dict[str, Any], method: str, path: str, reply: httpx.Response) -> None:
    responses = doc["paths"][path][method]["responses"]
    assert str(reply.status_code) in responses, (method, path, reply.status_code, reply.text)
    for name, header in responses[str(reply.status_code)].get("headers", {}).items():
        if header.get("required"):
            assert name in reply.headers, (method, path, name)


def test_documented_errors_are_the_ones_answered(doc: dict[str, Any], client: httpx.Client) -> None:
    unknown = uuid.uuid4().hex
    cases = [
        ("get", "/tasks/{name}", client.get("/tasks/no_such_task"), 404),
        ("get", "/jobs/{job_id}", client.get(f"/jobs/{unknown}"), 404),
        ("get", "/jobs/{job_id}", client.get(f"/jobs/{unknown}?wait=soon"), 422),
        ("post", "/jobs/wait", client.post("/jobs/wait", json={"ids": [unknown]}), 404),
        (
            "post",
            "/jobs",
            client.post("/jobs", json={"task": "sum", "inputs": {"a": {"array": unknown}}}),
            422,
        ),
        ("post", "/jobs", client.post("/jobs", json={"task": "no_such_task"}), 422),
        (
            "post",
            "/jobs",
            client.post(
                "/jobs", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
        ),
    ]
    for method, path, reply, status in cases:
        assert reply.status_code == status, (method, path, reply.status_code, reply.text)
        assert reply.json()["error"]["code"], reply.text
        _documented(doc, method, path, reply)

    info = client.get("/arrays/register/info")
    assert info.status_code == 200, info.text
    _documented(doc, "get", "/arrays/register/info", info)
    assert set(info.json()) == set(ShmInfo.model_fields)
    schema = doc["paths"]["/arrays/register/info"]["get"]["responses"]["200"]["content"]
    assert schema["application/json"]["schema"] == {"$ref": "#/components/schemas/ShmInfo"}

    submitted = client.post("/jobs", json={"task": "sleep", "params": {"seconds": 30}})
    assert submitted.status_code == 202, submitted.text
    _documented(doc, "post", "/jobs", submitted)
    job_id = submitted.json()["id"]
    assert submitted.headers["Location"] == f"/jobs/{job_id}"
    not_yet = client.get(f"/jobs/{job_id}/result")
    assert not_yet.status_code == 409, not_yet.text
    _documented(doc, "get", "/jobs/{job_id}/result", not_yet)
    cancelled = client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200, cancelled.text
    _documented(doc, "delete", "/jobs/{job_id}", cancelled)
    client.get(f"/jobs/{job_id}?wait=10")  # cancelled at once; its worker stops it soon
    deadline = time.monotonic() + 10
    while (again := client.delete(f"/jobs/{job_id}")).status_code == 409:  # still stopping
        _documented(doc, "delete", "/jobs/{job_id}", again)
        assert time.monotonic() < deadline, again.text
        time.sleep(0.1)
    assert again.status_code == 200, again.text  # stopped: its record is removed
    _documented(doc, "delete", "/jobs/{job_id}", again)


def test_security_is_declared_only_when_keys_are_set(doc: dict[str, Any]) -> None:
    assert "securitySchemes" not in doc["components"]
    assert all("security" not in op for _, _, op in operations(doc))
    keyed = create_app(Settings.from_env({"FORKLIFT_API_KEYS": "k1"})).openapi()
    assert [s["scheme"] for s in keyed["components"]["securitySchemes"].values()] == ["bearer"]
    secured = {(m, p) for p, m, op in operations(keyed) if op.get("security")}
    assert {("post", "/jobs"), ("get", "/jobs/{job_id}"), ("get", "/cluster")} <= secured
    assert ("get", "/healthz") not in secured and ("get", "/tasks") not in secured
    for path, method, op in operations(keyed):
        assert ("401" in op["responses"]) == ((method, path) in secured), (method, path)

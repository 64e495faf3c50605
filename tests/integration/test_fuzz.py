"""Schemathesis against the live API's own /openapi.json: no 5xx, no answer off the schema.

Two APIs are fuzzed, one open and one with keys (every generated request carries a valid
key), because the schema differs with the configuration: security is declared only when
keys are set. Schemathesis generates valid and invalid data (both modes, its default), and
the checks include `negative_data_rejection` (invalid data must get a 4xx) besides the schema
checks (status codes, content types, response bodies and headers as documented), plus
`ignored_auth` with keys (a request without the key must be refused).

The fuzzed APIs are real uvicorns on the session's Redis with a queue of their own that no
worker consumes (generated jobs like `fib(45)` or `sleep(3600)` are accepted but never run)
and small caps (1 MiB uploads, 16 MiB of shared memory), so the examples are cheap. Each
operation gets a bounded number of examples; whatever it creates is removed afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import stack

EXAMPLES_PER_OPERATION = 60


FUZZ_KEY = "fuzz-key-0123456789abcdef"


@pytest.fixture(scope="module", params=["open", "keyed"])
def fuzz_api(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    keys = {"FORKLIFT_API_KEYS": FUZZ_KEY} if request.param == "keyed" else {}
    env = stack.stack_env(
        redis_url,
        FORKLIFT_QUEUE=f"fuzz{uuid.uuid4().hex[:8]}",
        FORKLIFT_MAX_UPLOAD_BYTES=str(1 << 20),
        FORKLIFT_SHM_LIMIT_BYTES=str(16 << 20),
        FORKLIFT_BODY_TIMEOUT="2",
        **keys,
    )
    api, url = stack.start_api(env)
    domain = httpx.get(f"{url}/healthz").json()["shm_domain"]
    try:
        yield url
    finally:
        api.stop()
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        for key in client.scan_iter(f"{env['FORKLIFT_KEY_PREFIX']}:*"):
            client.delete(key)
        queue = env["FORKLIFT_QUEUE"]
        client.delete(queue, f"{queue}.{domain}")
        client.close()
        for name in stack.segments(env["FORKLIFT_SHM_PREFIX"]):
            (Path("/dev/shm") / name).unlink(missing_ok=True)
        assert "Traceback" not in api.log(), api.log()[-3000:]


@pytest.fixture(scope="module")
def api_schema(fuzz_api: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_api}/openapi.json")


def _keyed(case: schemathesis.Case) -> bool:
    return bool(case.operation.schema.raw_schema.get("components", {}).get("securitySchemes"))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_within_its_schema(case: schemathesis.Case) -> None:
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        response_headers_conformance,
        negative_data_rejection,
    ]
    keyed = _keyed(case)
    headers = {"Authorization": f"Bearer {FUZZ_KEY}"} if keyed else None
    if keyed:
        checks.append(ignored_auth)
    case.call_and_validate(headers=headers, checks=checks, timeout=10)

"""Schemathesis against the live API's own /openapi.json: no 5xx, no answer off the schema.

The fuzzed API is a real uvicorn on the session's Redis with a queue of its own that no
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
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests import stack

EXAMPLES_PER_OPERATION = 60


@pytest.fixture(scope="module")
def fuzz_api(redis_url: str) -> Iterator[str]:
    env = stack.stack_env(
        redis_url,
        FORKLIFT_QUEUE=f"fuzz{uuid.uuid4().hex[:8]}",
        FORKLIFT_MAX_UPLOAD_BYTES=str(1 << 20),
        FORKLIFT_SHM_LIMIT_BYTES=str(16 << 20),
        FORKLIFT_BODY_TIMEOUT="2",
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
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
        timeout=10,
    )

"""Fixtures of the client unit tests: each test runs with both clients, its requests recorded."""

from __future__ import annotations

import pytest

from tests.clients import KINDS, Recorded


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def recorded() -> Recorded:
    return []

"""api/enqueue.py's coalescing of concurrent publishes (no Redis: `_publish` is replaced).

Checks: concurrent requests share trips (one alone goes at once, the rest of a burst in the
next trip), each gets its own queues back in order, a failed trip fails every request it
carried and only those, and a cancelled request still waits for its trip. Under 1 s.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from api import enqueue
from shared.schemas import TaskPayload
from shared.settings import Settings


def _payload(n: int) -> TaskPayload:
    return TaskPayload(job_id=f"{n:032x}", task="noop", params={}, inputs={}, owner="")


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Each trip's job ids; a trip whose first id ends in 'f' fails."""
    seen: list[list[str]] = []
    gate = threading.Event()

    def fake(settings: Settings, payloads: list[TaskPayload]) -> list[str]:
        ids = [p.job_id for p in payloads]
        seen.append(ids)
        if len(seen) == 1:
            gate.wait(0.2)  # the first trip is out while the others gather
        if any(i.endswith("f") for i in ids):
            raise ConnectionError("broker down")
        return [f"q-{i[-2:]}" for i in ids]

    monkeypatch.setattr(enqueue, "_publish", fake)
    return seen


def test_concurrent_publishes_share_a_trip(trips: list[list[str]]) -> None:
    settings = Settings()

    async def scenario() -> list[list[str]]:
        first = asyncio.create_task(enqueue.enqueue_many(settings, [_payload(1)]))
        await asyncio.sleep(0.01)  # out in its own trip
        rest = [enqueue.enqueue_many(settings, [_payload(n), _payload(n + 1)]) for n in (2, 4)]
        return [await first, *await asyncio.gather(*rest)]

    answers = asyncio.run(scenario())
    assert answers == [["q-01"], ["q-02", "q-03"], ["q-04", "q-05"]]
    assert trips == [[f"{1:032x}"], [f"{n:032x}" for n in (2, 3, 4, 5)]]


def test_a_failed_trip_fails_the_requests_it_carried(trips: list[list[str]]) -> None:
    settings = Settings()

    async def scenario() -> list[object]:
        first = asyncio.create_task(enqueue.enqueue_many(settings, [_payload(1)]))
        await asyncio.sleep(0.01)
        failing = [enqueue.enqueue_many(settings, [_payload(n)]) for n in (2, 15)]
        results = await asyncio.gather(first, *failing, return_exceptions=True)
        after = await enqueue.enqueue_many(settings, [_payload(3)])  # the next trip works
        return [*results, after]

    first, second, third, after = asyncio.run(scenario())
    assert first == ["q-01"]
    assert isinstance(second, ConnectionError) and isinstance(third, ConnectionError)
    assert after == ["q-03"]


def test_a_cancelled_request_waits_for_its_trip(trips: list[list[str]]) -> None:
    settings = Settings()

    async def scenario() -> bool:
        task = asyncio.create_task(enqueue.enqueue_many(settings, [_payload(1)]))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(trips) == 1  # its message went out before it learned of the cancel

    assert asyncio.run(scenario())

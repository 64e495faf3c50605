"""Data-locality routing: which queue a job goes to, from its inputs and the live domains."""

from __future__ import annotations

from api.enqueue import route
from shared.schemas import ArrayRef, TaskPayload
from shared.settings import Settings

SETTINGS = Settings(queue="q", shm_domain="here")


def payload(*domains: str) -> TaskPayload:
    inputs = {
        f"x{i}": ArrayRef(
            id=f"{i:032x}",
            segment=f"forklift_{i:032x}",
            shape=(1,),
            dtype="<f8",
            nbytes=8,
            domain=d,
        )
        for i, d in enumerate(domains)
    }
    return TaskPayload(job_id="0" * 32, task="sum", params={}, inputs=inputs)


def test_no_inputs_go_to_the_common_queue() -> None:
    assert route(SETTINGS, payload(), {"a", "b"}) == "q"


def test_inputs_in_one_live_domain_go_to_its_queue() -> None:
    assert route(SETTINGS, payload("a", "a"), {"a", "b"}) == "q.a"
    assert route(SETTINGS, payload("a"), None) == "q.a"  # liveness unknown: stay local


def test_inputs_in_a_domain_without_live_workers_go_to_the_common_queue() -> None:
    assert route(SETTINGS, payload("a"), {"b"}) == "q"
    assert route(SETTINGS, payload("a"), set()) == "q"


def test_inputs_in_two_domains_go_to_the_common_queue() -> None:
    assert route(SETTINGS, payload("a", "b"), {"a", "b"}) == "q"

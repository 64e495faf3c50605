"""Read by mypy (tests/test_types.py), never run: a store's methods have real types per client.

A store given a sync client answers values; one given an async client answers awaitables of the
same values. A line ending in `# type: ignore[...]` must be an error: mypy reports an unused
ignore (`warn_unused_ignores`), so a store that loses its types fails the test.
"""

from __future__ import annotations

from typing import assert_type

import redis
import redis.asyncio as aioredis

from shared.arrays.replicas import Claim, ReplicaStore
from shared.arrays.store import ArrayRecord, ArrayStore, Dropped
from shared.jobstore import Due, JobRecord, JobStore
from shared.schemas import JobStatus, WorkerSeen
from shared.settings import Settings
from shared.workers import WorkerStore


def sync_stores(client: redis.Redis, settings: Settings) -> None:
    jobs = JobStore(client, settings)
    assert_type(jobs.get("j"), JobRecord | None)
    assert_type(jobs.start("j", "host", 1, "domain"), tuple[str, int, list[str]])
    assert_type(jobs.finish("j", JobStatus.succeeded), tuple[str, Due])
    arrays = ArrayStore(client, settings)
    assert_type(arrays.get_many(["a"]), list[ArrayRecord | None])
    assert_type(arrays.drop("a"), Dropped | None)
    assert_type(ReplicaStore(client, settings).claim("a", 8, "t", 1.0), Claim)
    assert_type(WorkerStore(client, settings).live(), list[WorkerSeen])
    status: JobStatus = jobs.get("j").status  # type: ignore[union-attr]  # None: no record
    del status


async def async_stores(client: aioredis.Redis, settings: Settings) -> None:
    jobs = JobStore(client, settings)
    assert_type(await jobs.get("j"), JobRecord | None)
    assert_type(await jobs.cancel("j"), tuple[str, list[str]])
    arrays = ArrayStore(client, settings)
    assert_type(await arrays.reserve("a", (2,), "<f8", "C", 16, "owner"), int | None)
    assert_type(await WorkerStore(client, settings).live_domains(), set[str])
    outcome: tuple[str, list[str]] = jobs.cancel("j")  # type: ignore[assignment]  # no await
    del outcome

"""Jobs due later: delayed jobs and retries wait in forklift's own index, not in the broker.

Celery's `eta`/`countdown` keeps such a message reserved in a worker's memory and, on Redis,
redelivers it after the visibility timeout; forklift never sends a message before its job may
start. A delayed or retried job is a `queued` record in `jobs:due` (score: when due), put
there by the script that creates it or schedules its retry. Every API runs `move_due` a few
times a second: one script claims the due ids (a lease, so two APIs never both publish one,
and an API that dies mid-move leaves them to be claimed again), the messages are rebuilt from
the records and published, and each id leaves the index only if its lease is still the one
claimed (a retry scheduled again meanwhile keeps its entry).

A mover does not poll: after a pass it reads the index's first score and sleeps until then
(at most `IDLE_S`), and whatever adds an entry wakes every API's mover: the create script of a
delayed job and `DueStore.put` publish the due time on `Keys.jobs_due_wake`, a retry's `queued`
event carries `retry_at` (the API's event hub calls `on_due` for both, and after each
resubscription, when messages may have been lost). An idle API costs Redis a few commands
every `IDLE_S`, not ten a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Generic

import redis

from shared.arrays.store import ArrayStore
from shared.jobstore import JobRecord, JobStore
from shared.redis_io import ClientT, MaybeAwaitable, round_trip, then
from shared.schemas import ArrayRef, PartRef, TaskPayload
from shared.settings import Settings

log = logging.getLogger("forklift.due")

INTERVAL_S = 0.2  # a due job the mover knows of is published within this of its time
IDLE_S = 5.0  # with nothing due sooner, a mover looks again after this, woken or not
LEASE_S = 30.0  # a claimed id is claimed again after this if its mover did not finish
BATCH = 500  # ids moved per pass at most

_CLAIM = """
-- KEYS: due   ARGV: now, lease, max, job-key prefix   -> ids to publish (scores: the lease)
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[4] .. id
  if redis.call('HGET', key, 'status') == 'queued' then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    redis.call('HSET', key, 'requeued_at', ARGV[1])  -- the reaper's grace starts now
    table.insert(out, id)
  else
    redis.call('ZREM', KEYS[1], id)  -- cancelled or gone while it waited
  end
end
return out
"""

_DONE = """
-- KEYS: due   ARGV: lease score, ids...   -> ids removed
local n = 0
for i = 2, #ARGV do
  if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]) or '-1') == tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""


class DueStore(Generic[ClientT]):
    """The due index (`Keys.jobs_due`); every method is one round trip."""

    def __init__(self, client: ClientT, settings: Settings) -> None:
        self.client: ClientT = client
        self.settings = settings
        self.key = settings.keys.jobs_due
        self._claim = client.register_script(_CLAIM)
        self._done = client.register_script(_DONE)

    @round_trip
    def put(self, job_id: str, at: float) -> MaybeAwaitable[int]:
        """Publish `job_id` at `at` (a waiting job launched with a delay still to run)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.key, {job_id: at})
        pipe.publish(self.settings.keys.jobs_due_wake, repr(at))
        return then(pipe.execute(), lambda replies: int(replies[0]))

    @round_trip
    def next_due(self) -> MaybeAwaitable[float | None]:
        """The index's first score (a due time or a lease's end), None when it is empty."""
        reply = self.client.zrange(self.key, 0, 0, withscores=True)
        return then(reply, lambda rows: float(rows[0][1]) if rows else None)

    @round_trip
    def claim(self, now: float, lease: float = LEASE_S) -> MaybeAwaitable[list[str]]:
        """The queued ids due by `now`, leased until `now + lease`."""
        args: list[str | float] = [repr(now), repr(lease), BATCH, self.settings.keys.job_prefix]
        return then(self._claim(keys=[self.key], args=args), lambda ids: [str(i) for i in ids])

    @round_trip
    def done(self, ids: list[str], lease_score: float) -> MaybeAwaitable[int]:
        """Drop published ids whose entry is still the claimed lease."""
        args = [repr(lease_score), *ids]
        return then(self._done(keys=[self.key], args=args), int)


def payload_of(record: JobRecord, arrays: ArrayStore[redis.Redis]) -> TaskPayload | None:
    """A job's message rebuilt from its record (None if an input array is gone): a due job's
    first message, a retry's, a lost one's (shared/jobs_reaper.py)."""
    inputs = {}
    records = arrays.get_many(list(record.inputs.values())) if record.inputs else []
    for name, array in zip(record.inputs, records, strict=True):
        if array is None:
            return None
        inputs[name] = array.ref()
    return TaskPayload(
        job_id=record.id,
        task=record.task,
        params=record.params,
        inputs=inputs,
        timeout=record.timeout,
        owner=record.owner,
        part=PartRef.model_validate(record.part) if record.part else None,
        output=ArrayRef.model_validate(record.output) if record.output else None,
        priority=record.priority,
        retries=record.retries,
        retried=record.retried,
    )


class DueMover:
    """One pass publishes the jobs now due (blocking: a thread's work, as the reaper's)."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        publish: Callable[[list[TaskPayload]], object],
    ) -> None:
        self.store = DueStore(client, settings)
        self.jobs = JobStore(client, settings)
        self.arrays = ArrayStore(client, settings)
        self.publish = publish

    def next_due(self) -> float | None:
        return self.store.next_due()

    def __call__(self) -> int:
        """Returns how many messages it published."""
        now = time.time()
        ids = self.store.claim(now)
        if not ids:
            return 0
        payloads = []
        for job_id, record in zip(ids, self.jobs.get_many(ids), strict=True):
            payload = payload_of(record, self.arrays) if record is not None else None
            if payload is None:  # an input gone under a pinned job: the reaper ends it
                log.warning("job %s: due, but its message cannot be rebuilt", job_id)
                continue
            payloads.append(payload)
        if payloads:
            self.publish(payloads)
        self.store.done(ids, now + LEASE_S)
        return len(payloads)

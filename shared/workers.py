"""Worker presence in Redis: who is online, in which shm domain, holding which jobs.

Each worker's main process beats every `INTERVAL_S` (`worker/heartbeat.py`): it refreshes its
score in the `workers` sorted set (score = last beat), its `WorkerPresence` record and the list
of jobs it holds (`worker:<name>:held`, the ids of the requests it has received and not yet
finished, with the time they were read), both with a TTL. Every reader goes through
`WorkerStore`: `/healthz` counts members seen recently, routing and `GET /cluster` read the
live workers, `/metrics` every recent one, and the job reaper (`shared/jobs_reaper.py`) the
held lists, to tell a running job whose worker is alive but lost it from one still running.
Nothing needs a broadcast round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, Generic

from pydantic import ValidationError

from shared.redis_io import ClientT, MaybeAwaitable, ready, round_trip, then
from shared.schemas import WorkerPresence, WorkerSeen
from shared.settings import Settings

INTERVAL_S = 2.0
STALE_AFTER_S = 10.0
RECORD_TTL_S = int(STALE_AFTER_S * 3)

_SEEN = """
-- KEYS: workers   ARGV: oldest beat, worker-key prefix   -> {name, last beat, record-json, ...}
-- A worker whose record expired answers '' for it.
local found = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES')
local out = {}
for i = 1, #found, 2 do
  local info = redis.call('GET', ARGV[2] .. found[i]) or ''
  table.insert(out, found[i]); table.insert(out, found[i + 1]); table.insert(out, info)
end
return out
"""


def _record(raw: str | None) -> WorkerPresence | None:
    """A presence record, or None if it is gone or unreadable (written by another version)."""
    if not raw:
        return None
    try:
        return WorkerPresence.model_validate_json(raw)
    except ValidationError:
        return None


def _parse_seen(reply: list[Any], now: float, stale_after: float) -> list[WorkerSeen]:
    """Workers from `_SEEN`'s reply; one with no record (or a bad one) is offline."""
    out = []
    for i in range(0, len(reply), 3):
        name, seen, raw = str(reply[i]), float(reply[i + 1]), reply[i + 2]
        record = _record(raw)
        base = record.model_dump() if record else {"name": name}
        online = record is not None and seen >= now - stale_after
        out.append(WorkerSeen(**{**base, "name": name, "last_seen": seen, "online": online}))
    return out


def _parse_held(names: list[str], raws: list[str | None]) -> dict[str, tuple[float, set[str]]]:
    out = {}
    for name, raw in zip(names, raws, strict=True):
        if raw:
            data = json.loads(raw)
            out[name] = (float(data["at"]), {str(j) for j in data["jobs"]})
    return out


class WorkerStore(Generic[ClientT]):
    """Presence records; each method is one round trip, sync or async like the client given."""

    def __init__(self, client: ClientT, settings: Settings) -> None:
        self.client: ClientT = client
        self.settings = settings
        self.keys = settings.keys
        self._seen = client.register_script(_SEEN)

    # --- the worker's side (worker/heartbeat.py) ----------------------------------------------

    @round_trip
    def beat(
        self, record: WorkerPresence, held: list[str] | None, now: float
    ) -> MaybeAwaitable[None]:
        """One heartbeat: the score, the record, and (when known) the held jobs."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {record.name: now})
        pipe.set(self.keys.worker(record.name), record.model_dump_json(), ex=RECORD_TTL_S)
        if held is not None:
            entry = json.dumps({"at": now, "jobs": held})
            pipe.set(self.keys.worker_held(record.name), entry, ex=RECORD_TTL_S)
        return then(pipe.execute(), lambda _: None)

    @round_trip
    def leave(self, name: str) -> MaybeAwaitable[None]:
        """A worker stopping: gone from every reader at once."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.keys.workers, name)
        pipe.delete(self.keys.worker(name), self.keys.worker_held(name))
        return then(pipe.execute(), lambda _: None)

    # --- readers -------------------------------------------------------------------------------

    @round_trip
    def count_online(self) -> MaybeAwaitable[int]:
        """How many workers beat within `STALE_AFTER_S` (one ZCOUNT)."""
        return then(self.client.zcount(self.keys.workers, time.time() - STALE_AFTER_S, "+inf"), int)

    @round_trip
    def seen(
        self, within: float, stale_after: float = STALE_AFTER_S
    ) -> MaybeAwaitable[list[WorkerSeen]]:
        """Workers that beat within `within` seconds, online or not (with or without record)."""
        now = time.time()
        reply = self._seen(keys=[self.keys.workers], args=[repr(now - within), self._prefix])
        return then(reply, lambda r: _parse_seen(r, now, stale_after))

    @round_trip
    def live(self) -> MaybeAwaitable[list[WorkerSeen]]:
        """Workers whose heartbeat is fresh and whose record is there."""
        return then(self.seen(STALE_AFTER_S), lambda ws: [w for w in ws if w.online])

    @round_trip
    def live_domains(self) -> MaybeAwaitable[set[str]]:
        """The shm domains with at least one live worker."""
        return then(self.live(), lambda ws: {w.domain for w in ws})

    @round_trip
    def beats(self) -> MaybeAwaitable[dict[str, float]]:
        """Every member's last beat, name -> unix time (offline ones too)."""
        reply = self.client.zrange(self.keys.workers, 0, -1, withscores=True)
        return then(reply, lambda r: {str(name): float(score) for name, score in r})

    @round_trip
    def held(self, names: Iterable[str]) -> MaybeAwaitable[dict[str, tuple[float, set[str]]]]:
        """name -> (when read, held job ids) for the workers that have a fresh held list."""
        names = list(names)
        if not names:
            return ready(self.client, {})
        reply = self.client.mget([self.keys.worker_held(n) for n in names])
        return then(reply, lambda raws: _parse_held(names, raws))

    @round_trip
    def records(self, names: Iterable[str]) -> MaybeAwaitable[list[WorkerPresence]]:
        """The presence records of `names` that are still there."""
        names = list(names)
        if not names:
            return ready(self.client, [])
        reply = self.client.mget([self.keys.worker(n) for n in names])
        return then(reply, lambda raws: [r for r in map(_record, raws) if r is not None])

    @property
    def _prefix(self) -> str:
        return self.keys.worker_prefix

"""Who is where: live workers by shm domain, and what each domain holds in shared memory.

Read from the worker heartbeats (`worker/heartbeat.py`: the `workers` sorted set, score = last
beat, and one `worker:<name>` JSON record each), the set of domains the APIs announce, and the
array registry's kept figures (byte counter and ledger per domain, replica set per domain).
Routing (`api/enqueue.py`) asks which domains have a live worker; `GET /cluster` shows it all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from shared.redis_io import AnyRedis, then
from shared.settings import Settings
from worker.heartbeat import STALE_AFTER_S, worker_key, workers_key

_LIVE = """
-- KEYS: workers   ARGV: oldest beat, worker-key prefix   -> {name, last beat, info-json, ...}
local found = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES')
local out = {}
for i = 1, #found, 2 do
  local info = redis.call('GET', ARGV[2] .. found[i])
  if info then
    table.insert(out, found[i]); table.insert(out, found[i + 1]); table.insert(out, info)
  end
end
return out
"""


@dataclass
class WorkerView:
    name: str
    domain: str
    pid: int
    concurrency: int
    last_seen: float
    started_at: float
    api_url: str = ""


def _parse_live(reply: list[Any]) -> list[WorkerView]:
    out = []
    for i in range(0, len(reply), 3):
        name, seen, raw = reply[i : i + 3]
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        out.append(
            WorkerView(
                name=str(name),
                domain=str(info.get("domain", "")),
                pid=int(info.get("pid") or 0),
                concurrency=int(info.get("concurrency") or 0),
                last_seen=float(seen),
                started_at=float(info.get("started_at") or 0.0),
                api_url=str(info.get("api_url") or ""),
            )
        )
    return out


def live_workers(client: AnyRedis, settings: Settings) -> Any:
    """Workers whose heartbeat is fresh (one round trip; sync or async like the client)."""
    script = client.register_script(_LIVE)
    oldest = repr(time.time() - STALE_AFTER_S)
    reply = script(keys=[workers_key(settings)], args=[oldest, worker_key(settings, "")])
    return then(reply, _parse_live)


def live_domains(client: AnyRedis, settings: Settings) -> Any:
    """The shm domains with at least one live worker."""
    return then(live_workers(client, settings), lambda ws: {w.domain for w in ws})


@dataclass
class DomainView:
    domain: str
    workers: list[WorkerView] = field(default_factory=list)
    segments: int = 0  # ledger entries: arrays, replicas and uploads in flight
    replicas: int = 0  # copies of other domains' arrays, pulled for jobs
    shm_bytes: int = 0  # the cap's counter: includes uploads in flight

    @property
    def arrays(self) -> int:
        return max(0, self.segments - self.replicas)


def domains_key(settings: Settings) -> str:
    """Every shm domain an API has served (a small set: one member per host)."""
    return settings.key("domains")


async def announce_domain(client: Any, settings: Settings) -> None:
    """Called by each API at startup, so /cluster finds its domain without a keyspace scan."""
    await client.sadd(domains_key(settings), settings.shm_domain)


async def read_cluster(client: Any, settings: Settings) -> list[DomainView]:
    """Every domain with a live worker or something in shared memory (async client).

    Kept figures only: per domain the byte counter, the ledger's length and the replica
    set's size, a fixed number of commands whatever the number of arrays.
    """
    workers: list[WorkerView] = await live_workers(client, settings)
    announced = await client.smembers(domains_key(settings))
    known = sorted({w.domain for w in workers} | set(announced) | {settings.shm_domain})
    pipe = client.pipeline(transaction=False)
    for domain in known:
        pipe.get(settings.key("shm_bytes", domain))
        pipe.hlen(settings.key("shm_ledger", domain))
        pipe.scard(settings.key("replicas", domain))
    replies = await pipe.execute()
    views = {}
    for i, domain in enumerate(known):
        held, segments, replicas = replies[3 * i : 3 * i + 3]
        views[domain] = DomainView(
            domain=domain,
            segments=int(segments or 0),
            replicas=int(replicas or 0),
            shm_bytes=max(0, int(held or 0)),
        )
    for w in workers:
        views[w.domain].workers.append(w)
    return [
        v
        for d, v in sorted(views.items())
        if v.workers or v.segments or v.shm_bytes or d == settings.shm_domain
    ]

"""Who is where: live workers by shm domain, and what each domain holds in shared memory.

Read from the worker heartbeats (`worker/heartbeat.py`: the `workers` sorted set, score = last
beat, and one `worker:<name>` JSON record each), the array registry and the replica records.
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

# Committed arrays (expiry index) and replicas, per domain: {domain, arrays, array bytes,
# replicas, replica bytes, ...}. ARGV[4..] are the domains whose replica sets to read.
_HOLDINGS = """
-- KEYS: expiry-index   ARGV: array-key-prefix, replica-key-prefix, replica-set-prefix, domains...
local per = {}
local function slot(d)
  if not per[d] then per[d] = {0, 0, 0, 0} end
  return per[d]
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local a = redis.call('HMGET', ARGV[1] .. id, 'domain', 'nbytes')
  if a[1] then
    local s = slot(a[1])
    s[1] = s[1] + 1
    s[2] = s[2] + tonumber(a[2])
  end
end
for i = 4, #ARGV do
  local d = ARGV[i]
  for _, id in ipairs(redis.call('SMEMBERS', ARGV[3] .. d)) do
    local n = redis.call('HGET', ARGV[2] .. d .. ':' .. id, 'nbytes')
    if n then
      local s = slot(d)
      s[3] = s[3] + 1
      s[4] = s[4] + tonumber(n)
    end
  end
end
local out = {}
for d, s in pairs(per) do
  table.insert(out, d)
  for k = 1, 4 do table.insert(out, s[k]) end
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
    arrays: int = 0
    array_bytes: int = 0
    replicas: int = 0
    replica_bytes: int = 0
    shm_bytes: int = 0  # the cap's counter: includes uploads in flight


async def read_cluster(client: Any, settings: Settings) -> list[DomainView]:
    """Every domain with a live worker or something in shared memory (async client)."""
    workers: list[WorkerView] = await live_workers(client, settings)
    known = {w.domain for w in workers} | {settings.shm_domain}
    replica_sets = [key async for key in client.scan_iter(settings.key("replicas", "*"))]
    prefix = settings.key("replicas", "")
    known |= {k[len(prefix) :] for k in replica_sets if k != settings.key("replicas", "stats")}
    script = client.register_script(_HOLDINGS)
    reply = await script(
        keys=[settings.key("arrays", "expiry")],
        args=[
            settings.key("array", ""),
            settings.key("replica", ""),
            prefix,
            *sorted(known),
        ],
    )
    views = {d: DomainView(domain=d) for d in known}
    for i in range(0, len(reply), 5):
        domain = str(reply[i])
        view = views.setdefault(domain, DomainView(domain=domain))
        view.arrays, view.array_bytes, view.replicas, view.replica_bytes = (
            int(x) for x in reply[i + 1 : i + 5]
        )
    for w in workers:
        views[w.domain].workers.append(w)
    ordered = sorted(views)
    counters = await client.mget([settings.key("shm_bytes", d) for d in ordered])
    for domain, value in zip(ordered, counters, strict=True):
        views[domain].shm_bytes = max(0, int(value or 0))
    return [views[d] for d in ordered]

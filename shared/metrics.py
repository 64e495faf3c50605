"""Operational figures kept in Redis, so every API process renders the same numbers.

Workers never serve metrics themselves: the job state-change scripts in `shared/jobstore.py`
bump these counters in the same Lua call that changes a job's state (so a count can never
disagree with the records), and the API's `/metrics` and `/dashboard/state` read them here.

Layout, under `<prefix>:metrics:`:

    submitted            hash  task -> jobs created
    finished             hash  "task|state" -> jobs that reached a final state
    duration             hash  "task|<i>" -> runs in bucket i (1-based, not cumulative; the
                               last is +Inf), "task|sum" -> seconds (runs: the buckets' sum)
    running              hash  job id -> {"domain","node","task","started_at","pid"} (JSON)
    tp:<t // 10>         string  jobs finished in that 10 s slot (expires after ~1 h)
    array_bytes          hash  "upload" / "download" -> bytes of .npy bodies over HTTP

The key names are `shared/keys.py`'s (`Keys.metrics_*`). Worker presence comes from
`shared/workers.py`, shared-memory use from the array registry's kept figures
(`ArrayStore.usage`): the byte counter `shm_bytes:<domain>` and the size of the ledger
`shm_ledger:<domain>` (one entry per segment counted against the cap). A scrape costs a fixed
number of commands per domain and worker, never one per array (no one may make `/metrics`,
which needs no key, do work proportional to what others stored).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from kombu.exceptions import OperationalError

from shared.arrays.store import ArrayStore, ShmUsage
from shared.broker import amqp_queue_depths
from shared.keys import KOMBU_PRIORITY_STEPS, queue_keys
from shared.schemas import WorkerSeen
from shared.settings import Settings
from shared.workers import WorkerStore

log = logging.getLogger("forklift.metrics")

# Job run time buckets (seconds): CPU jobs run from milliseconds to the hour limit.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip
THROUGHPUT_SLOT_S = 10
THROUGHPUT_KEEP_S = 3900

# Shared by the scripts that end a job: call before the job's status is overwritten.
#   job: job key, before: status being left ('lost' = never really ran), status: new final
#   state, now: seconds, m: metrics key prefix. `fl_job_counted` is the same for a caller
#   that has read the record's id, task, started_at and parent already (one HMGET for all).
# Five writes per ended job: the count per final state, the running entry, the throughput
# slot (its TTL set by the first job of the slot), the run time's bucket and sum (the run
# count is the buckets' sum, `_parse_durations`).
LUA_JOB_ENDED = (
    """
local function fl_job_counted(id, task, started_at, parent, before, status, now, m)
  if parent then  -- a part of a parallel job: the job is counted, not its parts
    if id then redis.call('HDEL', m .. 'running', id) end
    return
  end
  task = task or '?'
  redis.call('HINCRBY', m .. 'finished', task .. '|' .. status, 1)
  if id then redis.call('HDEL', m .. 'running', id) end
  local slot = m .. 'tp:' .. string.format('%d', math.floor(now / SLOT_S))
  if redis.call('INCR', slot) == 1 then redis.call('EXPIRE', slot, KEEP_S) end
  if before == 'running' and started_at then
    local d = now - tonumber(started_at)
    if d < 0 then d = 0 end
    local b = {BUCKETS}
    local i = #b + 1
    for k = 1, #b do
      if d <= b[k] then i = k; break end
    end
    redis.call('HINCRBY', m .. 'duration', task .. '|' .. i, 1)
    redis.call('HINCRBYFLOAT', m .. 'duration', task .. '|sum', string.format('%.6f', d))
  end
end
local function fl_job_ended(job, before, status, now, m)
  local f = redis.call('HMGET', job, 'id', 'task', 'started_at', 'parent')
  fl_job_counted(f[1], f[2], f[3], f[4], before, status, now, m)
end
""".replace("SLOT_S", str(THROUGHPUT_SLOT_S))
    .replace("KEEP_S", str(THROUGHPUT_KEEP_S))
    .replace("BUCKETS", ", ".join(repr(b) for b in DURATION_BUCKETS))
)

# Running jobs, with entries whose record is gone (expired, deleted) or no longer running
# dropped: the state scripts keep the hash exact, this only sweeps what a lost key left.
_RUNNING = """
-- KEYS: running-hash   ARGV: job-key-prefix
local raw = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #raw, 2 do
  if redis.call('HGET', ARGV[1] .. raw[i], 'status') == 'running' then
    table.insert(out, raw[i]); table.insert(out, raw[i + 1])
  else
    redis.call('HDEL', KEYS[1], raw[i])
  end
end
return out
"""


@dataclass
class Snapshot:
    """Everything `/metrics` and the dashboard show, read in a few round trips."""

    now: float
    submitted: dict[str, int] = field(default_factory=dict)
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    # task -> (non-cumulative bucket counts, len(DURATION_BUCKETS) + 1; sum; count)
    durations: dict[str, tuple[list[int], float, int]] = field(default_factory=dict)
    running: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: list[WorkerSeen] = field(default_factory=list)
    queues: dict[str, int] = field(default_factory=dict)
    shm_bytes: dict[str, int] = field(default_factory=dict)
    shm_segments: dict[str, int] = field(default_factory=dict)
    array_bytes: dict[str, int] = field(default_factory=dict)

    def busy(self) -> dict[str, int]:
        """Jobs in the running state, per shm domain."""
        out: dict[str, int] = {}
        for entry in self.running.values():
            domain = str(entry.get("domain", ""))
            out[domain] = out.get(domain, 0) + 1
        return out

    def domains(self) -> list[str]:
        found = {w.domain for w in self.workers} | set(self.shm_bytes) | set(self.shm_segments)
        found |= set(self.busy())
        return sorted(d for d in found if d)


def _split(field_name: str) -> tuple[str, str]:
    task, _, rest = field_name.rpartition("|")
    return task, rest


def _parse_durations(raw: dict[str, str]) -> dict[str, tuple[list[int], float, int]]:
    out: dict[str, tuple[list[int], float, int]] = {}
    slots = len(DURATION_BUCKETS) + 1
    for name, value in raw.items():
        task, part = _split(name)
        buckets, total, count = out.get(task, ([0] * slots, 0.0, 0))
        if part == "sum":
            total = float(value)
        elif part == "count":  # written before the count was the buckets' sum
            count = int(value)
        elif part.isdigit() and 1 <= int(part) <= slots:
            buckets[int(part) - 1] = int(value)
        out[task] = (buckets, total, count)
    return {task: (b, total, max(count, sum(b))) for task, (b, total, count) in out.items()}


async def read_snapshot(client: Any, settings: Settings, *, stale_after: float) -> Snapshot:
    """Read every figure (async Redis client). Raises the client's errors when Redis is down."""
    keys = settings.keys
    now = time.time()
    running_script = client.register_script(_RUNNING)

    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.metrics_submitted)
    pipe.hgetall(keys.metrics_finished)
    pipe.hgetall(keys.metrics_duration)
    pipe.hgetall(keys.metrics_array_bytes)
    submitted, finished, durations, array_bytes = await pipe.execute()
    running_flat = await running_script(keys=[keys.metrics_running], args=[keys.job_prefix])
    # Offline ones too, for a while: a worker that crashed without leaving shows as down
    # (then long gone, not worth a line).
    workers = await WorkerStore(client, settings).seen(3 * stale_after, stale_after)

    snap = Snapshot(now=now, workers=workers)
    snap.submitted = {k: int(v) for k, v in submitted.items()}
    snap.finished = {_split(k): int(v) for k, v in finished.items()}
    snap.durations = _parse_durations(durations)
    snap.array_bytes = {k: int(v) for k, v in array_bytes.items()}
    for i in range(0, len(running_flat), 2):
        try:
            snap.running[running_flat[i]] = json.loads(running_flat[i + 1])
        except ValueError:
            snap.running[running_flat[i]] = {}

    domains = sorted(set(snap.domains()) | {settings.shm_domain})
    usage: dict[str, ShmUsage] = await ArrayStore(client, settings).usage(domains)
    for domain, held in usage.items():
        snap.shm_bytes[domain] = held.bytes
        if held.segments:
            snap.shm_segments[domain] = held.segments
    queues = [settings.queue, *(settings.domain_queue(d) for d in domains)]
    if settings.broker_is_amqp:
        snap.queues = await _amqp_depths(settings, queues)
        return snap
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue):
            pipe.llen(key)
    depths = await pipe.execute()
    steps = len(KOMBU_PRIORITY_STEPS)
    for i, queue in enumerate(queues):
        snap.queues[queue] = sum(int(n) for n in depths[i * steps : (i + 1) * steps])
    return snap


async def _amqp_depths(settings: Settings, queues: list[str]) -> dict[str, int]:
    """RabbitMQ's ready counts (shared/broker.py), in a thread; none when the broker does
    not answer: the other figures are Redis's and still worth serving (the gauge is absent)."""
    try:
        return await to_thread.run_sync(amqp_queue_depths, settings, queues)
    except OperationalError as exc:
        log.warning("queue depth unavailable: the broker did not answer: %s", exc)
        return {}


async def read_throughput(client: Any, settings: Settings, slots: int = 60) -> list[int]:
    """Jobs finished in each of the last `slots` 10 s slots, oldest first (current included)."""
    current = math.floor(time.time() / THROUGHPUT_SLOT_S)
    keys = [settings.keys.metrics_throughput(current - i) for i in range(slots - 1, -1, -1)]
    return [int(v or 0) for v in await client.mget(keys)]


async def count_array_bytes(client: Any, settings: Settings, direction: str, n: int) -> None:
    """Add `n` bytes to the upload or download counter."""
    if n > 0:
        await client.hincrby(settings.keys.metrics_array_bytes, direction, n)

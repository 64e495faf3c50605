"""Job records in Redis: the API's own truth about a job, independent of Celery's results.

Celery answers PENDING for ids it never saw; forklift keeps a hash per job so unknown ids get
404 and every state change is one atomic Lua script that also publishes an event (waiters and
event streams wake on it instead of polling). State machine:

    queued ──start──▶ running ──finish──▶ succeeded | failed
      │                  │
      └──cancel──▶ cancelled ◀──cancel──┘

A redelivered message (worker lost) finds `running` and starts again, up to max attempts;
each delivery's run holds an attempt token, and only the holder of the record's current token
may finish it. Input arrays are pinned at creation and released exactly once (`released`
flag), in the same script that ends the job, by whoever ends it; when a running job is
cancelled, by the attempt that held it once it has stopped (or the reaper, once it is gone).

A record has no TTL while it is live (queued, running, or ended with its inputs still pinned):
it cannot expire under a job that has not run yet. Live jobs are indexed in `jobs:live`
(score = creation time), which `shared/jobs_reaper.py` walks to end the jobs whose message or
worker was lost; the TTL (`FORKLIFT_JOB_TTL`) starts when the inputs are released.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Generic

from shared.metrics import LUA_JOB_ENDED
from shared.redis_io import ClientT, MaybeAwaitable, ready, round_trip, then
from shared.schemas import JobBase, JobStatus, JobView, WorkerInfo
from shared.settings import Settings

# Unpinning, shared by every script that may release a job's inputs.
#   ids: space-separated array ids, ap: array key prefix, now: seconds, grace: seconds an
#   unpinned array outlives its expiry (the janitor frees it). Returns ids due to be freed.
#   fl_release(job, ...) unpins a job's inputs once (`released`); a record that is final then
#   gets its TTL and leaves the live index.
LUA_RELEASE = """
local function fl_unpin(ids, ap, now, grace)
  local free = {}
  for id in string.gmatch(ids, '%S+') do
    local key = ap .. id
    if redis.call('EXISTS', key) == 1 then
      local pins = redis.call('HINCRBY', key, 'pins', -1)
      if pins <= 0 then
        local a = redis.call('HMGET', key, 'delete_requested', 'expires_at')
        if a[1] == '1' or tonumber(a[2]) <= now then
          table.insert(free, id)
        else
          redis.call('EXPIREAT', key, math.ceil(tonumber(a[2]) + grace))
        end
      end
    end
  end
  return free
end
local function fl_release(job, ap, now, grace, ttl, live)
  if redis.call('HSETNX', job, 'released', '1') == 0 then return {} end
  local f = redis.call('HMGET', job, 'id', 'input_ids', 'status')
  local free = fl_unpin(f[2] or '', ap, now, grace)
  if f[3] ~= 'queued' and f[3] ~= 'running' then
    redis.call('EXPIRE', job, ttl)
    redis.call('ZREM', live, f[1])
  end
  return free
end
local function fl_append(out, more)
  for _, v in ipairs(more) do table.insert(out, v) end
  return out
end
"""

_CREATE = """
-- KEYS: job, jobs-index, live-index, array keys...   ARGV: now, owner, fields-json, metrics
local now = tonumber(ARGV[1])
for i = 4, #KEYS do
  local a = redis.call('HMGET', KEYS[i], 'state', 'owner', 'delete_requested')
  if a[1] ~= 'ready' or a[2] ~= ARGV[2] or a[3] == '1' then
    return {'missing', i - 4}
  end
end
for i = 4, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'pins', 1)
  redis.call('PERSIST', KEYS[i])
end
local fields = cjson.decode(ARGV[3])
local flat = {'status', 'queued', 'created_at', ARGV[1], 'attempts', 0}
for k, v in pairs(fields) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', KEYS[2], now, fields['id'])
redis.call('ZADD', KEYS[3], now, fields['id'])
redis.call('HINCRBY', ARGV[4] .. 'submitted', fields['task'], 1)
return {'ok'}
"""

_START = """
-- KEYS: job, events, live   ARGV: now, hostname, pid, domain, max-attempts, metrics-prefix,
--   node, token, array-key-prefix, grace, ttl   -> {outcome, attempts, ids to free...}
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', 0} end
local now = tonumber(ARGV[1])
if st == 'running' and redis.call('HGET', KEYS[1], 'attempt_token') == ARGV[8] then
  return {'started', tonumber(redis.call('HGET', KEYS[1], 'attempts'))}  -- a retried call
end
if st ~= 'queued' and st ~= 'running' then
  local out = {st, 0}
  if redis.call('HGET', KEYS[1], 'cancelled_from') == 'queued' then  -- no attempt holds it
    fl_append(out, fl_release(KEYS[1], ARGV[9], now, tonumber(ARGV[10]), ARGV[11], KEYS[3]))
  end
  return out
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[5]) then
  fl_job_ended(KEYS[1], 'lost', 'failed', now, ARGV[6])
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error',
    'worker lost: the worker process running this job died ' .. (attempts - 1) ..
    ' time(s) (killed, out of memory or crashed); not retried again')
  redis.call('PUBLISH', KEYS[2], cjson.encode({id = redis.call('HGET', KEYS[1], 'id'),
    status = 'failed'}))
  return fl_append({'exhausted', attempts},
    fl_release(KEYS[1], ARGV[9], now, tonumber(ARGV[10]), ARGV[11], KEYS[3]))
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'hostname', ARGV[2],
  'pid', ARGV[3], 'domain', ARGV[4], 'node', ARGV[7], 'attempt_token', ARGV[8])
local job = redis.call('HMGET', KEYS[1], 'id', 'task')
redis.call('HSET', ARGV[6] .. 'running', job[1], cjson.encode({domain = ARGV[4],
  node = ARGV[7], task = job[2], started_at = tonumber(ARGV[1]), pid = tonumber(ARGV[3])}))
redis.call('PUBLISH', KEYS[2], cjson.encode({id = redis.call('HGET', KEYS[1], 'id'),
  status = 'running'}))
return {'started', attempts}
"""

_PROGRESS = """
-- KEYS: job, events   ARGV: progress-json
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
redis.call('PUBLISH', KEYS[2], cjson.encode({id = redis.call('HGET', KEYS[1], 'id'),
  status = 'running', progress = cjson.decode(ARGV[1])}))
return 1
"""

_FINISH = """
-- KEYS: job, events, live   ARGV: now, status, error, result-json, ttl, require-pid,
--   metrics-prefix, token, array-key-prefix, grace   -> {outcome, ids to free...}
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'ended_by') == ARGV[8] then
  return {'ok'}  -- a retried call whose first reply was lost
end
if st ~= 'running' then return {st} end
local holder = redis.call('HMGET', KEYS[1], 'pid', 'attempt_token')
if ARGV[6] ~= '' and holder[1] ~= ARGV[6] then return {'moved'} end
if ARGV[8] ~= '' and holder[2] ~= ARGV[8] then return {'moved'} end
fl_job_ended(KEYS[1], 'running', ARGV[2], tonumber(ARGV[1]), ARGV[7])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[1], 'ended_by', ARGV[8])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[4]) end
redis.call('PUBLISH', KEYS[2], cjson.encode({id = redis.call('HGET', KEYS[1], 'id'),
  status = ARGV[2]}))
return fl_append({'ok'},
  fl_release(KEYS[1], ARGV[9], tonumber(ARGV[1]), tonumber(ARGV[10]), ARGV[5], KEYS[3]))
"""

_CANCEL = """
-- KEYS: job, events, cancel-channel   ARGV: now, metrics-prefix
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'queued' and st ~= 'running' then return st end
fl_job_ended(KEYS[1], st, 'cancelled', tonumber(ARGV[1]), ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1],
  'error', 'cancelled by the client', 'cancelled_from', st)
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('PUBLISH', KEYS[2], cjson.encode({id = id, status = 'cancelled'}))
if st == 'running' then redis.call('PUBLISH', KEYS[3], id) end
return st
"""

_RELEASE = """
-- KEYS: job, live, tombstone   ARGV: array-key-prefix, now, grace, ttl, mode, token,
--   job id, input ids (mode 'missing')...
-- mode 'any': release now (the record is not running: cancelled while queued, or discarded);
-- 'owner': only the attempt holding `token`, once the record is final (after a cancel);
-- 'ended': only if the record is final (the reaper, once no attempt holds it);
-- 'missing': the record is gone; the ids come from the message, released once per job id.
local now, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[5] ~= 'missing' then return {} end
  redis.call('ZREM', KEYS[2], ARGV[7])
  if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[4])) then return {} end
  local ids = {}
  for i = 8, #ARGV do table.insert(ids, ARGV[i]) end
  return fl_unpin(table.concat(ids, ' '), ARGV[1], now, grace)
end
if ARGV[5] == 'missing' then return {} end
if ARGV[5] ~= 'any' then
  local f = redis.call('HMGET', KEYS[1], 'status', 'attempt_token')
  if f[1] == 'queued' or f[1] == 'running' then return {} end
  if ARGV[5] == 'owner' and f[2] ~= ARGV[6] then return {} end
end
return fl_release(KEYS[1], ARGV[1], now, grace, ARGV[4], KEYS[2])
"""

# The reaper's transitions (shared/jobs_reaper.py), each conditioned on what it saw.
_REQUEUE = """
-- KEYS: job, events   ARGV: token, now, metrics-prefix
-- A running job whose worker is gone goes back to queued (its message is put back too).
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt_token', 'id')
if f[1] ~= 'running' or f[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'requeued_at', ARGV[2])
redis.call('HDEL', ARGV[3] .. 'running', f[3])
redis.call('PUBLISH', KEYS[2], cjson.encode({id = f[3], status = 'queued'}))
return 1
"""

_END_LOST = """
-- KEYS: job, events, live   ARGV: now, status, error, expect ('queued'/'running'/'live'),
--   token ('' = any), metrics-prefix, array-key-prefix, grace, ttl
--   -> {outcome, ids to free...}
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt_token', 'id')
if not f[1] then return {'missing'} end
local live = f[1] == 'queued' or f[1] == 'running'
if not live or (ARGV[4] ~= 'live' and f[1] ~= ARGV[4]) then return {f[1]} end
if ARGV[5] ~= '' and f[2] ~= ARGV[5] then return {'moved'} end
local now = tonumber(ARGV[1])
fl_job_ended(KEYS[1], f[1] == 'running' and 'running' or 'lost', ARGV[2], now, ARGV[6])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[1], 'error', ARGV[3])
redis.call('PUBLISH', KEYS[2], cjson.encode({id = f[3], status = ARGV[2]}))
return fl_append({'ok'}, fl_release(KEYS[1], ARGV[7], now, tonumber(ARGV[8]), ARGV[9], KEYS[3]))
"""


class JobRecord(JobBase):
    """The stored job (`Keys.job`): the view's fields and those clients never see (owner,
    where it runs, attempt bookkeeping). Every field is a hash field of the same name."""

    owner: str = ""
    hostname: str = ""
    pid: int = 0
    domain: str = ""
    timeout: float | None = None
    node: str = ""  # the Celery worker (heartbeat name) whose child holds the job
    attempt_token: str = ""
    released: bool = False

    def view(self) -> JobView:
        worker = None
        if self.pid:
            worker = WorkerInfo(hostname=self.hostname, pid=self.pid, domain=self.domain)
        shared = {name: getattr(self, name) for name in JobBase.model_fields}
        return JobView(**shared, worker=worker)


def _parse_record(raw: dict[str, str]) -> JobRecord | None:
    if not raw or "status" not in raw:
        return None
    data: dict[str, Any] = {k: v for k, v in raw.items() if v != ""}
    for name in ("params", "inputs", "progress", "result"):
        if name in data:
            data[name] = json.loads(data[name])
    return JobRecord.model_validate(data)


class JobStore(Generic[ClientT]):
    """Job records; every method is one round trip, sync or async like the client given."""

    def __init__(self, client: ClientT, settings: Settings) -> None:
        self.client: ClientT = client
        self.settings = settings
        self.keys = keys = settings.keys
        self.events_channel = keys.events
        self.cancel_channel = keys.cancel
        self.index_key = keys.jobs
        self.live_key = keys.jobs_live
        self.metrics = keys.metrics_prefix
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(LUA_JOB_ENDED + LUA_RELEASE + _START)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(LUA_JOB_ENDED + LUA_RELEASE + _FINISH)
        self._cancel = client.register_script(LUA_JOB_ENDED + _CANCEL)
        self._release = client.register_script(LUA_RELEASE + _RELEASE)
        self._requeue = client.register_script(_REQUEUE)
        self._end_lost = client.register_script(LUA_JOB_ENDED + LUA_RELEASE + _END_LOST)

    def key(self, job_id: str) -> str:
        return self.keys.job(job_id)

    def _release_args(self) -> list[Any]:
        """Array key prefix, now, grace, record TTL: what every unpinning script needs."""
        return [
            self.keys.array_prefix,
            repr(time.time()),
            self.settings.janitor_interval,
            self.settings.job_ttl,
        ]

    @round_trip
    def create(
        self,
        job_id: str,
        task: str,
        params: dict[str, Any],
        inputs: dict[str, str],
        owner: str,
        timeout: float | None = None,
    ) -> MaybeAwaitable[str | None]:
        """Create a queued record and pin its input arrays, atomically.

        Returns None on success, or the input name whose array is missing (or not the
        owner's, or being deleted: the caller cannot tell them apart, by design).
        """
        names = list(inputs)
        fields = {
            "id": job_id,
            "task": task,
            "owner": owner,
            "params": json.dumps(params),
            "inputs": json.dumps(inputs),
            "input_ids": " ".join(inputs[n] for n in names),
            "timeout": "" if timeout is None else repr(timeout),
        }
        keys = [self.key(job_id), self.index_key, self.live_key]
        keys += [self.keys.array(inputs[n]) for n in names]
        args = [repr(time.time()), owner, json.dumps(fields), self.metrics]

        def parse(reply: list[Any]) -> str | None:
            return None if reply[0] == "ok" else names[int(reply[1])]

        return then(self._create(keys=keys, args=args), parse)

    @round_trip
    def get(self, job_id: str) -> MaybeAwaitable[JobRecord | None]:
        return then(self.client.hgetall(self.key(job_id)), _parse_record)

    @round_trip
    def get_many(self, job_ids: list[str]) -> MaybeAwaitable[list[JobRecord | None]]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.key(job_id))
        return then(pipe.execute(), lambda replies: [_parse_record(r) for r in replies])

    @round_trip
    def fields(
        self, job_ids: list[str], names: Sequence[str]
    ) -> MaybeAwaitable[list[dict[str, str | None]]]:
        """Some raw fields of many records, one dict per id (None for a field or record that
        is not there): for the readers that must not load whole records (params, results)."""

        def parse(rows: list[list[str | None]]) -> list[dict[str, str | None]]:
            return [dict(zip(names, row, strict=True)) for row in rows]

        if not job_ids:
            return ready(self.client, [])
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.key(job_id), list(names))
        return then(pipe.execute(), parse)

    @round_trip
    def trim_index(self, before: float) -> MaybeAwaitable[int]:
        """Drop ids created before `before` from the index of all jobs (their records have
        expired by then; the janitor calls this)."""
        return then(self.client.zremrangebyscore(self.index_key, 0, before), int)

    @round_trip
    def recent_ids(self, n: int) -> MaybeAwaitable[list[str]]:
        """The ids of the `n` newest jobs, newest first (the index may hold expired ones)."""
        return then(self.client.zrevrange(self.index_key, 0, n - 1), lambda ids: list(ids))

    @round_trip
    def start(
        self,
        job_id: str,
        hostname: str,
        pid: int,
        domain: str,
        node: str = "",
        token: str = "",
    ) -> MaybeAwaitable[tuple[str, int, list[str]]]:
        """Returns (outcome, attempts, ids to free); outcome is 'started', 'exhausted',
        'missing' or a status.

        `node` is the Celery worker's name (the dashboard's workers and the reaper's check
        that the job's worker still holds it); `token` names this attempt: only its holder may
        finish the record, and a call retried after a lost reply is recognised.
        """
        args: list[str | int | float] = [repr(time.time()), hostname, pid, domain]
        args += [self.settings.job_max_attempts, self.metrics, node, token or uuid.uuid4().hex]
        args += [self.keys.array_prefix, self.settings.janitor_interval]
        args += [self.settings.job_ttl]
        keys = [self.key(job_id), self.events_channel, self.live_key]
        return then(
            self._start(keys=keys, args=args),
            lambda r: (str(r[0]), int(r[1]), [str(x) for x in r[2:]]),
        )

    @round_trip
    def report_progress(self, job_id: str, fraction: float, note: str = "") -> MaybeAwaitable[bool]:
        payload = json.dumps({"fraction": max(0.0, min(1.0, float(fraction))), "note": note[:200]})
        return then(
            self._progress(keys=[self.key(job_id), self.events_channel], args=[payload]), bool
        )

    @round_trip
    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        result: Any = None,
        pid: int | None = None,
        token: str = "",
    ) -> MaybeAwaitable[tuple[str, list[str]]]:
        """End a running record and release its inputs in the same script.

        Returns (outcome, ids to free): 'ok', or the status that won (e.g. 'cancelled'), or
        'moved' (another attempt holds it: `token` or `pid` did not match) or 'missing'.
        """
        array_prefix, now, grace, ttl = self._release_args()
        args = [
            now,
            status.value,
            error or "",
            "" if result is None else json.dumps(result),
            ttl,
            "" if pid is None else str(pid),
            self.metrics,
            token,
            array_prefix,
            grace,
        ]
        keys = [self.key(job_id), self.events_channel, self.live_key]
        return then(
            self._finish(keys=keys, args=args), lambda r: (str(r[0]), [str(x) for x in r[1:]])
        )

    @round_trip
    def cancel(self, job_id: str) -> MaybeAwaitable[str]:
        """Returns the status before cancelling ('queued'/'running'), else the final one."""
        keys = [self.key(job_id), self.events_channel, self.cancel_channel]
        return then(self._cancel(keys=keys, args=[repr(time.time()), self.metrics]), str)

    @round_trip
    def release_inputs(
        self,
        job_id: str,
        *,
        mode: str = "any",
        token: str = "",
        input_ids: list[str] | None = None,
    ) -> MaybeAwaitable[list[str]]:
        """Unpin the job's inputs once; returns ids of arrays now due to be freed.

        `mode` (see `_RELEASE`): 'any' for a record no attempt holds, 'owner' for the attempt
        holding `token` once the record is final, 'ended' for the reaper, 'missing' when the
        record is gone (`input_ids` from the message).
        """
        keys = [self.key(job_id), self.live_key, self.keys.released(job_id)]
        args = [*self._release_args(), mode, token, job_id, *(input_ids or [])]
        return then(self._release(keys=keys, args=args), lambda r: [str(x) for x in r])

    @round_trip
    def requeue(self, job_id: str, token: str) -> MaybeAwaitable[bool]:
        """Running -> queued for a job whose worker is gone (if `token` still holds it)."""
        keys = [self.key(job_id), self.events_channel]
        args = [token, repr(time.time()), self.metrics]
        return then(self._requeue(keys=keys, args=args), bool)

    @round_trip
    def end_lost(
        self,
        job_id: str,
        status: JobStatus,
        error: str,
        *,
        expect: str = "live",
        token: str = "",
    ) -> MaybeAwaitable[tuple[str, list[str]]]:
        """End a live job no attempt will end (message revoked or lost, attempts spent) and
        release its inputs; `expect` and `token` say what the caller saw.

        Returns (outcome, ids to free); outcome 'ok' when this call ended it.
        """
        array_prefix, now, grace, ttl = self._release_args()
        keys = [self.key(job_id), self.events_channel, self.live_key]
        args = [now, status.value, error, expect, token, self.metrics, array_prefix, grace, ttl]
        return then(
            self._end_lost(keys=keys, args=args), lambda r: (str(r[0]), [str(x) for x in r[1:]])
        )

    @round_trip
    def discard(self, job_id: str, task: str) -> MaybeAwaitable[None]:
        """Undo a creation whose message could not be sent: no record, no count, no index.

        Call `release_inputs` first (it needs the record); this removes the rest at once.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key(job_id))
        pipe.zrem(self.index_key, job_id)
        pipe.zrem(self.live_key, job_id)
        pipe.hincrby(self.keys.metrics_submitted, task, -1)
        return then(pipe.execute(), lambda _: None)

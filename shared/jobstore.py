"""Job records in Redis: the API's own truth about a job, independent of Celery's results.

Celery answers PENDING for ids it never saw; forklift keeps a hash per job so unknown ids get
404 and every state change is one atomic Lua script that also publishes an event (waiters and
event streams wake on it instead of polling). State machine:

    queued ──start──▶ running ──finish──▶ succeeded | failed
      │                  │
      └──cancel──▶ cancelled ◀──cancel──┘

A redelivered message (worker lost) finds `running` and starts again, up to max attempts.
Input arrays are pinned at creation and released exactly once (`released` flag), by whoever
ends the job.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel

from shared.metrics import LUA_JOB_ENDED, metrics_prefix
from shared.redis_io import AnyRedis, then
from shared.schemas import JobStatus, JobView, Progress, WorkerInfo
from shared.settings import Settings

_CREATE = """
-- KEYS: job, jobs-index, array keys...   ARGV: now, ttl, owner, fields-json, metrics-prefix
local now = tonumber(ARGV[1])
for i = 3, #KEYS do
  local a = redis.call('HMGET', KEYS[i], 'state', 'owner', 'delete_requested')
  if a[1] ~= 'ready' or a[2] ~= ARGV[3] or a[3] == '1' then
    return {'missing', i - 3}
  end
end
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'pins', 1)
  redis.call('PERSIST', KEYS[i])
end
local fields = cjson.decode(ARGV[4])
local flat = {'status', 'queued', 'created_at', ARGV[1], 'attempts', 0}
for k, v in pairs(fields) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now, fields['id'])
redis.call('HINCRBY', ARGV[5] .. 'submitted', fields['task'], 1)
return {'ok'}
"""

_START = """
-- KEYS: job, events   ARGV: now, hostname, pid, domain, max-attempts, metrics-prefix, node
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', 0} end
if st ~= 'queued' and st ~= 'running' then return {st, 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[5]) then
  fl_job_ended(KEYS[1], 'lost', 'failed', tonumber(ARGV[1]), ARGV[6])
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error',
    'worker lost: the worker process running this job died ' .. (attempts - 1) ..
    ' time(s) (killed, out of memory or crashed); not retried again')
  redis.call('PUBLISH', KEYS[2], cjson.encode({id = redis.call('HGET', KEYS[1], 'id'),
    status = 'failed'}))
  return {'exhausted', attempts}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'hostname', ARGV[2],
  'pid', ARGV[3], 'domain', ARGV[4])
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
-- KEYS: job, events   ARGV: now, status, error, result-json, ttl, require-pid, metrics-prefix
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'running' then return st end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'pid') ~= ARGV[6] then return 'moved' end
fl_job_ended(KEYS[1], 'running', ARGV[2], tonumber(ARGV[1]), ARGV[7])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[4]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('PUBLISH', KEYS[2], cjson.encode({id = redis.call('HGET', KEYS[1], 'id'),
  status = ARGV[2]}))
return 'ok'
"""

_CANCEL = """
-- KEYS: job, events, cancel-channel   ARGV: now, metrics-prefix
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'queued' and st ~= 'running' then return st end
fl_job_ended(KEYS[1], st, 'cancelled', tonumber(ARGV[1]), ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1],
  'error', 'cancelled by the client')
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('PUBLISH', KEYS[2], cjson.encode({id = id, status = 'cancelled'}))
if st == 'running' then redis.call('PUBLISH', KEYS[3], id) end
return st
"""

_RELEASE = """
-- KEYS: job   ARGV: array-key-prefix, now, grace
if redis.call('HSETNX', KEYS[1], 'released', '1') == 0 then return {} end
local ids = redis.call('HGET', KEYS[1], 'input_ids')
local free = {}
if not ids or ids == '' then return free end
for id in string.gmatch(ids, '%S+') do
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 1 then
    local pins = redis.call('HINCRBY', key, 'pins', -1)
    if pins <= 0 then
      local a = redis.call('HMGET', key, 'delete_requested', 'expires_at')
      if a[1] == '1' or tonumber(a[2]) <= tonumber(ARGV[2]) then
        table.insert(free, id)
      else
        redis.call('EXPIREAT', key, math.ceil(tonumber(a[2]) + tonumber(ARGV[3])))
      end
    end
  end
end
return free
"""


class JobRecord(BaseModel):
    """The stored job, including fields clients never see (owner, payload bookkeeping)."""

    id: str
    task: str
    status: JobStatus
    owner: str = ""
    params: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    error: str | None = None
    result: Any = None
    hostname: str = ""
    pid: int = 0
    domain: str = ""
    attempts: int = 0
    timeout: float | None = None

    def view(self) -> JobView:
        worker = None
        if self.pid:
            worker = WorkerInfo(hostname=self.hostname, pid=self.pid, domain=self.domain)
        return JobView(
            id=self.id,
            task=self.task,
            status=self.status,
            params=self.params,
            inputs=self.inputs,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            progress=self.progress,
            error=self.error,
            result=self.result,
            worker=worker,
            attempts=self.attempts,
        )


def _parse_record(raw: dict[str, str]) -> JobRecord | None:
    if not raw or "status" not in raw:
        return None
    data: dict[str, Any] = {k: v for k, v in raw.items() if v != ""}
    for name in ("params", "inputs", "progress", "result"):
        if name in data:
            data[name] = json.loads(data[name])
    return JobRecord.model_validate(data)


class JobStore:
    """Job records; every method is one round trip, sync or async like the client given."""

    def __init__(self, client: AnyRedis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.events_channel = settings.key("events")
        self.cancel_channel = settings.key("cancel")
        self.index_key = settings.key("jobs")
        self.metrics = metrics_prefix(settings)
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(LUA_JOB_ENDED + _START)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(LUA_JOB_ENDED + _FINISH)
        self._cancel = client.register_script(LUA_JOB_ENDED + _CANCEL)
        self._release = client.register_script(_RELEASE)

    def key(self, job_id: str) -> str:
        return self.settings.key("job", job_id)

    def array_key(self, array_id: str) -> str:
        return self.settings.key("array", array_id)

    def create(
        self,
        job_id: str,
        task: str,
        params: dict[str, Any],
        inputs: dict[str, str],
        owner: str,
        timeout: float | None = None,
    ) -> Any:
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
        keys = [self.key(job_id), self.index_key, *(self.array_key(inputs[n]) for n in names)]
        args = [repr(time.time()), self.settings.job_ttl, owner, json.dumps(fields), self.metrics]

        def parse(reply: list[Any]) -> str | None:
            return None if reply[0] == "ok" else names[int(reply[1])]

        return then(self._create(keys=keys, args=args), parse)

    def get(self, job_id: str) -> Any:
        return then(self.client.hgetall(self.key(job_id)), _parse_record)

    def get_many(self, job_ids: list[str]) -> Any:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.key(job_id))
        return then(pipe.execute(), lambda replies: [_parse_record(r) for r in replies])

    def start(self, job_id: str, hostname: str, pid: int, domain: str, node: str = "") -> Any:
        """Returns (outcome, attempts); outcome is 'started', 'exhausted', 'missing' or a status.

        `node` is the Celery worker's name, so the dashboard can show each worker's jobs.
        """
        args = [repr(time.time()), hostname, pid, domain, self.settings.job_max_attempts]
        args += [self.metrics, node]
        return then(
            self._start(keys=[self.key(job_id), self.events_channel], args=args),
            lambda r: (str(r[0]), int(r[1])),
        )

    def report_progress(self, job_id: str, fraction: float, note: str = "") -> Any:
        payload = json.dumps({"fraction": max(0.0, min(1.0, float(fraction))), "note": note[:200]})
        return then(
            self._progress(keys=[self.key(job_id), self.events_channel], args=[payload]), bool
        )

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        result: Any = None,
        pid: int | None = None,
    ) -> Any:
        """Returns 'ok', or the status that won (e.g. 'cancelled'), or 'moved'/'missing'."""
        args = [
            repr(time.time()),
            status.value,
            error or "",
            "" if result is None else json.dumps(result),
            self.settings.job_ttl,
            "" if pid is None else str(pid),
            self.metrics,
        ]
        return then(self._finish(keys=[self.key(job_id), self.events_channel], args=args), str)

    def cancel(self, job_id: str) -> Any:
        """Returns the status before cancelling ('queued'/'running'), else the final one."""
        keys = [self.key(job_id), self.events_channel, self.cancel_channel]
        return then(self._cancel(keys=keys, args=[repr(time.time()), self.metrics]), str)

    def release_inputs(self, job_id: str) -> Any:
        """Unpin the job's inputs once; returns ids of arrays now due to be freed."""
        args = [self.settings.key("array", ""), repr(time.time()), self.settings.janitor_interval]
        return then(self._release(keys=[self.key(job_id)], args=args), list)

    def discard(self, job_id: str, task: str) -> Any:
        """Undo a creation whose message could not be sent: no record, no count, no index.

        Call `release_inputs` first (it needs the record); this removes the rest at once.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key(job_id))
        pipe.zrem(self.index_key, job_id)
        pipe.hincrby(self.metrics + "submitted", task, -1)
        return then(pipe.execute(), lambda _: None)

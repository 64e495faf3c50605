"""Job records in Redis: the API's own truth about a job, independent of Celery's results.

Celery answers PENDING for ids it never saw; forklift keeps a hash per job so unknown ids get
404 and every state change is one atomic Lua script that also publishes an event (waiters and
event streams wake on it instead of polling). State machine:

    queued ──start──▶ running ──finish──▶ succeeded | failed
      │  ▲               │  │
      │  └────retry──────┘  │   (a job that raised, retries left: due again at retry_at)
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
from typing import Any, Generic, NamedTuple

from pydantic import Field

from shared.dependencies import LUA_DEPENDENTS
from shared.metrics import LUA_JOB_ENDED
from shared.redis_io import ClientT, MaybeAwaitable, ready, round_trip, then
from shared.schemas import Attempt, JobBase, JobStatus, JobView, Parts, WorkerInfo
from shared.settings import Settings

# Writing job records, for every script that creates one or moves its progress (JobStore's
# create and progress, the release below, the launch of a waiting job in
# shared/dependencies.py):
#   fl_hset(key, fields, first): one HSET of the pairs in `first` (a flat list), then `fields`;
#   fl_put_parts(parts, jp, live, now, stamp): a parallel job's part records, queued and live
#     (`jp`: the job-key prefix), not listed among the jobs;
#   fl_part_progress(parent, parent_id, index, fraction, events): a part's progress moves its
#     running job's, the mean of its parts' (kept in `<job>:progress`), published;
#   fl_runs_begun(raw, now) / fl_runs_ended(raw, now, error): the record's list of runs
#     (`attempt_log`, the view's `attempts`) as its caller read it, and what to write back:
#     a start appends one (ending the one before as lost if nothing ended it: a
#     redelivery), an end stamps the last with its error (nil: nothing to write);
#     fl_attempt_end(job, now, error) reads and writes it for the rarer endings.
LUA_RECORDS = """
local function fl_runs_ended(raw, now, error)
  local runs = raw and cjson.decode(raw) or {}
  local last = runs[#runs]
  if not last or last['finished_at'] then return nil end
  last['finished_at'] = now
  if error and error ~= '' then last['error'] = error end
  return cjson.encode(runs)
end
local function fl_runs_begun(raw, now)
  local runs = raw and cjson.decode(raw) or {}
  local last = runs[#runs]
  if last and not last['finished_at'] then
    last['finished_at'] = now
    last['error'] = 'worker lost: the process running it died or lost it'
  end
  table.insert(runs, {started_at = now})
  while #runs > 50 do table.remove(runs, 1) end
  return cjson.encode(runs)
end
local function fl_attempt_end(job, now, error)
  local runs = fl_runs_ended(redis.call('HGET', job, 'attempt_log'), now, error)
  if runs then redis.call('HSET', job, 'attempt_log', runs) end
end
local function fl_hset(key, fields, first)
  local flat = first
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  redis.call('HSET', key, unpack(flat))
end
local function fl_put_parts(parts, jp, live, now, stamp)
  for _, part in ipairs(parts) do
    fl_hset(jp .. part['id'], part, {'status', 'queued', 'created_at', stamp, 'attempts', 0})
    redis.call('ZADD', live, now, part['id'])
  end
end
local function fl_part_progress(parent, parent_id, index, fraction, events)
  local p = redis.call('HMGET', parent, 'status', 'parts_total')
  if p[1] ~= 'running' then return end
  redis.call('HSET', parent .. ':progress', index, fraction)
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', parent .. ':progress')) do sum = sum + tonumber(v) end
  local progress = {fraction = sum / tonumber(p[2]), note = ''}
  redis.call('HSET', parent, 'progress', cjson.encode(progress))
  redis.call('PUBLISH', events, cjson.encode({id = parent_id, status = 'running',
    progress = progress}))
end
"""

# The context every state script opens with: KEYS[1..4] = job, events channel, live index,
# cancel channel; ARGV[1..8] = now, array-key prefix, grace (seconds an unpinned array
# outlives its expiry), record TTL, metrics prefix, job-key prefix, attempt token, force.
# Script-specific KEYS and ARGV follow (from KEYS[5], ARGV[9]).
#
# fl_release(job, force) unpins a record's inputs once (`released`), once no attempt holds
# it; a record that is final then gets its TTL and leaves the live index. It returns the ids
# of arrays now due to be freed, and `combine:<id>` for a parallel job whose last part just
# succeeded (its caller runs the combine). Releasing a part counts it on its parallel job:
# a part that did not succeed ends the job and stops the other parts; the job itself is
# released (its inputs unpinned, its in-place output freed unless it succeeded) only once
# every part is released and no combine holds it, so no part ever writes into a segment
# that was freed. A final record's dependents are resolved (`fl_dependents`).
LUA_RELEASE = (
    LUA_RECORDS
    + """
local C = {job = KEYS[1], events = KEYS[2], live = KEYS[3], cancel = KEYS[4],
  now = tonumber(ARGV[1]), ap = ARGV[2], grace = tonumber(ARGV[3]), ttl = tonumber(ARGV[4]),
  m = ARGV[5], jp = ARGV[6], token = ARGV[7], force = ARGV[8] == '1'}
local fl_release
local function fl_unpin(ids)
  local free = {}
  for id in string.gmatch(ids, '%S+') do
    local key = C.ap .. id
    if redis.call('EXISTS', key) == 1 then
      local pins = redis.call('HINCRBY', key, 'pins', -1)
      if pins <= 0 then
        local a = redis.call('HMGET', key, 'delete_requested', 'expires_at')
        if a[1] == '1' or tonumber(a[2]) <= C.now then
          table.insert(free, id)
        else
          redis.call('EXPIREAT', key, math.ceil(tonumber(a[2]) + C.grace))
        end
      end
    end
  end
  return free
end
local function fl_append(out, more)
  for _, v in ipairs(more) do table.insert(out, v) end
  return out
end
local function fl_publish(id, status)
  redis.call('PUBLISH', C.events, cjson.encode({id = id, status = status}))
end
"""
    + LUA_DEPENDENTS
    + """
local function fl_stop_parts(ids, reason)
  local out = {}
  for id in string.gmatch(ids, '%S+') do
    local key = C.jp .. id
    local st = redis.call('HGET', key, 'status')
    if st == 'queued' or st == 'running' then
      fl_job_ended(key, st, 'cancelled', C.now, C.m)
      redis.call('HSET', key, 'status', 'cancelled', 'finished_at', C.now, 'error', reason,
        'cancelled_from', st)
      fl_publish(id, 'cancelled')
      if st == 'running' then
        redis.call('PUBLISH', C.cancel, id)  -- its attempt releases it once it has stopped
      else
        fl_append(out, fl_release(key, false))
      end
    end
  end
  return out
end
local function fl_part_released(part, status, parent_id)
  local parent = C.jp .. parent_id
  local p = redis.call('HMGET', parent, 'status', 'parts_total', 'part_ids')
  if not p[1] then return {} end
  local out = {}
  local index = redis.call('HGET', part, 'part_index') or '0'
  if status == 'succeeded' then
    redis.call('HINCRBY', parent, 'parts_done', 1)
    fl_part_progress(parent, parent_id, index, 1, C.events)
  elseif status == 'failed' then
    redis.call('HINCRBY', parent, 'parts_failed', 1)
  end
  redis.call('HINCRBY', parent, 'parts_released', 1)
  if status ~= 'succeeded' and (p[1] == 'queued' or p[1] == 'running') then
    local ended = status == 'cancelled' and 'cancelled' or 'failed'
    local why = redis.call('HGET', part, 'error') or status
    fl_job_ended(parent, p[1], ended, C.now, C.m)
    redis.call('HSET', parent, 'status', ended, 'finished_at', C.now, 'error',
      'part ' .. (tonumber(index) + 1) .. ' of ' .. p[2] .. ' ' .. status .. ': ' .. why)
    fl_publish(parent_id, ended)
    fl_append(out, fl_stop_parts(p[3], 'cancelled: another part of its job ' .. status))
  end
  local released = tonumber(redis.call('HGET', parent, 'parts_released'))
  if released >= tonumber(p[2]) then
    local st = redis.call('HGET', parent, 'status')
    if st == 'running' then  -- every part succeeded: this attempt combines, and holds the job
      redis.call('HSET', parent, 'combining', C.token, 'attempt_token', C.token,
        'combining_at', C.now)
      table.insert(out, 'combine:' .. parent_id)
    elseif st ~= 'queued' then
      fl_append(out, fl_release(parent, false))
    end
  end
  return out
end
-- `flagged`: the fields above as the caller read them (status: the one it wrote), for a
-- record with no parts whose `released` flag the caller set in its own HSET.
fl_release = function(job, force, flagged)
  local f = flagged or redis.call('HMGET', job, 'id', 'input_ids', 'status', 'parts_total',
    'parts_released', 'parent', 'output_id', 'combining')
  if f[4] and not force then
    if tonumber(f[5] or '0') < tonumber(f[4]) then return {} end  -- parts still run
    if f[8] and f[8] ~= C.token then return {} end  -- its combine still runs
  end
  if not flagged and redis.call('HSETNX', job, 'released', '1') == 0 then return {} end
  local free = fl_unpin(f[2] or '')
  local final = f[3] ~= 'queued' and f[3] ~= 'running' and f[3] ~= 'waiting'
  if final then
    redis.call('EXPIRE', job, C.ttl)
    redis.call('ZREM', C.live, f[1])
    if f[4] then redis.call('DEL', job .. ':progress') end
  end
  if f[7] and f[3] ~= 'succeeded' then table.insert(free, f[7]) end
  if f[6] then fl_append(free, fl_part_released(job, f[3], f[6])) end
  if final then fl_append(free, fl_dependents(job, f[3])) end
  return free
end
"""
)

_CREATE = """
-- KEYS: job, jobs-index, live-index, owner-index, owners, due, array keys...
-- ARGV: now, owner, fields-json, metrics, parts-json, job-key prefix, output key or '',
--   due time or '' (a delayed job: no message until then, shared/due.py), wake channel
local now = tonumber(ARGV[1])
for i = 7, #KEYS do
  local a = redis.call('HMGET', KEYS[i], 'state', 'owner', 'delete_requested')
  if a[1] ~= 'ready' or a[2] ~= ARGV[2] or a[3] == '1' then
    return {'missing', i - 7}
  end
end
for i = 7, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'pins', 1)
  redis.call('PERSIST', KEYS[i])
end
local fields = cjson.decode(ARGV[3])
fl_hset(KEYS[1], fields, {'status', 'queued', 'created_at', ARGV[1], 'attempts', 0})
redis.call('ZADD', KEYS[2], now, fields['id'])
redis.call('ZADD', KEYS[3], now, fields['id'])
redis.call('ZADD', KEYS[4], now, fields['id'])
redis.call('SADD', KEYS[5], ARGV[2])
if ARGV[8] ~= '' then  -- a delayed job: the due movers sleep until their index's first time
  redis.call('ZADD', KEYS[6], tonumber(ARGV[8]), fields['id'])
  redis.call('PUBLISH', ARGV[9], ARGV[8])
end
fl_put_parts(cjson.decode(ARGV[5]), ARGV[6], KEYS[3], now, ARGV[1])
if ARGV[7] ~= '' then redis.call('PERSIST', ARGV[7]) end  -- the output lives as long as the job
redis.call('HINCRBY', ARGV[4] .. 'submitted', fields['task'], 1)
return {'ok'}
"""

_START = """
-- KEYS: context   ARGV: context, hostname, pid, domain, max-attempts, node
--   -> {outcome, attempts, ids to free...}
-- One HMGET, one HSET of the record, its running entry, its event: a first delivery's cost.
local f = redis.call('HMGET', C.job, 'status', 'attempt_token', 'attempts', 'id', 'task',
  'parent', 'attempt_log', 'retry_at', 'cancelled_from')
local st = f[1]
if not st then return {'missing', 0} end
if st == 'running' and f[2] == C.token then
  return {'started', tonumber(f[3])}  -- a retried call
end
if st ~= 'queued' and st ~= 'running' then
  local out = {st, 0}
  if f[9] == 'queued' then  -- cancelled while queued: no attempt holds it
    fl_append(out, fl_release(C.job, false))
  end
  return out
end
local attempts = tonumber(f[3] or '0') + 1
if attempts > tonumber(ARGV[12]) then
  redis.call('HSET', C.job, 'attempts', attempts)
  fl_job_ended(C.job, 'lost', 'failed', C.now, C.m)
  redis.call('HSET', C.job, 'status', 'failed', 'finished_at', ARGV[1], 'error',
    'worker lost: the worker process running this job died ' .. (attempts - 1) ..
    ' time(s) (killed, out of memory or crashed); not retried again')
  fl_attempt_end(C.job, C.now, 'worker lost: the process running it died or lost it')
  fl_publish(f[4], 'failed')
  return fl_append({'exhausted', attempts}, fl_release(C.job, false))
end
redis.call('HSET', C.job, 'status', 'running', 'started_at', ARGV[1], 'hostname', ARGV[9],
  'pid', ARGV[10], 'domain', ARGV[11], 'node', ARGV[13], 'attempt_token', C.token,
  'attempts', attempts, 'attempt_log', fl_runs_begun(f[7], C.now))
if f[8] then redis.call('HDEL', C.job, 'retry_at') end  -- a retry's wait is over
redis.call('HSET', C.m .. 'running', f[4], cjson.encode({domain = ARGV[11],
  node = ARGV[13], task = f[5], started_at = C.now, pid = tonumber(ARGV[10])}))
fl_publish(f[4], 'running')
if f[6] then  -- a part: its parallel job runs from its first part's start
  local parent = C.jp .. f[6]
  if redis.call('HGET', parent, 'status') == 'queued' then
    redis.call('HSET', parent, 'status', 'running', 'started_at', ARGV[1])
    fl_publish(f[6], 'running')
  end
end
return {'started', attempts}
"""

_PROGRESS = """
-- KEYS: job, events   ARGV: progress-json, fraction, job-key prefix
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'id', 'parent', 'part_index')
redis.call('PUBLISH', KEYS[2], cjson.encode({id = f[1], status = 'running',
  progress = cjson.decode(ARGV[1])}))
if f[2] then fl_part_progress(ARGV[3] .. f[2], f[2], f[3], ARGV[2], KEYS[2]) end  -- a part
return 1
"""

_FINISH = """
-- KEYS: context   ARGV: context, status, error, result-json, require-pid
--   -> {outcome, ids to free and combine markers...}
-- One HMGET reads what the ending, its metrics and the release need; one HSET writes the
-- record (and, for a job without parts, its `released` flag: the release below is then
-- this script's, as fl_release's HSETNX would have made it).
local f = redis.call('HMGET', C.job, 'status', 'ended_by', 'pid', 'attempt_token', 'id',
  'task', 'started_at', 'parent', 'attempt_log', 'input_ids', 'parts_total',
  'parts_released', 'output_id', 'combining', 'released')
local st = f[1]
if not st then return {'missing'} end
if C.token ~= '' and f[2] == C.token then
  return {'ok'}  -- a retried call whose first reply was lost
end
if st ~= 'running' then return {st} end
if ARGV[12] ~= '' and f[3] ~= ARGV[12] then return {'moved'} end
if C.token ~= '' and f[4] ~= C.token then return {'moved'} end
fl_job_counted(f[5], f[6], f[7], f[8], 'running', ARGV[9], C.now, C.m)
local set = {'status', ARGV[9], 'finished_at', ARGV[1], 'ended_by', C.token}
local runs = fl_runs_ended(f[9], C.now, ARGV[10])
if runs then table.insert(set, 'attempt_log'); table.insert(set, runs) end
if ARGV[10] ~= '' then table.insert(set, 'error'); table.insert(set, ARGV[10]) end
if ARGV[11] ~= '' then table.insert(set, 'result'); table.insert(set, ARGV[11]) end
local flagged = nil
if not f[11] and not f[15] then
  table.insert(set, 'released'); table.insert(set, '1')
  flagged = {f[5], f[10], ARGV[9], nil, nil, f[8], f[13], f[14]}
end
redis.call('HSET', C.job, unpack(set))
fl_publish(f[5], ARGV[9])
return fl_append({'ok'}, fl_release(C.job, false, flagged))
"""

# A run that raised and may run again (worker/retrying.py): back to `queued`, due at
# `retry-at` (shared/due.py publishes it then), its inputs still pinned for the next run. Not
# an ending: the metrics count no finish, only its running entry goes; the delivery counter
# `attempts` starts again (each run has its own worker-lost bound).
_RETRY = """
-- KEYS: context, due index   ARGV: context, error, delay (s)   -> {outcome}
local st = redis.call('HGET', C.job, 'status')
if not st then return {'missing'} end
if C.token ~= '' and redis.call('HGET', C.job, 'ended_by') == C.token then
  return {'ok'}  -- a retried call whose first reply was lost
end
if st ~= 'running' then return {st} end
if C.token == '' or redis.call('HGET', C.job, 'attempt_token') ~= C.token then
  return {'moved'}
end
local id = redis.call('HGET', C.job, 'id')
local at = C.now + tonumber(ARGV[10])  -- the gap counts from this run's end, exactly
redis.call('HDEL', C.m .. 'running', id)
redis.call('HSET', C.job, 'status', 'queued', 'retry_at', string.format('%.6f', at),
  'attempts', 0, 'ended_by', C.token)
redis.call('HINCRBY', C.job, 'retried', 1)
redis.call('HDEL', C.job, 'progress')
fl_attempt_end(C.job, C.now, ARGV[9])
redis.call('ZADD', KEYS[5], at, id)
redis.call('PUBLISH', C.events, cjson.encode({id = id, status = 'queued', retry_at = at}))
return {'ok'}
"""

_CANCEL = """
-- KEYS: context   ARGV: context   -> {status before (or the final one), ids to free...}
local f = redis.call('HMGET', C.job, 'status', 'part_ids', 'id')
if not f[1] then return {'missing'} end
if f[1] ~= 'queued' and f[1] ~= 'running' and f[1] ~= 'waiting' then return {f[1]} end
fl_job_ended(C.job, f[1], 'cancelled', C.now, C.m)
redis.call('HSET', C.job, 'status', 'cancelled', 'finished_at', ARGV[1],
  'error', 'cancelled by the client', 'cancelled_from', f[1])
if f[1] == 'running' then fl_attempt_end(C.job, C.now, 'cancelled by the client') end
fl_publish(f[3], 'cancelled')
local out = {f[1]}
if f[2] then  -- a parallel job: its parts stop, and the last to stop releases the job
  fl_append(out, fl_stop_parts(f[2], 'cancelled: its job was cancelled'))
elseif f[1] == 'running' then
  redis.call('PUBLISH', C.cancel, f[3])
end
return out
"""

_RELEASE = """
-- KEYS: context, tombstone   ARGV: context, mode, job id, input ids (mode 'missing')...
-- mode 'any': release now (the record is not running: cancelled while queued, or waiting);
-- 'discard': the same for a record being removed (a parallel job's parts included);
-- 'owner': only the attempt holding the token, once the record is final (after a cancel);
-- 'ended': only if the record is final (the reaper, once no attempt holds it);
-- 'missing': the record is gone; the ids come from the message, released once per job id.
local mode = ARGV[9]
if redis.call('EXISTS', C.job) == 0 then
  if mode ~= 'missing' then return {} end
  redis.call('ZREM', C.live, ARGV[10])
  if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', C.ttl) then return {} end
  local ids = {}
  for i = 11, #ARGV do table.insert(ids, ARGV[i]) end
  return fl_unpin(table.concat(ids, ' '))
end
if mode == 'missing' then return {} end
if mode == 'discard' then
  local parts = redis.call('HGET', C.job, 'part_ids') or ''
  for id in string.gmatch(parts, '%S+') do
    redis.call('DEL', C.jp .. id)
    redis.call('ZREM', C.live, id)
  end
  return fl_release(C.job, true)
end
if mode ~= 'any' then
  local f = redis.call('HMGET', C.job, 'status', 'attempt_token')
  if f[1] == 'queued' or f[1] == 'running' or f[1] == 'waiting' then return {} end
  if mode == 'owner' and f[2] ~= C.token then return {} end
end
return fl_release(C.job, C.force)
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
-- KEYS: context   ARGV: context, status, error, expect ('queued'/'running'/'live')
--   -> {outcome, ids to free...}; token '' = any attempt; force: a parallel job whose
--   combine was lost (its parts are all released)
local f = redis.call('HMGET', C.job, 'status', 'attempt_token', 'id')
if not f[1] then return {'missing'} end
local live = f[1] == 'queued' or f[1] == 'running'
if not live or (ARGV[11] ~= 'live' and f[1] ~= ARGV[11]) then return {f[1]} end
if C.token ~= '' and f[2] ~= C.token then return {'moved'} end
fl_job_ended(C.job, f[1] == 'running' and 'running' or 'lost', ARGV[9], C.now, C.m)
redis.call('HSET', C.job, 'status', ARGV[9], 'finished_at', ARGV[1], 'error', ARGV[10])
if f[1] == 'running' then fl_attempt_end(C.job, C.now, ARGV[10]) end
fl_publish(f[3], ARGV[9])
return fl_append({'ok'}, fl_release(C.job, C.force))
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
    # A parallel job: its parts (each a record), counted as they are released, and the
    # in-place output segment reserved for it (shared/splits.py).
    parts_total: int = 0
    parts_done: int = 0
    parts_failed: int = 0
    part_ids: str = ""
    output_id: str = ""
    parallel: int | str | None = None
    # A part: its place in its job (`parent`), and what its message carries, so that the
    # reaper can publish it again (TaskPayload.part and .output, as JSON).
    part_index: int | None = None
    part: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    # Deliveries of the current run (the worker-lost bound, FORKLIFT_JOB_MAX_ATTEMPTS; a
    # retry starts it again), retries made, and every run's start and error (the view's
    # `attempts`).
    attempts: int = 0
    retried: int = 0
    attempt_log: list[Attempt] = Field(default_factory=list)

    def view(self) -> JobView:
        worker = None
        if self.pid:
            worker = WorkerInfo(hostname=self.hostname, pid=self.pid, domain=self.domain)
        parts = None
        if self.parts_total:
            parts = Parts(
                total=self.parts_total,
                done=self.parts_done,
                failed=self.parts_failed,
                ids=self.part_ids.split(),
            )
        shared = {name: getattr(self, name) for name in JobBase.model_fields}
        return JobView(**shared, worker=worker, parts=parts, attempts=self.attempt_log)


def _parse_record(raw: dict[str, str]) -> JobRecord | None:
    if not raw or "status" not in raw:
        return None
    data: dict[str, Any] = {k: v for k, v in raw.items() if v != ""}
    json_fields = ("params", "inputs", "progress", "result", "part", "output", "upstream")
    for name in (*json_fields, "tags", "attempt_log"):
        if name in data:
            data[name] = json.loads(data[name])
    return JobRecord.model_validate(data)


class Due(NamedTuple):
    """What an ending left to do: arrays to free, parallel jobs whose combine to run."""

    free: list[str]
    combine: list[str]


def _due(items: Sequence[Any]) -> Due:
    free, combine = [], []
    for item in map(str, items):
        if item.startswith("combine:"):
            combine.append(item.removeprefix("combine:"))
        else:
            free.append(item)
    return Due(free, combine)


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
        self._create = client.register_script(LUA_RECORDS + _CREATE)
        self._progress = client.register_script(LUA_RECORDS + _PROGRESS)
        self._requeue = client.register_script(_REQUEUE)
        ending = LUA_JOB_ENDED + LUA_RELEASE
        self._start = client.register_script(ending + _START)
        self._finish = client.register_script(ending + _FINISH)
        self._cancel = client.register_script(ending + _CANCEL)
        self._release = client.register_script(ending + _RELEASE)
        self._end_lost = client.register_script(ending + _END_LOST)
        self._retry = client.register_script(ending + _RETRY)

    def key(self, job_id: str) -> str:
        return self.keys.job(job_id)

    def _context(
        self, job_id: str, token: str = "", force: bool = False
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV every ending script opens with (`LUA_RELEASE`'s context `C`)."""
        keys = [self.key(job_id), self.events_channel, self.live_key, self.cancel_channel]
        args = [
            repr(time.time()),
            self.keys.array_prefix,
            self.settings.janitor_interval,
            self.settings.job_ttl,
            self.metrics,
            self.keys.job_prefix,
            token,
            "1" if force else "",
        ]
        return keys, args

    @round_trip
    def create(
        self,
        job_id: str,
        task: str,
        params: dict[str, Any],
        inputs: dict[str, str],
        owner: str,
        timeout: float | None = None,
        *,
        extra: dict[str, str] | None = None,
        parts: list[dict[str, str]] | None = None,
        output_id: str = "",
        due: float | None = None,
    ) -> MaybeAwaitable[str | None]:
        """Create a queued record and pin its input arrays, atomically; with `parts`, the
        records of a parallel job's parts too (queued, live, not in the jobs index), and
        `output_id`'s reservation kept for as long as the job lives. With `due`, the job is
        put in the due index instead of being published now (a delayed job).

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
            **(extra or {}),
        }
        keys = [self.key(job_id), self.index_key, self.live_key, self.keys.jobs_by_owner(owner)]
        keys += [self.keys.jobs_owners, self.keys.jobs_due]
        keys += [self.keys.array(inputs[n]) for n in names]
        args = [repr(time.time()), owner, json.dumps(fields), self.metrics]
        args += [json.dumps(parts or []), self.keys.job_prefix]
        args += [self.keys.array(output_id) if output_id else ""]
        args += ["" if due is None else repr(due), self.keys.jobs_due_wake]

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
        keys, args = self._context(job_id, token or uuid.uuid4().hex)
        args += [hostname, pid, domain, self.settings.job_max_attempts, node]
        return then(
            self._start(keys=keys, args=args),
            lambda r: (str(r[0]), int(r[1]), _due(r[2:]).free),
        )

    @round_trip
    def report_progress(self, job_id: str, fraction: float, note: str = "") -> MaybeAwaitable[bool]:
        fraction = max(0.0, min(1.0, float(fraction)))
        payload = json.dumps({"fraction": fraction, "note": note[:200]})
        args = [payload, repr(fraction), self.keys.job_prefix]
        return then(self._progress(keys=[self.key(job_id), self.events_channel], args=args), bool)

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
    ) -> MaybeAwaitable[tuple[str, Due]]:
        """End a running record and release its inputs in the same script.

        Returns (outcome, what is due): 'ok', or the status that won (e.g. 'cancelled'), or
        'moved' (another attempt holds it: `token` or `pid` did not match) or 'missing'.
        A part's success may leave its parallel job's combine due to this caller.
        """
        keys, args = self._context(job_id, token)
        args += [status.value, error or "", "" if result is None else json.dumps(result)]
        args += ["" if pid is None else str(pid)]
        return then(self._finish(keys=keys, args=args), lambda r: (str(r[0]), _due(r[1:])))

    @round_trip
    def cancel(self, job_id: str) -> MaybeAwaitable[tuple[str, list[str]]]:
        """Returns (the status before cancelling ('queued'/'running'/'waiting'), else the
        final one; ids to free: a parallel job's parts that had not started are released)."""
        keys, args = self._context(job_id)
        return then(self._cancel(keys=keys, args=args), lambda r: (str(r[0]), _due(r[1:]).free))

    @round_trip
    def release_inputs(
        self,
        job_id: str,
        *,
        mode: str = "any",
        token: str = "",
        input_ids: list[str] | None = None,
        force: bool = False,
    ) -> MaybeAwaitable[list[str]]:
        """Unpin the job's inputs once; returns ids of arrays now due to be freed.

        `mode` (see `_RELEASE`): 'any' for a record no attempt holds, 'discard' for one being
        removed, 'owner' for the attempt holding `token` once the record is final, 'ended'
        for the reaper, 'missing' when the record is gone (`input_ids` from the message).
        `force`: release a parallel job whose combine was lost (the reaper).
        """
        keys, args = self._context(job_id, token, force)
        keys.append(self.keys.released(job_id))
        args += [mode, job_id, *(input_ids or [])]
        return then(self._release(keys=keys, args=args), lambda r: _due(r).free)

    @round_trip
    def retry(self, job_id: str, *, error: str, delay: float, token: str) -> MaybeAwaitable[str]:
        """Put a running record that raised back to `queued`, due `delay` s from now
        (`retry_at`), if `token` still holds it; its inputs stay pinned. Returns 'ok', the
        status that won (e.g. 'cancelled'), 'moved' (another attempt holds it) or 'missing'."""
        keys, args = self._context(job_id, token)
        keys.append(self.keys.jobs_due)
        args += [error, repr(delay)]
        return then(self._retry(keys=keys, args=args), lambda r: str(r[0]))

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
        force: bool = False,
    ) -> MaybeAwaitable[tuple[str, list[str]]]:
        """End a live job no attempt will end (message revoked or lost, attempts spent) and
        release its inputs; `expect` and `token` say what the caller saw.

        Returns (outcome, ids to free); outcome 'ok' when this call ended it.
        """
        keys, args = self._context(job_id, token, force)
        args += [status.value, error, expect]
        return then(self._end_lost(keys=keys, args=args), lambda r: (str(r[0]), _due(r[1:]).free))

    @round_trip
    def discard(self, job_id: str, task: str, owner: str = "") -> MaybeAwaitable[None]:
        """Undo a creation whose message could not be sent: no record, no count, no index.

        Call `release_inputs(mode="discard")` first (it needs the record; it removes a
        parallel job's parts); this removes the rest at once.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key(job_id))
        pipe.zrem(self.index_key, job_id)
        pipe.zrem(self.live_key, job_id)
        pipe.zrem(self.keys.jobs_due, job_id)
        pipe.zrem(self.keys.jobs_by_owner(owner), job_id)
        pipe.hincrby(self.keys.metrics_submitted, task, -1)
        return then(pipe.execute(), lambda _: None)

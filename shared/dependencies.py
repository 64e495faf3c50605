"""Jobs that feed jobs: a waiting job's inputs are other jobs' results.

A job with an input `{"job": id}` (or `{"job": id, "key": name}`) whose upstream has not
succeeded yet is created `waiting` (`DependencyStore.create`): its direct array inputs are
pinned, its upstreams are kept in `upstream` (input name -> {"job", "key"}), the count of
inputs still unresolved in `unresolved`, and its id is added to each upstream's
`Keys.dependents` set, in the same script that checks that no upstream has ended meanwhile
(one that has is resolved there and then, or refuses the creation).

Resolution happens inside the release of the upstream's record (`fl_dependents`, called by
`fl_release` in shared/jobstore.py once a final record is released, exactly once per record):
on success each dependent pins the result array and records it as its input; at zero
unresolved it is marked `ready` and an event `{"id", "status": "waiting", "ready": true}` is
published. On failure or cancellation the dependent ends `failed` or `cancelled` with
`upstream_failed`, and its own release cascades to its dependents.

Launching is the API's (api/pipelines.py): one API process claims a ready record (`claim`,
a lease), runs the submission's checks on the now-known arrays, and promotes the record to
`queued` (`launch`) or ends it `failed` (`abort`).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Generic

from shared.redis_io import ClientT, MaybeAwaitable, round_trip, then
from shared.schemas import JobInput
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.jobstore import JobStore

# A claim on a ready record lapses after this long (the API that claimed it died mid-launch):
# the reaper announces the record again and another API launches it.
CLAIM_LEASE_S = 30.0

# The array id of a result `{"array": meta}`, or of `result[key]` when `key` is given; nil
# when that is not exactly one array.
_ARRAY_OF = """
local function fl_array_of(result, key)
  local v = result
  if key then
    if type(v) ~= 'table' then return nil end
    v = v[key]
  end
  if type(v) ~= 'table' or type(v.array) ~= 'table' then return nil end
  for k in pairs(v) do
    if k ~= 'array' then return nil end
  end
  if type(v.array.id) ~= 'string' then return nil end
  return v.array.id
end
"""

# fl_dependents(job, status): resolve or end the records waiting on `job`, which has just been
# released with final `status`. Runs inside LUA_RELEASE (context `C`, fl_release,
# fl_job_ended, fl_publish, fl_append in scope). Returns the ids of arrays due to be freed
# (and whatever fl_release of an ended dependent returns).
LUA_DEPENDENTS = (
    _ARRAY_OF
    + """
local function fl_dependents(job, status)
  local set = job .. ':dependents'
  local deps = redis.call('SMEMBERS', set)
  if #deps == 0 then return {} end
  redis.call('DEL', set)
  local free = {}
  local f = redis.call('HMGET', job, 'id', 'result', 'error')
  local result = nil
  if status == 'succeeded' then
    local ok, decoded = pcall(cjson.decode, f[2] or 'null')
    if ok then result = decoded end
  end
  for _, dep in ipairs(deps) do
    local dk = C.jp .. dep
    local d = redis.call('HMGET', dk, 'status', 'upstream', 'inputs', 'input_ids', 'owner')
    if d[1] == 'waiting' then
      local ups = cjson.decode(d[2] or '{}')
      local inputs = cjson.decode(d[3] or '{}')
      local names = {}
      for name, u in pairs(ups) do
        if u.job == f[1] and inputs[name] == nil then table.insert(names, name) end
      end
      table.sort(names)
      local ending, why, culprit = nil, nil, nil
      if #names == 0 then
        -- nothing of this upstream's left to resolve
      elseif status == 'succeeded' then
        local found = {}
        for _, name in ipairs(names) do
          local key = ups[name].key
          if type(key) ~= 'string' then key = nil end
          local id = fl_array_of(result, key)
          if not id then
            ending = 'failed'
            why = "input '" .. name .. "': the result of job " .. f[1] .. ' has no array'
            if key then why = why .. " under key '" .. key .. "'" end
            break
          end
          local a = redis.call('HMGET', C.ap .. id, 'state', 'owner', 'delete_requested')
          if a[1] ~= 'ready' or a[2] ~= d[5] or a[3] == '1' then
            ending = 'failed'
            why = "input '" .. name .. "': the result array " .. id .. ' of job ' .. f[1] ..
              ' is gone'
            break
          end
          table.insert(found, {name, id})
        end
        if not ending then
          local list = d[4] or ''
          for _, pair in ipairs(found) do
            redis.call('HINCRBY', C.ap .. pair[2], 'pins', 1)
            redis.call('PERSIST', C.ap .. pair[2])
            inputs[pair[1]] = pair[2]
            list = list == '' and pair[2] or (list .. ' ' .. pair[2])
          end
          redis.call('HSET', dk, 'inputs', cjson.encode(inputs), 'input_ids', list)
          if redis.call('HINCRBY', dk, 'unresolved', -#names) <= 0 then
            redis.call('HSET', dk, 'ready', '1')
            redis.call('PUBLISH', C.events, cjson.encode({id = dep, status = 'waiting',
              ready = true}))
          end
        end
      else
        ending = status == 'cancelled' and 'cancelled' or 'failed'
        culprit = f[1]
        local verb = status == 'cancelled' and ' was cancelled' or ' failed'
        why = "input '" .. names[1] .. "': upstream job " .. f[1] .. verb
        if f[3] then why = why .. ': ' .. string.sub(f[3], 1, 300) end
      end
      if ending then
        fl_job_ended(dk, 'waiting', ending, C.now, C.m)
        redis.call('HSET', dk, 'status', ending, 'finished_at', C.now, 'error', why)
        if culprit then redis.call('HSET', dk, 'upstream_failed', culprit) end
        fl_publish(dep, ending)
        fl_append(free, fl_release(dk, false))
      end
    end
  end
  return free
end
"""
)

_WAIT = (
    _ARRAY_OF
    + """
-- KEYS: job, jobs-index, live-index, events, owner-index, owners, arrays..., then per
--   upstream input its job key
--   and that job's dependents set
-- ARGV: now, owner, fields-json, metrics prefix, arrays-json [[name, id], ...] (in KEYS
--   order), upstream-json [[name, job id, key or ''], ...], array-key prefix
--   -> {'ok', unresolved} or {refusal, input name, status}
local arrays = cjson.decode(ARGV[5])
local ups = cjson.decode(ARGV[6])
local na = #arrays
local function usable(key)
  local a = redis.call('HMGET', key, 'state', 'owner', 'delete_requested')
  return a[1] == 'ready' and a[2] == ARGV[2] and a[3] ~= '1'
end
for i = 1, na do
  if not usable(KEYS[6 + i]) then return {'missing', arrays[i][1], ''} end
end
local inputs, ids, links, pending = {}, {}, {}, 0
for _, a in ipairs(arrays) do
  inputs[a[1]] = a[2]
  table.insert(ids, a[2])
end
for j, u in ipairs(ups) do
  local f = redis.call('HMGET', KEYS[6 + na + 2 * j - 1], 'status', 'owner', 'result')
  if not f[1] or f[2] ~= ARGV[2] then return {'unknown_job', u[1], ''} end
  if f[1] == 'succeeded' then  -- ended since the API looked: resolved here
    local ok, result = pcall(cjson.decode, f[3] or 'null')
    local id = nil
    if ok then id = fl_array_of(result, u[3] ~= '' and u[3] or nil) end
    if not id then return {'no_array', u[1], f[1]} end
    if not usable(ARGV[7] .. id) then return {'gone', u[1], f[1]} end
    inputs[u[1]] = id
    table.insert(ids, id)
  elseif f[1] == 'failed' or f[1] == 'cancelled' then
    return {'upstream_failed', u[1], f[1]}
  else
    pending = pending + 1
    table.insert(links, KEYS[6 + na + 2 * j])
  end
end
for _, id in ipairs(ids) do
  redis.call('HINCRBY', ARGV[7] .. id, 'pins', 1)
  redis.call('PERSIST', ARGV[7] .. id)
end
local fields = cjson.decode(ARGV[3])
local first = {'status', 'waiting', 'created_at', ARGV[1], 'attempts', 0, 'unresolved', pending,
  'inputs', cjson.encode(inputs), 'input_ids', table.concat(ids, ' ')}
if pending == 0 then
  first[#first + 1] = 'ready'
  first[#first + 1] = '1'
end
fl_hset(KEYS[1], fields, first)
for _, set in ipairs(links) do redis.call('SADD', set, fields['id']) end
local now = tonumber(ARGV[1])
redis.call('ZADD', KEYS[2], now, fields['id'])
redis.call('ZADD', KEYS[3], now, fields['id'])
redis.call('ZADD', KEYS[5], now, fields['id'])
redis.call('SADD', KEYS[6], ARGV[2])
redis.call('HINCRBY', ARGV[4] .. 'submitted', fields['task'], 1)
if pending == 0 then
  redis.call('PUBLISH', KEYS[4], cjson.encode({id = fields['id'], status = 'waiting',
    ready = true}))
end
return {'ok', tostring(pending), ''}
"""
)

_CLAIM = """
-- KEYS: job   ARGV: now, lease, token   -> 1 if this caller now launches the record
local f = redis.call('HMGET', KEYS[1], 'status', 'ready', 'claimed_at')
if f[1] ~= 'waiting' or f[2] ~= '1' then return 0 end
if f[3] and tonumber(ARGV[1]) - tonumber(f[3]) < tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'claimed_at', ARGV[1], 'claim', ARGV[3])
return 1
"""

_LAUNCH = """
-- KEYS: job, events, live   ARGV: claim token, fields-json, parts-json, job-key prefix,
--   output key or '', now   -> 'ok', or the status that won ('moved': claimed since)
-- A claimed, ready record becomes queued: what JobStore.create writes for a new job, minus
-- the pins (taken while it waited), the indexes and the submitted count (counted then).
local f = redis.call('HMGET', KEYS[1], 'status', 'claim', 'id')
if not f[1] then return 'missing' end
if f[1] ~= 'waiting' then return f[1] end
if f[2] ~= ARGV[1] then return 'moved' end
fl_hset(KEYS[1], cjson.decode(ARGV[2]), {'status', 'queued', 'launched_at', ARGV[6]})
fl_put_parts(cjson.decode(ARGV[3]), ARGV[4], KEYS[3], tonumber(ARGV[6]), ARGV[6])
if ARGV[5] ~= '' then redis.call('PERSIST', ARGV[5]) end
redis.call('PUBLISH', KEYS[2], cjson.encode({id = f[3], status = 'queued'}))
return 'ok'
"""

_ABORT = """
-- KEYS: context   ARGV: context, error   -> {outcome, ids to free...}
-- A claimed record whose launch failed (its checks, or the publish) ends failed; parts it
-- was given are removed (they have no message), its pins released, its dependents ended.
local f = redis.call('HMGET', C.job, 'status', 'claim', 'id', 'part_ids')
if not f[1] then return {'missing'} end
if (f[1] ~= 'waiting' and f[1] ~= 'queued') or f[2] ~= C.token then return {f[1]} end
fl_job_ended(C.job, 'waiting', 'failed', C.now, C.m)
redis.call('HSET', C.job, 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[9])
for id in string.gmatch(f[4] or '', '%S+') do
  redis.call('DEL', C.jp .. id)
  redis.call('ZREM', C.live, id)
end
fl_publish(f[3], 'failed')
return fl_append({'ok'}, fl_release(C.job, true))
"""


def upstream_json(upstream: dict[str, JobInput]) -> str:
    """The record's `upstream` field: input name -> {"job", "key"} (no key when None)."""
    return json.dumps({n: u.model_dump(exclude_none=True) for n, u in upstream.items()})


class DependencyStore(Generic[ClientT]):
    """Waiting records: created with their links, claimed, launched or aborted; each method
    one round trip, sync or async like the client given (as JobStore)."""

    def __init__(self, client: ClientT, settings: Settings) -> None:
        # jobstore imports LUA_DEPENDENTS from here: its own names are imported late.
        from shared.jobstore import LUA_RECORDS, LUA_RELEASE, JobStore
        from shared.metrics import LUA_JOB_ENDED

        self.client: ClientT = client
        self.settings = settings
        self.keys = settings.keys
        self.jobs: JobStore[ClientT] = JobStore(client, settings)
        self._wait = client.register_script(LUA_RECORDS + _WAIT)
        self._claim = client.register_script(_CLAIM)
        self._launch = client.register_script(LUA_RECORDS + _LAUNCH)
        self._abort = client.register_script(LUA_JOB_ENDED + LUA_RELEASE + _ABORT)

    @round_trip
    def create(
        self,
        job_id: str,
        task: str,
        owner: str,
        params: dict[str, Any],
        arrays: dict[str, str],
        upstream: dict[str, JobInput],
        *,
        timeout: float | None = None,
        extra: dict[str, str] | None = None,
    ) -> MaybeAwaitable[tuple[str, str, str]]:
        """Create a waiting record, pin `arrays`, link it to each upstream not ended yet.

        Returns ('ok', unresolved count, '') or (refusal, input name, upstream status):
        'missing' (an array gone), 'unknown_job', 'upstream_failed', 'no_array' or 'gone'
        (an upstream that succeeded meanwhile has no usable array there).
        """
        fields = {
            "id": job_id,
            "task": task,
            "owner": owner,
            "params": json.dumps(params),
            "upstream": upstream_json(upstream),
            "timeout": "" if timeout is None else repr(timeout),
            **(extra or {}),
        }
        keys = [self.keys.job(job_id), self.keys.jobs, self.keys.jobs_live, self.keys.events]
        keys += [self.keys.jobs_by_owner(owner), self.keys.jobs_owners]
        keys += [self.keys.array(array_id) for array_id in arrays.values()]
        links = []
        for name, ref in upstream.items():
            keys += [self.keys.job(ref.job), self.keys.dependents(ref.job)]
            links.append([name, ref.job, ref.key or ""])
        args = [
            repr(time.time()),
            owner,
            json.dumps(fields),
            self.keys.metrics_prefix,
            json.dumps([[n, a] for n, a in arrays.items()]),
            json.dumps(links),
            self.keys.array_prefix,
        ]
        return then(
            self._wait(keys=keys, args=args), lambda r: (str(r[0]), str(r[1]), str(r[2] or ""))
        )

    @round_trip
    def claim(self, job_id: str, token: str, lease: float = CLAIM_LEASE_S) -> MaybeAwaitable[bool]:
        """Take the launch of a ready record (one caller wins until the lease lapses)."""
        args = [repr(time.time()), repr(lease), token]
        return then(self._claim(keys=[self.keys.job(job_id)], args=args), bool)

    @round_trip
    def launch(
        self,
        job_id: str,
        token: str,
        fields: dict[str, str],
        *,
        parts: list[dict[str, str]] | None = None,
        output_id: str = "",
    ) -> MaybeAwaitable[str]:
        """Claimed record -> queued, with `fields` (and a parallel job's `parts`, `output_id`
        as JobStore.create takes them). Returns 'ok' or the status that won."""
        keys = [self.keys.job(job_id), self.keys.events, self.keys.jobs_live]
        args = [
            token,
            json.dumps(fields),
            json.dumps(parts or []),
            self.keys.job_prefix,
            self.keys.array(output_id) if output_id else "",
            repr(time.time()),
        ]
        return then(self._launch(keys=keys, args=args), str)

    @round_trip
    def abort(self, job_id: str, token: str, error: str) -> MaybeAwaitable[tuple[str, list[str]]]:
        """End a claimed record whose launch failed; returns (outcome, ids to free)."""
        keys, args = self.jobs._context(job_id, token)
        args.append(error)

        def parse(reply: list[Any]) -> tuple[str, list[str]]:
            return str(reply[0]), [str(x) for x in reply[1:] if not str(x).startswith("combine:")]

        return then(self._abort(keys=keys, args=args), parse)

    @round_trip
    def unlink(self, job_ids: list[str]) -> MaybeAwaitable[int]:
        """Drop the dependents sets of records being discarded (a batch undone)."""
        return then(self.client.delete(*[self.keys.dependents(i) for i in job_ids]), int)

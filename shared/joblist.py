"""Listing an owner's jobs (`GET /jobs`, the dashboard, bulk cancel), removing a finished
record, and trimming the owner indexes (the janitor).

The listing pages through the owner's index (`keys.jobs_by_owner`: id -> created_at, written
by the create scripts), newest first. A cursor is the position of the last job returned,
(score, id): the next page starts strictly after it, found by the member's rank in one script
(the id is put back for the lookup if it left the index meanwhile), so jobs created between
pages (newer: before the cursor) never shift a page, and ties on the score are broken by id,
as Redis orders them. Filters are applied while scanning, in chunks, and one request scans at
most `scan` entries: a filter that matches little answers with a short page and a cursor where
the scan stopped, never by reading the whole index. Ids whose record has expired are dropped
from the index as they are met.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis

from shared.jobstore import JobRecord, JobStore
from shared.schemas import JobStatus, is_id
from shared.settings import Settings

CHUNK = 500  # index entries read per round trip
SCAN_LIMIT = 5000  # index entries one listing request reads at most

# KEYS: owner index   ARGV: score of the cursor ('' = none), its id, n, max score
# -> flat [id, score, ...] of up to n entries strictly after the cursor, newest first.
_PAGE = """
local key, n = KEYS[1], tonumber(ARGV[3])
if ARGV[1] == '' then
  return redis.call('ZREVRANGEBYSCORE', key, ARGV[4], '-inf', 'WITHSCORES', 'LIMIT', 0, n)
end
local added = redis.call('ZADD', key, 'NX', ARGV[1], ARGV[2])
local rank = redis.call('ZREVRANK', key, ARGV[2])
if added == 1 then redis.call('ZREM', key, ARGV[2]) else rank = rank + 1 end
return redis.call('ZREVRANGE', key, rank, rank + n - 1, 'WITHSCORES')
"""

# KEYS: job, jobs index, live index, due index, owner index   ARGV: owner, job-key prefix
# -> {'removed', result-json} | {'missing'} | {'part'} | {status} (not final) |
#    {'unreleased', status} (final, but its inputs are not released yet)
_REMOVE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'released', 'owner', 'result', 'id', 'parent')
if not f[1] or (f[3] or '') ~= ARGV[1] then return {'missing'} end
if f[6] then return {'part'} end
if f[1] ~= 'succeeded' and f[1] ~= 'failed' and f[1] ~= 'cancelled' then return {f[1]} end
if f[2] ~= '1' then return {'unreleased', f[1]} end
for id in string.gmatch(redis.call('HGET', KEYS[1], 'part_ids') or '', '%S+') do
  redis.call('DEL', ARGV[2] .. id)  -- a parallel job's parts go with it
end
redis.call('DEL', KEYS[1], KEYS[1] .. ':dependents')
for i = 2, 5 do redis.call('ZREM', KEYS[i], f[5]) end
return {'removed', f[4] or ''}
"""

# KEYS: owners set   ARGV: owner-index prefix, before
# Drops ids created before `before` from every owner index (their records have expired),
# and an owner whose index is left empty from the set, in one script so a create (which adds
# to both) is never half undone.
_TRIM = """
local n = 0
for _, owner in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. owner
  n = n + redis.call('ZREMRANGEBYSCORE', key, 0, ARGV[2])
  if redis.call('ZCARD', key) == 0 then redis.call('SREM', KEYS[1], owner) end
end
return n
"""


class BadCursor(ValueError):
    """A cursor this module did not write."""


class Position(NamedTuple):
    score: float
    id: str


def encode_cursor(position: Position) -> str:
    raw = json.dumps([position.score, position.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names; BadCursor for anything else (a 422 in the API)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, job_id = json.loads(raw)
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise TypeError
        if not math.isfinite(score):
            raise ValueError
        if not isinstance(job_id, str) or not is_id(job_id):
            raise TypeError
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        raise BadCursor(f"not a cursor of GET /jobs: {cursor[:80]!r}") from None
    return Position(float(score), job_id)


@dataclass(frozen=True)
class JobFilter:
    """What a listed job must match; empty fields match everything. `tags`: all must match.
    `since` / `until`: creation time, unix seconds, both inclusive."""

    statuses: frozenset[JobStatus] = frozenset()
    task: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    since: float | None = None
    until: float | None = None

    def matches(self, record: JobRecord) -> bool:
        if self.statuses and record.status not in self.statuses:
            return False
        if self.task is not None and record.task != self.task:
            return False
        return all(record.tags.get(k) == v for k, v in self.tags.items())


@dataclass
class Page:
    records: list[JobRecord]
    next: Position | None  # where to continue; None: the index is exhausted


class JobLister:
    """Pages through an owner's jobs (async: the API's)."""

    def __init__(self, jobs: JobStore[aioredis.Redis]) -> None:
        self.jobs = jobs
        self.client = jobs.client
        self.keys = jobs.keys
        self._page = self.client.register_script(_PAGE)
        self._remove = self.client.register_script(_REMOVE)

    async def page(
        self,
        owner: str,
        flt: JobFilter,
        limit: int,
        after: Position | None = None,
        scan: int = SCAN_LIMIT,
    ) -> Page:
        """Up to `limit` matching records after `after`, newest first, reading at most
        `scan` index entries; `next` is set unless the scan reached the end (or `since`)."""
        index = self.keys.jobs_by_owner(owner)
        top = "+inf" if flt.until is None else repr(flt.until)
        out: list[JobRecord] = []
        scanned = 0
        position = after
        while len(out) < limit and scanned < scan:
            n = min(CHUNK, scan - scanned)
            args: list[str | int] = ["", ""]
            if position is not None:
                args = [repr(position.score), position.id]
            args += [n, top]
            flat = await self._page(keys=[index], args=args)
            entries = [(str(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]
            records = await self.jobs.get_many([job_id for job_id, _ in entries])
            gone: list[str] = []
            for (job_id, score), record in zip(entries, records, strict=True):
                if flt.since is not None and score < flt.since:
                    return await self._done(index, gone, out, None)
                scanned += 1
                position = Position(score, job_id)
                if record is None:
                    gone.append(job_id)  # expired
                elif flt.until is not None and score > flt.until:
                    continue  # a cursor from another query
                elif record.owner == owner and flt.matches(record):
                    out.append(record)
                    if len(out) >= limit:
                        break
            if len(entries) < n and len(out) < limit:
                return await self._done(index, gone, out, None)
            await self._done(index, gone, out, position)
        return Page(out, position)

    async def _done(
        self, index: str, gone: list[str], out: list[JobRecord], position: Position | None
    ) -> Page:
        if gone:
            await self.client.zrem(index, *gone)
        return Page(out, position)

    async def remove(self, record: JobRecord) -> tuple[str, Any]:
        """Delete a final, released record and its index entries, atomically.

        Returns ('removed', its result), or why not: 'missing', 'part', 'unreleased', or the
        status of a job not final."""
        keys = [self.jobs.key(record.id), self.keys.jobs, self.keys.jobs_live]
        keys += [self.keys.jobs_due, self.keys.jobs_by_owner(record.owner)]
        reply = await self._remove(keys=keys, args=[record.owner, self.keys.job_prefix])
        outcome = str(reply[0])
        if outcome == "removed":
            return outcome, json.loads(reply[1]) if reply[1] else None
        return outcome, None


def result_arrays(result: Any, depth: int = 0) -> list[str]:
    """Ids of the arrays a result holds (`{"array": {"id": ...}}` anywhere in it)."""
    out: list[str] = []
    if depth > 32:
        return out
    if isinstance(result, dict):
        ref = result.get("array")
        if isinstance(ref, dict) and isinstance(ref.get("id"), str) and is_id(ref["id"]):
            out.append(ref["id"])
        for value in result.values():
            out += result_arrays(value, depth + 1)
    elif isinstance(result, list):
        for value in result:
            out += result_arrays(value, depth + 1)
    return list(dict.fromkeys(out))


def trim_owner_indexes(client: redis.Redis, settings: Settings, before: float) -> int:
    """Drop ids created before `before` from every owner index (the janitor, each pass)."""
    keys = settings.keys
    prefix = keys.jobs_by_owner("")
    return int(client.eval(_TRIM, 1, keys.jobs_owners, prefix, repr(before)))


def statuses_of(values: Collection[str]) -> frozenset[JobStatus]:
    """`?status=a,b&status=c` -> the statuses; ValueError names an unknown one."""
    out: set[JobStatus] = set()
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            try:
                out.add(JobStatus(name))
            except ValueError:
                known = ", ".join(s.value for s in JobStatus)
                raise ValueError(f"unknown status {name[:40]!r} (one of {known})") from None
    return frozenset(out)

"""Periodic jobs: schedules kept in Redis, fired by exactly one scheduler among the APIs.

A schedule is a hash (`Keys.schedule`: its spec as JSON, owner, counters) and an entry in
`Keys.schedules` (id -> its next run, unix time); `Keys.schedules_by_owner` bounds and lists
an owner's. Every API runs `Scheduler` a few times a second, but only the one holding the
`Keys.scheduler` lease (SET NX PX, renewed by its holder once a second) fires. Each due schedule
is then claimed by a script that moves it to its next run only if its score is still the one
seen, so even two schedulers (a lease that lapsed under a stalled holder) never fire one tick
twice. A run is a normal job submitted by the API (`fire`), tagged `schedule: <id>`.

The next run after a fired tick is the first regular time after now: a schedule whose ticks
were missed (no scheduler ran) fires once, late, and then keeps its rhythm: one catch-up run,
never one per missed tick. A tick is fired at most once: an API that dies between the claim
and the submission loses that run.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Generic

import redis.asyncio as aioredis
from celery.schedules import crontab, crontab_parser

from shared.redis_io import ClientT, MaybeAwaitable, round_trip, then
from shared.schemas import ScheduleSpec, ScheduleView
from shared.settings import Settings

log = logging.getLogger("forklift.schedules")

INTERVAL_S = 0.25  # how often each API runs the pass: a run fires within this of its time
LEASE_S = 5.0  # the scheduler lock's lease: a dead holder is replaced within this
RENEW_S = 1.0  # its holder renews it this often (not every pass: 3 commands each time)
BATCH = 100  # schedules fired per pass at most
_HORIZON_DAYS = 5 * 366  # a cron expression must match within this (Feb 29 does)


# --- cron -------------------------------------------------------------------------------------


class CronError(ValueError):
    """A cron expression that cannot be used; the message says why."""


@lru_cache(maxsize=1024)
def parse_cron(expression: str) -> crontab:
    """Five fields (minute hour day-of-month month day-of-week), parsed by Celery's crontab."""
    fields = expression.split()
    if len(fields) != 5:
        raise CronError(
            f"cron {expression!r}: 5 fields (minute hour day-of-month month day-of-week),"
            f" not {len(fields)}"
        )
    minute, hour, day, month, weekday = fields
    try:
        spec = crontab(
            minute=minute,
            hour=hour,
            day_of_month=day,
            month_of_year=month,
            day_of_week=weekday,
        )
    except (ValueError, crontab_parser.ParseException) as exc:
        raise CronError(f"cron {expression!r}: {exc}") from None
    if next_cron(spec, time.time()) is None:
        raise CronError(f"cron {expression!r}: never matches within {_HORIZON_DAYS} days")
    return spec


def next_cron(spec: crontab, after: float) -> float | None:
    """The first minute strictly after `after` (unix time) that `spec` matches, in UTC (None if
    none within the horizon). Day-of-month and day-of-week must both match, as in Celery."""
    start = datetime.fromtimestamp(after, UTC).replace(second=0, microsecond=0)
    start += timedelta(minutes=1)
    hours, minutes = sorted(spec.hour), sorted(spec.minute)
    day = start.date()
    for _ in range(_HORIZON_DAYS):
        if (
            day.month in spec.month_of_year
            and day.day in spec.day_of_month
            and day.isoweekday() % 7 in spec.day_of_week  # cron: 0 = Sunday
        ):
            first = day == start.date()
            for hour in hours:
                if first and hour < start.hour:
                    continue
                for minute in minutes:
                    if first and hour == start.hour and minute < start.minute:
                        continue
                    at = datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
                    return at.timestamp()
        day += timedelta(days=1)
    return None


def first_run(spec: ScheduleSpec, now: float) -> float:
    """A new schedule's first run: `every` seconds from now, or the next cron time."""
    if spec.every is not None:
        return now + spec.every
    assert spec.cron is not None
    at = next_cron(parse_cron(spec.cron), now)
    if at is None:
        raise CronError(f"cron {spec.cron!r}: never matches within {_HORIZON_DAYS} days")
    return at


def following(spec: ScheduleSpec, tick: float, now: float) -> float | None:
    """The run after the tick `tick` fired at `now`: the first regular time after now (on the
    `every` grid from the tick, or the cron's), so missed ticks are not fired one by one."""
    if spec.every is not None:
        return tick + spec.every * (math.floor(max(0.0, now - tick) / spec.every) + 1)
    assert spec.cron is not None
    return next_cron(parse_cron(spec.cron), now)


# --- the store ---------------------------------------------------------------------------------

_CREATE = """
-- KEYS: schedule, schedules, owner's set   ARGV: id, max per owner, next run, field, value...
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[2]) then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'next_run', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

_DELETE = """
-- KEYS: schedule, schedules, owner's set   ARGV: id, owner
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

_LIST = """
-- KEYS: owner's set   ARGV: schedule-key prefix   -> {fields...} per schedule
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. id)
  if #fields > 0 then table.insert(out, fields) end
end
return out
"""

_CLAIM = """
-- KEYS: schedules, schedule   ARGV: id, score seen, next run ('' : none), now
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], 'next_run')
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[2], 'next_run', ARGV[3])
end
redis.call('HSET', KEYS[2], 'last_run', ARGV[4])
return 1
"""

_RAN = """
-- KEYS: schedule   ARGV: job id ('' : refused), error
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end  -- deleted meanwhile
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'last_job', ARGV[1], 'last_error', '')
  redis.call('HINCRBY', KEYS[1], 'runs', 1)
else
  redis.call('HSET', KEYS[1], 'last_error', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'skipped', 1)
end
return 1
"""

_HOLD = """
-- KEYS: lock   ARGV: token, lease ms   -> 1 if this token holds the lock (renewed or taken)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_LET_GO = """
-- KEYS: lock   ARGV: token
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _opt_float(text: str | None) -> float | None:
    return float(text) if text else None


@dataclass
class ScheduleRecord:
    """A schedule as stored."""

    id: str
    owner: str
    spec: ScheduleSpec
    created_at: float
    next_run: float | None = None
    last_run: float | None = None
    last_job: str | None = None
    runs: int = 0
    skipped: int = 0
    last_error: str | None = None

    def view(self) -> ScheduleView:
        return ScheduleView(
            **self.spec.model_dump(),
            id=self.id,
            created_at=self.created_at,
            next_run=self.next_run,
            last_run=self.last_run,
            last_job=self.last_job,
            runs=self.runs,
            skipped=self.skipped,
            last_error=self.last_error,
        )


def _parse(fields: dict[str, str]) -> ScheduleRecord | None:
    if not fields or "spec" not in fields:
        return None
    return ScheduleRecord(
        id=fields["id"],
        owner=fields.get("owner", ""),
        spec=ScheduleSpec.model_validate_json(fields["spec"]),
        created_at=float(fields["created_at"]),
        next_run=_opt_float(fields.get("next_run")),
        last_run=_opt_float(fields.get("last_run")),
        last_job=fields.get("last_job") or None,
        runs=int(fields.get("runs") or 0),
        skipped=int(fields.get("skipped") or 0),
        last_error=fields.get("last_error") or None,
    )


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class ScheduleStore(Generic[ClientT]):
    """Schedules in Redis; every method is one round trip (the API's async store, the tests'
    sync one)."""

    def __init__(self, client: ClientT, settings: Settings) -> None:
        self.client: ClientT = client
        self.settings = settings
        self.keys = settings.keys
        self._create = client.register_script(_CREATE)
        self._delete = client.register_script(_DELETE)
        self._list = client.register_script(_LIST)
        self._claim = client.register_script(_CLAIM)
        self._ran = client.register_script(_RAN)
        self._hold = client.register_script(_HOLD)
        self._let_go = client.register_script(_LET_GO)

    def _owned(self, owner: str) -> str:
        return self.keys.schedules_by_owner(owner)

    @round_trip
    def create(
        self, record: ScheduleRecord, next_run: float, max_per_owner: int
    ) -> MaybeAwaitable[bool]:
        """Store a new schedule due at `next_run`; False if the owner has `max_per_owner`."""
        fields = {
            "id": record.id,
            "owner": record.owner,
            "spec": record.spec.model_dump_json(),
            "created_at": repr(record.created_at),
        }
        args: list[str | float] = [record.id, max_per_owner, repr(next_run)]
        for name, value in fields.items():
            args += [name, value]
        keys = [self.keys.schedule(record.id), self.keys.schedules, self._owned(record.owner)]
        return then(self._create(keys=keys, args=args), bool)

    @round_trip
    def get(self, schedule_id: str) -> MaybeAwaitable[ScheduleRecord | None]:
        return then(self.client.hgetall(self.keys.schedule(schedule_id)), _parse)

    @round_trip
    def of_owner(self, owner: str) -> MaybeAwaitable[list[ScheduleRecord]]:
        """The owner's schedules, oldest first."""

        def parse(rows: list[list[str]]) -> list[ScheduleRecord]:
            records = [r for r in (_parse(_pairs(row)) for row in rows) if r is not None]
            return sorted(records, key=lambda r: (r.created_at, r.id))

        args = [self.keys.schedule("")]
        return then(self._list(keys=[self._owned(owner)], args=args), parse)

    @round_trip
    def delete(self, schedule_id: str, owner: str) -> MaybeAwaitable[bool]:
        """Remove the owner's schedule (False: none such); no run fires after this returns,
        except one a scheduler had already claimed."""
        keys = [self.keys.schedule(schedule_id), self.keys.schedules, self._owned(owner)]
        return then(self._delete(keys=keys, args=[schedule_id, owner]), bool)

    @round_trip
    def due(self, now: float) -> MaybeAwaitable[list[tuple[str, float]]]:
        """(id, tick) of the schedules due by `now`, earliest first."""
        reply = self.client.zrangebyscore(
            self.keys.schedules, "-inf", now, start=0, num=BATCH, withscores=True
        )
        return then(reply, lambda rows: [(str(i), float(s)) for i, s in rows])

    @round_trip
    def claim(
        self, schedule_id: str, tick: float, next_run: float | None, now: float
    ) -> MaybeAwaitable[bool]:
        """Move a due schedule from `tick` to `next_run`, only if it is still at `tick`: the
        caller fires this tick, and no other scheduler can."""
        keys = [self.keys.schedules, self.keys.schedule(schedule_id)]
        after = "" if next_run is None else repr(next_run)
        args = [schedule_id, repr(tick), after, repr(now)]
        return then(self._claim(keys=keys, args=args), bool)

    @round_trip
    def ran(self, schedule_id: str, job_id: str | None, error: str = "") -> MaybeAwaitable[bool]:
        """Record a fired run: its job, or why it was refused (False: deleted meanwhile)."""
        args = [job_id or "", error]
        return then(self._ran(keys=[self.keys.schedule(schedule_id)], args=args), bool)

    @round_trip
    def hold(self, token: str, lease: float = LEASE_S) -> MaybeAwaitable[bool]:
        """Take or renew the scheduler lock for `token`; True while it holds it."""
        args: list[str | int] = [token, int(lease * 1000)]
        return then(self._hold(keys=[self.keys.scheduler], args=args), bool)

    @round_trip
    def let_go(self, token: str) -> MaybeAwaitable[bool]:
        """Give the lock up (a stopping API), so another takes over at once."""
        return then(self._let_go(keys=[self.keys.scheduler], args=[token]), bool)


class RunRefused(Exception):
    """A run that could not be submitted (an input array gone, a task unregistered): the
    message is recorded on the schedule as `last_error`."""


Fire = Callable[[ScheduleRecord], Awaitable[str]]


class Scheduler:
    """The pass every API runs (`await scheduler.tick()`); only the lock's holder fires.

    `fire` submits one run and returns its job id, or raises RunRefused (any other error
    of it, a broker down say, is recorded on the schedule alike)."""

    def __init__(self, store: ScheduleStore[aioredis.Redis], fire: Fire) -> None:
        self.store = store
        self.fire = fire
        self.token = uuid.uuid4().hex
        self._renewed = -math.inf  # monotonic time of this holder's last renewal

    async def tick(self) -> int:
        """One pass; returns how many runs it submitted. A holder renews its lease once a
        `RENEW_S` (it holds it for `LEASE_S`); the others try to take it every pass."""
        now_m = time.monotonic()
        if now_m - self._renewed >= RENEW_S:
            if not await self.store.hold(self.token):
                self._renewed = -math.inf
                return 0
            self._renewed = now_m
        fired = 0
        now = time.time()
        for schedule_id, tick in await self.store.due(now):
            record = await self.store.get(schedule_id)
            if record is None:  # deleted: the claim drops the stale entry
                await self.store.claim(schedule_id, tick, None, now)
                continue
            if not await self.store.claim(
                schedule_id, tick, following(record.spec, tick, now), now
            ):
                continue  # another scheduler took this tick, or it was deleted
            fired += await self._run(record, tick, now)
        return fired

    async def _run(self, record: ScheduleRecord, tick: float, now: float) -> int:
        try:
            job_id = await self.fire(record)
        except Exception as exc:  # refused, or the broker down: recorded, the schedule goes on
            error = str(exc) if isinstance(exc, RunRefused) else f"not submitted: {exc!r}"
            if error != (record.last_error or ""):  # logged when it changes, not every tick
                log.warning("schedule %s: run refused: %s", record.id, error)
            await self.store.ran(record.id, None, error)
            return 0
        late = now - tick
        if late > 60:
            log.info("schedule %s: a catch-up run, %.0f s late", record.id, late)
        await self.store.ran(record.id, job_id)
        return 1

    async def close(self) -> None:
        """Give up the lock if held (a stopping API)."""
        self._renewed = -math.inf
        await self.store.let_go(self.token)

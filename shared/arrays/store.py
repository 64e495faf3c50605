"""The array registry: one Redis hash per array is the source of truth for its lifetime.

A segment lives exactly as long as its record says: created `uploading` (invisible, reserved
against the domain's shared-memory cap), made `ready` with an expiry, pinned by every queued
or running job that reads it, and freed on DELETE, on expiry or when the last pinning job
ends. Processes that merely attach never own a segment. The janitor reconciles both ways:
segments without a record are unlinked, records without a segment are dropped.

The domain's byte counter (`shm_bytes:<domain>`, what the cap is checked against) is kept
exact by a ledger (`shm_ledger:<domain>`, array id -> nbytes, `r:<id>` for replicas): every
script that adds or removes a reservation changes both at once, a decrement happens only
for an entry that was really removed (so nothing is uncounted twice and nothing clamps),
and the janitor's recount sums the ledger in one script, dropping the entries whose record
expired. Reservations that have no segment yet are counted like any other.

A download holds a read lease (`readers:<id>`, token -> deadline, renewed while it runs):
`drop` of an array with a live lease is deferred (the record is hidden and marked
`deferred`), so its segment is neither recycled nor truncated under the reader; the last
reader, or the janitor once the leases have lapsed (a reader's API died), drops it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Generic, NamedTuple

from shared import trust
from shared.redis_io import ClientT, MaybeAwaitable, round_trip, then
from shared.schemas import ArrayMeta, ArrayRef
from shared.settings import Settings

UPLOAD_TIMEOUT_S = 3600

READ_LEASE_S = 30.0  # a reader's lease lapses this long after its API stopped renewing it

_RESERVE = """
-- KEYS: array, bytes-counter, ledger   ARGV: fields-json, nbytes, limit, upload-timeout, id
local n = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used + n > tonumber(ARGV[3]) then return {0, used} end
redis.call('INCRBY', KEYS[2], n)
redis.call('HSET', KEYS[3], ARGV[5], n)
used = used + n
local fields = cjson.decode(ARGV[1])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'state', 'uploading', 'pins', 0)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {1, used}
"""

_COMMIT = """
-- KEYS: array, expiry-index   ARGV: created, expires, grace, id
if redis.call('HGET', KEYS[1], 'state') ~= 'uploading' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready', 'created_at', ARGV[1], 'expires_at', ARGV[2])
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[2]) + tonumber(ARGV[3])))
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), ARGV[4])
return 1
"""

_DELETE = """
-- KEYS: array   ARGV: owner
local a = redis.call('HMGET', KEYS[1], 'owner', 'pins', 'state', 'delete_requested')
if not a[1] or a[1] ~= ARGV[1] or a[3] ~= 'ready' or a[4] == '1' then return 'missing' end
if tonumber(a[2]) > 0 then
  redis.call('HSET', KEYS[1], 'delete_requested', '1')
  return 'pending'
end
redis.call('HSET', KEYS[1], 'state', 'deleting')
return 'free'
"""

_DROP = """
-- KEYS: array, expiry-index, readers
-- ARGV: id, bytes-counter-prefix, ledger-prefix, now
local a = redis.call('HMGET', KEYS[1], 'segment', 'nbytes', 'domain', 'owner')
if not a[1] then return false end
if redis.call('ZCOUNT', KEYS[3], '(' .. ARGV[4], '+inf') > 0 then
  -- a download reads it: hide it now, free it when the last reader is done
  redis.call('HSET', KEYS[1], 'state', 'deleting', 'deferred', '1')
  redis.call('PERSIST', KEYS[1])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1])  -- the janitor retries
  return {'deferred'}
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HDEL', ARGV[3] .. a[3], ARGV[1]) == 1 then
  redis.call('DECRBY', ARGV[2] .. a[3], tonumber(a[2]))
end
return {a[1], a[3], a[4] or ''}
"""

# A read lease: the array must be readable by this reader ('public': ready, not hidden,
# the caller's; 'internal': ready).
_BEGIN_READ = """
-- KEYS: array, readers   ARGV: token, deadline, now, owner, mode, key-ttl
local a = redis.call('HMGET', KEYS[1], 'state', 'owner', 'delete_requested')
if a[1] ~= 'ready' then return 0 end
if ARGV[5] == 'public' and ((a[2] or '') ~= ARGV[4] or a[3] == '1') then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
return 1
"""

_RENEW_READ = """
-- KEYS: readers   ARGV: token, deadline, key-ttl
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# 1 when this was the last reader of an array whose drop was deferred: the caller drops it.
_END_READ = """
-- KEYS: readers, array   ARGV: token, now
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], 'deferred') ~= '1' then return 0 end
if redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf') > 0 then return 0 end
return 1
"""

# The counter from the ledger, atomically: entries whose record is gone (expired by TTL)
# leave it; records of this domain with no entry (made before the ledger existed) join it.
_RECOUNT = """
-- KEYS: bytes-counter, ledger
-- ARGV: array-key-prefix, replica-key-prefix, domain, unledgered array ids...
local total = 0
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local id = entries[i]
  local key
  if string.sub(id, 1, 2) == 'r:' then key = ARGV[2] .. string.sub(id, 3)
  else key = ARGV[1] .. id end
  if redis.call('EXISTS', key) == 1 then total = total + tonumber(entries[i + 1])
  else redis.call('HDEL', KEYS[2], id) end
end
for i = 4, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    local a = redis.call('HMGET', ARGV[1] .. ARGV[i], 'nbytes', 'domain')
    if a[1] and a[2] == ARGV[3] then
      redis.call('HSET', KEYS[2], ARGV[i], a[1])
      total = total + tonumber(a[1])
    end
  end
end
redis.call('SET', KEYS[1], total)
return total
"""


class ShmUsage(NamedTuple):
    """A domain's kept shared-memory figures: its byte counter (what the cap is checked
    against, uploads in flight included) and its ledger's entries (segments counted)."""

    bytes: int
    segments: int


class Dropped(NamedTuple):
    """What `drop` freed: the segment to release (into the pool) and whose bytes it holds."""

    segment: str
    owner: str


class ArrayRecord(ArrayMeta):
    """One array's record: what clients see (`meta()`), what a job's message carries
    (`ref()`), and the registry's own fields."""

    owner: str = ""
    state: str = "ready"
    pins: int = 0
    delete_requested: bool = False
    created_at: float = 0.0  # set at commit; 0 while uploading
    expires_at: float = 0.0
    job: str = ""
    api_url: str = ""  # the owner domain's API, for reads from other domains

    @property
    def visible(self) -> bool:
        return self.state == "ready" and not self.delete_requested

    def meta(self) -> ArrayMeta:
        return ArrayMeta(**{name: getattr(self, name) for name in ArrayMeta.model_fields})

    def ref(self) -> ArrayRef:
        return ArrayRef(**{name: getattr(self, name) for name in ArrayRef.model_fields})


def _parse(raw: dict[str, str]) -> ArrayRecord | None:
    if not raw or "segment" not in raw:
        return None
    data: dict[str, Any] = dict(raw)
    data["shape"] = json.loads(data["shape"])
    data["delete_requested"] = data.get("delete_requested") == "1"
    return ArrayRecord.model_validate(data)


class ArrayStore(Generic[ClientT]):
    """Array records; each method is one round trip, sync or async like the client given."""

    def __init__(self, client: ClientT, settings: Settings) -> None:
        self.client: ClientT = client
        self.settings = settings
        self.expiry_key = settings.keys.arrays_expiry
        self._reserve = client.register_script(_RESERVE)
        self._commit = client.register_script(_COMMIT)
        self._delete = client.register_script(_DELETE)
        self._drop = client.register_script(_DROP)
        self._begin_read = client.register_script(_BEGIN_READ)
        self._renew_read = client.register_script(_RENEW_READ)
        self._end_read = client.register_script(_END_READ)
        self._recount = client.register_script(_RECOUNT)

    def key(self, array_id: str) -> str:
        return self.settings.keys.array(array_id)

    def bytes_key(self, domain: str | None = None) -> str:
        return self.settings.keys.shm_bytes(domain or self.settings.shm_domain)

    def ledger_key(self, domain: str | None = None) -> str:
        return self.settings.keys.shm_ledger(domain or self.settings.shm_domain)

    def readers_key(self, array_id: str) -> str:
        return self.settings.keys.readers(array_id)

    def segment_name(self, array_id: str) -> str:
        return f"{self.settings.shm_prefix}{array_id}"

    @round_trip
    def reserve(
        self,
        array_id: str,
        shape: tuple[int, ...],
        dtype: str,
        order: str,
        nbytes: int,
        owner: str,
        job: str = "",
    ) -> MaybeAwaitable[int | None]:
        """Record an upload in progress and count its bytes against the domain's cap.

        Returns None when reserved, else the bytes already in use (the caller answers 507).
        """
        fields = {
            "id": array_id,
            "segment": self.segment_name(array_id),
            "shape": json.dumps(list(shape)),
            "dtype": dtype,
            "order": order,
            "nbytes": nbytes,
            "domain": self.settings.shm_domain,
            "owner": owner,
            "job": job,
            "api_url": self.settings.api_internal_url,
        }
        args: list[str | int | float] = [
            json.dumps(fields),
            nbytes,
            self.settings.shm_limit_bytes,
            UPLOAD_TIMEOUT_S,
            array_id,
        ]
        keys = [self.key(array_id), self.bytes_key(), self.ledger_key()]
        reply = self._reserve(keys=keys, args=args)
        return then(reply, lambda r: None if int(r[0]) == 1 else int(r[1]))

    @round_trip
    def commit(self, array_id: str, ttl: float | None = None) -> MaybeAwaitable[bool]:
        """Make a filled segment visible; it expires after `ttl` (capped by the setting)."""
        now = time.time()
        lifetime = min(ttl, self.settings.array_ttl) if ttl else self.settings.array_ttl
        args: list[str | int | float] = [
            repr(now),
            repr(now + lifetime),
            self.settings.janitor_interval,
            array_id,
        ]
        reply = self._commit(keys=[self.key(array_id), self.expiry_key], args=args)
        return then(reply, bool)

    @round_trip
    def get(self, array_id: str) -> MaybeAwaitable[ArrayRecord | None]:
        return then(self.client.hgetall(self.key(array_id)), _parse)

    @round_trip
    def get_many(self, array_ids: list[str]) -> MaybeAwaitable[list[ArrayRecord | None]]:
        pipe = self.client.pipeline(transaction=False)
        for array_id in array_ids:
            pipe.hgetall(self.key(array_id))
        return then(pipe.execute(), lambda replies: [_parse(r) for r in replies])

    @round_trip
    def request_delete(self, array_id: str, owner: str) -> MaybeAwaitable[str]:
        """'free' (caller drops and unlinks now), 'pending' (a job holds it) or 'missing'."""
        return then(self._delete(keys=[self.key(array_id)], args=[owner]), str)

    @round_trip
    def drop(self, array_id: str) -> MaybeAwaitable[Dropped | None]:
        """Delete the record and uncount its bytes, unless a download still reads it.

        Returns `Dropped(segment, owner)`: the caller releases the segment (pool.release).
        None when the record was already gone, when the segment lives in another shm domain
        (that domain's janitor unlinks the orphan), or when a reader holds a lease: then the
        record is hidden and the last reader (or the janitor) drops it later.
        """
        keys = [self.key(array_id), self.expiry_key, self.readers_key(array_id)]
        args = [
            array_id,
            self.settings.keys.shm_bytes_prefix,
            self.settings.keys.shm_ledger_prefix,
            repr(time.time()),
        ]

        def parse(reply: list[str] | None) -> Dropped | None:
            if not reply or len(reply) < 3 or reply[1] != self.settings.shm_domain:
                return None
            try:  # the caller renames or unlinks it: only this stack's name for the array
                trust.segment(reply[0], array_id, self.settings, where="a dropped array record")
            except trust.Untrusted:
                return None
            return Dropped(reply[0], reply[2])

        return then(self._drop(keys=keys, args=args), parse)

    @round_trip
    def begin_read(self, array_id: str, token: str, *, owner: str | None) -> MaybeAwaitable[bool]:
        """Take a read lease on a ready array; False if it is not readable (so: 404).

        `owner`: a client's download (the array must be visible and the caller's); None: an
        internal read (ready is enough: a deletion waiting for its jobs is still served).
        """
        now = time.time()
        args: list[str | int | float] = [
            token,
            repr(now + READ_LEASE_S),
            repr(now),
            owner or "",
            "internal" if owner is None else "public",
            int(READ_LEASE_S * 2),
        ]
        keys = [self.key(array_id), self.readers_key(array_id)]
        return then(self._begin_read(keys=keys, args=args), bool)

    @round_trip
    def renew_read(self, array_id: str, token: str) -> MaybeAwaitable[bool]:
        """Push the lease's deadline on; False if the lease was lost."""
        args: list[str | int] = [token, repr(time.time() + READ_LEASE_S), int(READ_LEASE_S * 2)]
        reply = self._renew_read(keys=[self.readers_key(array_id)], args=args)
        return then(reply, bool)

    @round_trip
    def end_read(self, array_id: str, token: str) -> MaybeAwaitable[bool]:
        """Give the lease back; True when the caller must now drop the array (deferred)."""
        keys = [self.readers_key(array_id), self.key(array_id)]
        return then(self._end_read(keys=keys, args=[token, repr(time.time())]), bool)

    @round_trip
    def recount(self, unledgered: list[str]) -> MaybeAwaitable[int]:
        """Set this domain's counter to what its ledger holds, in one script.

        `unledgered`: ids of segments listed in /dev/shm whose record has no ledger entry
        (made before the ledger existed); they join it. Costs one EXISTS per ledger entry
        (10,000 entries: ~60 ms of Redis time on the loaded 2-core test machine).
        """
        settings = self.settings
        keys = [self.bytes_key(), self.ledger_key()]
        args = [
            settings.keys.array_prefix,
            settings.keys.replica_prefix(settings.shm_domain),
            settings.shm_domain,
            *unledgered,
        ]
        return then(self._recount(keys=keys, args=args), int)

    @round_trip
    def due_for_expiry(self, now: float, limit: int = 500) -> MaybeAwaitable[list[str]]:
        reply = self.client.zrangebyscore(self.expiry_key, 0, now, start=0, num=limit)
        return then(reply, list)

    @round_trip
    def bytes_in_use(self, domain: str | None = None) -> MaybeAwaitable[int]:
        return then(self.client.get(self.bytes_key(domain)), lambda r: int(r or 0))

    @round_trip
    def usage(self, domains: Sequence[str]) -> MaybeAwaitable[dict[str, ShmUsage]]:
        """`{domain: ShmUsage}` for `domains`: two commands each in one round trip, whatever
        the number of arrays (what `/metrics` and `/cluster` show)."""
        wanted = list(domains)
        pipe = self.client.pipeline(transaction=False)
        for domain in wanted:
            pipe.get(self.bytes_key(domain))
            pipe.hlen(self.ledger_key(domain))

        def parse(replies: list[Any]) -> dict[str, ShmUsage]:
            return {
                domain: ShmUsage(max(0, int(replies[2 * i] or 0)), int(replies[2 * i + 1] or 0))
                for i, domain in enumerate(wanted)
            }

        return then(pipe.execute(), parse)

    @round_trip
    def exists(self, array_id: str) -> MaybeAwaitable[bool]:
        """Whether a record of this id exists, in any state."""
        return then(self.client.exists(self.key(array_id)), bool)


class OpenRegistration(NamedTuple):
    """An open same-host registration (api/registrations.py): whose, and how it was made."""

    owner: str
    ttl: float | None
    recycled: bool  # the API took its segment from the pool


class RegistrationStore(Generic[ClientT]):
    """Open `POST /arrays/register` reservations: one marker per id (`Keys.register`),
    expiring with the reservation. Ended by `api/limits.py:RegisteredBytes.release`, which
    deletes the marker in the script that uncounts its bytes."""

    def __init__(self, client: ClientT, settings: Settings) -> None:
        self.client: ClientT = client
        self.settings = settings

    def key(self, array_id: str) -> str:
        return self.settings.keys.register(array_id)

    @round_trip
    def open(self, array_id: str, owner: str, ttl: float | None) -> MaybeAwaitable[bool]:
        """Claim the id for `owner`; False when it is taken."""
        value = json.dumps({"owner": owner, "ttl": ttl})
        reply = self.client.set(self.key(array_id), value, nx=True, ex=UPLOAD_TIMEOUT_S)
        return then(reply, bool)

    @round_trip
    def mark_recycled(self, array_id: str, owner: str, ttl: float | None) -> MaybeAwaitable[bool]:
        """Note that the API took the segment from the pool (an abandon gives it back); False
        when the registration is gone."""
        value = json.dumps({"owner": owner, "ttl": ttl, "recycled": True})
        return then(self.client.set(self.key(array_id), value, xx=True, keepttl=True), bool)

    @round_trip
    def get(self, array_id: str) -> MaybeAwaitable[OpenRegistration | None]:
        """The open registration, or None (unknown, expired or ended)."""
        return then(self.client.get(self.key(array_id)), _parse_registration)


def _parse_registration(raw: str | None) -> OpenRegistration | None:
    data = json.loads(raw) if raw else None
    if not isinstance(data, dict) or "owner" not in data:
        return None
    return OpenRegistration(str(data["owner"]), data.get("ttl"), bool(data.get("recycled")))

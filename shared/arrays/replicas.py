"""Cross-host arrays: reading another shm domain's array from its owner's API, never through
Redis; replicas, copied into this domain once and freed with the original.

The contract between domains: every array record names the API of the domain that holds it
(`api_url`, from that domain's FORKLIFT_API_INTERNAL_URL); that API serves the raw bytes at
`GET <api_url>/internal/arrays/{id}` (no `.npy` header, `Content-Length` = nbytes) to callers
that send `X-Forklift-Internal-Token: <FORKLIFT_INTERNAL_TOKEN>` (api/routes/internal.py).
`source` builds that request, or says why it cannot be made (`PullError`). An API streams
such an array to its client as it arrives (api/remote.py); a worker pulls it here, once.

A worker that must run a job whose input lives in another shm domain (another host) pulls the
array (`local_ref`) into a segment of its own domain, chunk by chunk: the bytes never exist
whole in the child's heap. Every child of every worker of that domain then attaches the copy,
so an array crosses the network at most once per domain. Keys, under the stack's prefix:

    replica:<domain>:<id>   hash {segment, nbytes, state, token, created_at}; `pulling` while a
                            process copies it in (that record is the lock: it carries a TTL, so a
                            puller that died lets the next one try), `ready` after (no TTL)
    replicas:<domain>       set of the array ids with a replica record in that domain
    replicas:stats          hash of counters: pulls:<d>, pulled_bytes:<d>, hits:<d> (replica
                            reused), served:<d>, served_bytes:<d> (internal reads answered by d)

Replica segments are named `<shm prefix><id>_r`, apart from the `<prefix><32 hex>` names the
array janitor reconciles. A replica counts against its domain's shared-memory cap like an upload.
Its lifetime is the original's: the original cannot be freed while a job pins it, and once its
record is gone (DELETE, expiry), `sweep_replicas` (run by each domain's janitor) unlinks the
replica and drops its record. Records are touched by scripts only, so a pull racing a sweep
either commits a replica whose original still exists or finds its claim gone and unlinks.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Generic, Literal

import httpx
import redis

from shared import trust
from shared.arrays.lifecycle import SegmentWrite
from shared.arrays.segments import (
    ShmFullError,
    list_segments,
    segment_path,
    unlink_own,
    unlink_segment,
)
from shared.redis_io import ClientT, MaybeAwaitable, round_trip, then
from shared.schemas import ArrayRef
from shared.settings import Settings

log = logging.getLogger("forklift.replicas")

TOKEN_HEADER = "X-Forklift-Internal-Token"
REPLICA_SUFFIX = trust.REPLICA_SUFFIX
LOCK_TTL_S = 900.0  # longest a pull may take before another process may try again
WAIT_POLL_S = 0.05
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0


class PullError(Exception):
    """Another domain's array could not be read; the message is for the client. `code`
    names the cause (the API answers 502 with it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Source:
    """Where and how to read another domain's array: its owner API's internal endpoint."""

    url: str
    headers: dict[str, str]


def source(array_id: str, domain: str, api_url: str, settings: Settings) -> Source:
    """The request that reads array `array_id` (held in `domain`) from its owner's API.

    `api_url` comes from the array's record in Redis: it is fetched (with the internal
    token) only if it is a configured peer (shared/trust.py); `PullError('untrusted')`
    otherwise, before anything connects.
    """
    where = f"array {array_id} lives in shm domain {domain}"
    secret = settings.internal_token
    if secret is None:
        raise PullError(
            "cross_domain_disabled",
            f"{where}; reading it from {settings.shm_domain} needs FORKLIFT_INTERNAL_TOKEN"
            " (the same value on every API and worker)",
        )
    if not api_url:
        raise PullError(
            "owner_unknown",
            f"{where}, whose API did not record its address: set FORKLIFT_API_INTERNAL_URL"
            " on that domain's API and workers",
        )
    try:
        trust.array_id(array_id, where="the array record")
        trust.peer_url(api_url, settings, where=f"the record of array {array_id}")
    except trust.Untrusted as exc:
        raise untrusted(exc) from None
    return Source(
        f"{api_url.rstrip('/')}/internal/arrays/{array_id}",
        {TOKEN_HEADER: secret.get_secret_value()},
    )


def untrusted(exc: trust.Untrusted) -> PullError:
    """A name or address read from Redis that failed its check (shared/trust.py)."""
    return PullError("untrusted", exc.message)


def timeout() -> httpx.Timeout:
    return httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)


def unreachable(array_id: str, url: str, exc: Exception) -> PullError:
    return PullError(
        "owner_unreachable", f"cannot reach the API holding array {array_id} ({url}): {exc}"
    )


def refused(array_id: str, status: int, text: str) -> PullError:
    return PullError("owner_refused", f"the owner's API refused array {array_id}: {status} {text}")


# Outcome of a claim: {'ready', segment} | {'claimed', api_url} | {'wait'} | {'gone'}
# | {'full', bytes-in-use}
_CLAIM = """
-- KEYS: replica, index, bytes-counter, original, ledger
-- ARGV: id, segment, nbytes, limit, lock-ttl, token, now
local original = redis.call('HMGET', KEYS[4], 'state', 'api_url')
if original[1] ~= 'ready' then return {'gone'} end
local r = redis.call('HMGET', KEYS[1], 'state', 'segment')
if r[1] == 'ready' then return {'ready', r[2]} end
if r[1] then return {'wait'} end
local n = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used + n > tonumber(ARGV[4]) then return {'full', tostring(used)} end
redis.call('INCRBY', KEYS[3], n)
redis.call('HSET', KEYS[5], 'r:' .. ARGV[1], n)
redis.call('HSET', KEYS[1], 'segment', ARGV[2], 'nbytes', n, 'state', 'pulling',
  'token', ARGV[6], 'created_at', ARGV[7])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('SADD', KEYS[2], ARGV[1])
return {'claimed', original[2] or ''}
"""

_READY = """
-- KEYS: replica, original   ARGV: token
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready')
redis.call('PERSIST', KEYS[1])
return 1
"""

# Drop a replica record: by its puller (token), or by anyone naming its segment ('' = any).
_FORGET = """
-- KEYS: replica, index, bytes-counter, ledger   ARGV: id, token, segment
local r = redis.call('HMGET', KEYS[1], 'token', 'segment', 'nbytes')
if not r[2] then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 0
end
if ARGV[2] ~= '' and r[1] ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' and r[2] ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('HDEL', KEYS[4], 'r:' .. ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[3], tonumber(r[3]))
end
return 1
"""

# Per replica of a domain: keep it while its original is alive, else drop the record.
# Returns {id, verdict, segment, nbytes, ...}; verdict 'keep' | 'freed' | 'lost' (no record).
_SWEEP = """
-- KEYS: index, bytes-counter, ledger   ARGV: replica-key-prefix, array-key-prefix
local out = {}
local function uncount(id)
  local n = redis.call('HGET', KEYS[3], 'r:' .. id)
  if n then
    redis.call('HDEL', KEYS[3], 'r:' .. id)
    redis.call('DECRBY', KEYS[2], tonumber(n))
  end
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rk = ARGV[1] .. id
  local r = redis.call('HMGET', rk, 'segment', 'nbytes')
  if not r[1] then
    redis.call('SREM', KEYS[1], id)
    uncount(id)  -- a pull's record that expired: its bytes were still counted
    table.insert(out, id); table.insert(out, 'lost'); table.insert(out, ''); table.insert(out, 0)
  else
    local o = redis.call('HGET', ARGV[2] .. id, 'state')
    if o == 'ready' or o == 'uploading' then
      table.insert(out, id); table.insert(out, 'keep')
    else
      redis.call('DEL', rk)
      redis.call('SREM', KEYS[1], id)
      uncount(id)
      table.insert(out, id); table.insert(out, 'freed')
    end
    table.insert(out, r[1]); table.insert(out, r[2])
  end
end
return out
"""


@dataclass(frozen=True)
class Claim:
    """What `ReplicaStore.claim` found: see the states in `_CLAIM`."""

    state: str
    segment: str = ""
    api_url: str = ""
    bytes_in_use: int = 0


def _parse_claim(reply: list[Any]) -> Claim:
    state = str(reply[0])
    if state == "ready":
        return Claim(state, segment=str(reply[1]))
    if state == "claimed":
        return Claim(state, api_url=str(reply[1]))
    if state == "full":
        return Claim(state, bytes_in_use=int(reply[1]))
    return Claim(state)


class ReplicaStore(Generic[ClientT]):
    """Replica records of one shm domain (this process's unless told otherwise)."""

    def __init__(self, client: ClientT, settings: Settings, domain: str | None = None) -> None:
        self.client: ClientT = client
        self.settings = settings
        self.domain = domain or settings.shm_domain
        self.index_key = settings.keys.replicas(self.domain)
        self.stats_key = settings.keys.replica_stats
        self._claim = client.register_script(_CLAIM)
        self._ready = client.register_script(_READY)
        self._forget = client.register_script(_FORGET)

    def key(self, array_id: str) -> str:
        return self.settings.keys.replica(self.domain, array_id)

    def segment_name(self, array_id: str) -> str:
        return f"{self.settings.shm_prefix}{array_id}{REPLICA_SUFFIX}"

    def _bytes_key(self) -> str:
        return self.settings.keys.shm_bytes(self.domain)

    def _ledger_key(self) -> str:
        return self.settings.keys.shm_ledger(self.domain)  # see store.py

    def _array_key(self, array_id: str) -> str:
        return self.settings.keys.array(array_id)

    @round_trip
    def claim(
        self, array_id: str, nbytes: int, token: str, lock_ttl: float
    ) -> MaybeAwaitable[Claim]:
        """The replica if ready; else the right to pull it (bytes reserved), or 'wait'."""
        keys = [
            self.key(array_id),
            self.index_key,
            self._bytes_key(),
            self._array_key(array_id),
            self._ledger_key(),
        ]
        args: list[str | int] = [
            array_id,
            self.segment_name(array_id),
            nbytes,
            self.settings.shm_limit_bytes,
            max(1, int(lock_ttl)),
            token,
            repr(time.time()),
        ]
        return then(self._claim(keys=keys, args=args), _parse_claim)

    @round_trip
    def mark_ready(self, array_id: str, token: str) -> MaybeAwaitable[bool]:
        """False when the claim was lost (original freed, lock expired): unlink the copy."""
        keys = [self.key(array_id), self._array_key(array_id)]
        return then(self._ready(keys=keys, args=[token]), bool)

    @round_trip
    def forget(self, array_id: str, *, token: str = "", segment: str = "") -> MaybeAwaitable[bool]:
        """Drop the record (and uncount its bytes) if it is still the caller's."""
        keys = [self.key(array_id), self.index_key, self._bytes_key(), self._ledger_key()]
        return then(self._forget(keys=keys, args=[array_id, token, segment]), bool)

    @round_trip
    def count(self, event: str, n: int = 1) -> MaybeAwaitable[int]:
        return self.client.hincrby(self.stats_key, f"{event}:{self.domain}", n)

    @round_trip
    def count_transfer(
        self, kind: Literal["pull", "serve"], nbytes: int
    ) -> MaybeAwaitable[list[int]]:
        """One array of `nbytes` pulled into this domain, or served to another one."""
        count, volume = ("pulls", "pulled_bytes") if kind == "pull" else ("served", "served_bytes")
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.stats_key, f"{count}:{self.domain}", 1)
        pipe.hincrby(self.stats_key, f"{volume}:{self.domain}", nbytes)
        return pipe.execute()


def local_ref(ref: ArrayRef, client: redis.Redis, settings: Settings) -> ArrayRef:
    """`ref` itself when it lives here, else a reference to this domain's replica of it."""
    if ref.domain == settings.shm_domain:
        return ref
    try:  # the id names Redis keys, the replica's segment and the owner's URL path
        trust.array_id(ref.id, where="the job's message")
    except trust.Untrusted as exc:
        raise untrusted(exc) from None
    segment = ensure_replica(ref, client, settings)
    return ref.model_copy(update={"segment": segment, "domain": settings.shm_domain})


def ensure_replica(ref: ArrayRef, client: redis.Redis, settings: Settings) -> str:
    """The name of this domain's replica of `ref`, pulling it first if nobody has."""
    store = ReplicaStore(client, settings)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + LOCK_TTL_S
    while True:
        claim = store.claim(ref.id, ref.nbytes, token, LOCK_TTL_S)
        if claim.state == "ready":
            try:  # read back from the replica record: checked before even a stat
                trust.segment(
                    claim.segment, ref.id, settings, where="the replica record", replica=True
                )
            except trust.Untrusted as exc:
                raise untrusted(exc) from None
            if segment_path(claim.segment).exists():
                store.count("hits")
                return str(claim.segment)
            # The record outlived its segment (/dev/shm wiped): forget it and pull again.
            store.forget(ref.id, segment=claim.segment)
            continue
        if claim.state == "claimed":
            return _pull(ref, store, token, claim.api_url)
        if claim.state == "gone":
            raise PullError("array_not_found", f"array {ref.id} is gone")
        if claim.state == "full":
            full = ShmFullError.over_cap(ref.nbytes, claim.bytes_in_use, settings.shm_limit_bytes)
            raise PullError("shm_full", f"{full} (a copy of array {ref.id})")
        if time.monotonic() > deadline:
            raise PullError(
                "pull_timeout", f"timed out waiting for another process to pull array {ref.id}"
            )
        time.sleep(WAIT_POLL_S)  # a sibling is pulling it


def _pull(ref: ArrayRef, store: ReplicaStore[redis.Redis], token: str, api_url: str) -> str:
    """Stream the array into a new replica segment, then mark the replica ready: the
    lifecycle's writer and abandon, with the replica record as the reservation."""
    settings = store.settings
    write = SegmentWrite(store.segment_name(ref.id), ref.nbytes, settings)
    began = time.monotonic()
    try:
        request = source(ref.id, ref.domain, api_url, settings)
        unlink_segment(write.name)  # left by a puller that died: we hold the claim now
        try:
            write.open()
        except ShmFullError as exc:
            raise PullError("shm_full", f"{exc} (a copy of array {ref.id})") from None
        _stream_into(write, request, ref)
        write.close()
        if not store.mark_ready(ref.id, token):
            raise PullError(
                "array_not_found", f"array {ref.id} was freed while it was being pulled"
            )
    except BaseException:
        store.forget(ref.id, token=token)
        write.discard()
        raise
    elapsed = time.monotonic() - began
    store.count_transfer("pull", ref.nbytes)
    log.info(
        "pulled array %s (%d bytes) from shm domain %s at %s in %.3f s",
        ref.id,
        ref.nbytes,
        ref.domain,
        api_url,
        elapsed,
    )
    return write.name


def _stream_into(write: SegmentWrite, request: Source, ref: ArrayRef) -> None:
    assert write.segment is not None
    buffer = write.segment.buffer
    try:
        with (
            httpx.Client(timeout=timeout()) as http,
            http.stream("GET", request.url, headers=request.headers) as r,
        ):
            if r.status_code != 200:
                raise refused(ref.id, r.status_code, r.read()[:300].decode(errors="replace"))
            declared = r.headers.get("content-length")
            if declared is not None and int(declared) != ref.nbytes:
                raise PullError(
                    "owner_refused",
                    f"the owner's API sent {declared} bytes for array {ref.id},"
                    f" which has {ref.nbytes}",
                )
            written = 0
            for chunk in r.iter_raw():
                end = written + len(chunk)
                if end > ref.nbytes:
                    raise PullError(
                        "owner_refused", f"the owner's API sent more than array {ref.id} holds"
                    )
                buffer[written:end] = chunk
                written = end
            if written != ref.nbytes:
                raise PullError(
                    "owner_refused",
                    f"the owner's API sent {written} of the {ref.nbytes} bytes of array {ref.id}",
                )
    except httpx.HTTPError as exc:
        raise unreachable(ref.id, request.url, exc) from None
    finally:
        del buffer


def read_stats(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """The counters as {"pulls:<domain>": n, ...} (sync client; for tests and tools)."""
    return {str(k): int(v) for k, v in client.hgetall(settings.keys.replica_stats).items()}


@dataclass
class ReplicaSweep:
    freed: list[str] = field(default_factory=list)
    orphan_segments: list[str] = field(default_factory=list)
    bytes_in_use: int = 0


def sweep_replicas(client: redis.Redis, settings: Settings) -> ReplicaSweep:
    """Unlink this domain's replicas whose original is gone, and replica segments without a
    record (a puller that died); returns the bytes the remaining replicas hold."""
    store = ReplicaStore(client, settings)
    report = ReplicaSweep()
    # List the segments first: a record made after this listing keeps its segment safe below.
    listed = list_segments(settings.shm_prefix)
    script = client.register_script(_SWEEP)
    reply = script(
        keys=[store.index_key, store._bytes_key(), store._ledger_key()],
        args=[settings.keys.replica_prefix(store.domain), settings.keys.array_prefix],
    )
    recorded: set[str] = set()
    for i in range(0, len(reply), 4):
        array_id, verdict, segment, nbytes = reply[i : i + 4]
        if verdict == "keep":
            recorded.add(segment)
            report.bytes_in_use += int(nbytes)
        elif verdict == "freed":
            try:  # a name read from the record: never unlink another stack's file
                trust.segment(segment, array_id, settings, where="a replica record", replica=True)
            except trust.Untrusted:
                continue
            with contextlib.suppress(ValueError):
                unlink_own(segment)
            report.freed.append(array_id)
    pattern = re.compile(re.escape(settings.shm_prefix) + r"[0-9a-f]{32}" + REPLICA_SUFFIX)
    for name in listed:
        if pattern.fullmatch(name) and name not in recorded and unlink_own(name):
            report.orphan_segments.append(name)
    return report

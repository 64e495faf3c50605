"""The array registry: one Redis hash per array is the source of truth for its lifetime.

A segment lives exactly as long as its record says: created `uploading` (invisible, reserved
against the domain's shared-memory cap), made `ready` with an expiry, pinned by every queued
or running job that reads it, and freed on DELETE, on expiry or when the last pinning job
ends. Processes that merely attach never own a segment. The janitor reconciles both ways:
segments without a record are unlinked, records without a segment are dropped.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel

from shared.redis_io import AnyRedis, then
from shared.schemas import ArrayMeta, ArrayRef
from shared.settings import Settings

UPLOAD_TIMEOUT_S = 3600

_RESERVE = """
-- KEYS: array, bytes-counter   ARGV: fields-json, nbytes, limit, upload-timeout
local n = tonumber(ARGV[2])
local used = redis.call('INCRBY', KEYS[2], n)
if used > tonumber(ARGV[3]) then
  redis.call('DECRBY', KEYS[2], n)
  return {0, used - n}
end
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
-- KEYS: array, expiry-index   ARGV: id, bytes-counter-prefix
local a = redis.call('HMGET', KEYS[1], 'segment', 'nbytes', 'domain')
if not a[1] then return false end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local counter = ARGV[2] .. a[3]
local left = redis.call('DECRBY', counter, tonumber(a[2]))
if left < 0 then redis.call('SET', counter, 0) end
return {a[1], a[3]}
"""


class ArrayRecord(BaseModel):
    id: str
    segment: str
    shape: tuple[int, ...]
    dtype: str
    order: str = "C"
    nbytes: int
    domain: str
    owner: str = ""
    state: str = "ready"
    pins: int = 0
    delete_requested: bool = False
    created_at: float = 0.0
    expires_at: float = 0.0
    job: str = ""
    api_url: str = ""  # the owner domain's API, for reads from other domains

    @property
    def visible(self) -> bool:
        return self.state == "ready" and not self.delete_requested

    def meta(self) -> ArrayMeta:
        return ArrayMeta(
            id=self.id,
            shape=list(self.shape),
            dtype=self.dtype,
            order=self.order,
            nbytes=self.nbytes,
            domain=self.domain,
            segment=self.segment,
            created_at=self.created_at,
            expires_at=self.expires_at,
        )

    def ref(self) -> ArrayRef:
        return ArrayRef(
            id=self.id,
            segment=self.segment,
            shape=self.shape,
            dtype=self.dtype,
            order=self.order,
            nbytes=self.nbytes,
            domain=self.domain,
        )


def _parse(raw: dict[str, str]) -> ArrayRecord | None:
    if not raw or "segment" not in raw:
        return None
    data: dict[str, Any] = dict(raw)
    data["shape"] = json.loads(data["shape"])
    data["delete_requested"] = data.get("delete_requested") == "1"
    return ArrayRecord.model_validate(data)


class ArrayStore:
    """Array records; each method is one round trip, sync or async like the client given."""

    def __init__(self, client: AnyRedis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.expiry_key = settings.key("arrays", "expiry")
        self._reserve = client.register_script(_RESERVE)
        self._commit = client.register_script(_COMMIT)
        self._delete = client.register_script(_DELETE)
        self._drop = client.register_script(_DROP)

    def key(self, array_id: str) -> str:
        return self.settings.key("array", array_id)

    def bytes_key(self, domain: str | None = None) -> str:
        return self.settings.key("shm_bytes", domain or self.settings.shm_domain)

    def segment_name(self, array_id: str) -> str:
        return f"{self.settings.shm_prefix}{array_id}"

    def reserve(
        self,
        array_id: str,
        shape: tuple[int, ...],
        dtype: str,
        order: str,
        nbytes: int,
        owner: str,
        job: str = "",
    ) -> Any:
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
        args = [json.dumps(fields), nbytes, self.settings.shm_limit_bytes, UPLOAD_TIMEOUT_S]
        reply = self._reserve(keys=[self.key(array_id), self.bytes_key()], args=args)
        return then(reply, lambda r: None if int(r[0]) == 1 else int(r[1]))

    def commit(self, array_id: str, ttl: float | None = None) -> Any:
        """Make a filled segment visible; it expires after `ttl` (capped by the setting)."""
        now = time.time()
        lifetime = min(ttl, self.settings.array_ttl) if ttl else self.settings.array_ttl
        args = [repr(now), repr(now + lifetime), self.settings.janitor_interval, array_id]
        reply = self._commit(keys=[self.key(array_id), self.expiry_key], args=args)
        return then(reply, bool)

    def get(self, array_id: str) -> Any:
        return then(self.client.hgetall(self.key(array_id)), _parse)

    def get_many(self, array_ids: list[str]) -> Any:
        pipe = self.client.pipeline(transaction=False)
        for array_id in array_ids:
            pipe.hgetall(self.key(array_id))
        return then(pipe.execute(), lambda replies: [_parse(r) for r in replies])

    def request_delete(self, array_id: str, owner: str) -> Any:
        """'free' (caller drops and unlinks now), 'pending' (a job holds it) or 'missing'."""
        return then(self._delete(keys=[self.key(array_id)], args=[owner]), str)

    def drop(self, array_id: str) -> Any:
        """Delete the record and uncount its bytes.

        Returns the segment name to unlink, or None when the record was already gone or the
        segment lives in another shm domain (that domain's janitor unlinks the orphan).
        """
        keys = [self.key(array_id), self.expiry_key]
        args = [array_id, self.settings.key("shm_bytes", "")]

        def parse(reply: list[str] | None) -> str | None:
            if not reply or reply[1] != self.settings.shm_domain:
                return None
            return reply[0]

        return then(self._drop(keys=keys, args=args), parse)

    def due_for_expiry(self, now: float, limit: int = 500) -> Any:
        reply = self.client.zrangebyscore(self.expiry_key, 0, now, start=0, num=limit)
        return then(reply, list)

    def bytes_in_use(self, domain: str | None = None) -> Any:
        return then(self.client.get(self.bytes_key(domain)), lambda r: int(r or 0))

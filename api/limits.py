"""Limits at the edge, before the app spends memory or time on a request.

- `BodyLimitMiddleware`: every request body is capped before it is read (413, not a full
  buffer), whoever sends it; only `POST /arrays` (streamed into shared memory, with its own
  cap) is exempt, matched by method and exact path.
- `BodyTimeoutMiddleware`: a body that pauses, or arrives slower than a minimum rate, ends
  with 408, so a slow upload cannot hold its reservation for long.
- `KeyLimits` + `KeyLimitMiddleware`: per key, what it holds open at once (uploads and the
  bytes they reserve, event streams, long-polls); 429 with `Retry-After` past a limit.
  Counted per API process, in memory: what a request holds ends with the request (or with
  the process), so a counter can never leak; N API processes give a key N times the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import redis.asyncio as aioredis
from fastapi.security.utils import get_authorization_scheme_param
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import RETRY_AFTER_S, ApiError, error_response
from api.owners import owner_id
from shared.settings import Settings


def _too_large_message(limit: int) -> str:
    return f"request body over {limit} bytes (FORKLIFT_MAX_JSON_BYTES)"


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reader passes it on (it turns others into 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(limit))


def _error_body(limit: int) -> bytes:
    message = _too_large_message(limit)
    return json.dumps({"error": {"code": "too_large", "message": message, "detail": None}}).encode()


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, told by Content-Length or counted as it arrives.

    `exempt` holds exact (method, path) pairs: a prefix would exempt every route under it
    (it once exempted `POST /arrays/register`, whose JSON FastAPI reads before the key check).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[tuple[str, str]]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = _error_body(self.max_bytes)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BodyTimeoutMiddleware:
    """408 when a client stops sending a body it announced, or sends it too slowly.

    A Content-Length larger than what the client sends (or an upload that stalls, or one
    that trickles a byte every few seconds) would keep the request, its reservation and its
    half-filled segment alive for as long as the client likes. Each read of the body may
    wait at most `idle_s`, and with `min_rate` the body must keep up an average of that many
    bytes per second after a grace of `idle_s`: the next chunk is due by
    `start + idle_s + received / min_rate`. Once the body is complete, reads (e.g. a
    streaming response listening for the disconnect) are not timed.
    """

    def __init__(self, app: ASGIApp, idle_s: float, min_rate: int = 0) -> None:
        self.app = app
        self.idle_s = idle_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        started: float | None = None
        received = 0

        async def timed_receive() -> Message:
            nonlocal body_done, started, received
            if body_done:
                return await receive()
            now = time.monotonic()
            if started is None:
                started = now
            wait, slow = self.idle_s, False
            if self.min_rate > 0:
                due = started + self.idle_s + received / self.min_rate - now
                if due < wait:
                    wait, slow = due, True
            try:
                if wait <= 0:
                    raise TimeoutError
                # asyncio.timeout, not wait_for: wait_for wraps every read in a new task,
                # a measurable cost per chunk of a GiB upload.
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                body_done = True
                if slow:
                    raise HTTPException(
                        408,
                        f"the request body arrived slower than {self.min_rate} bytes/s"
                        f" ({received} bytes in {time.monotonic() - started:.0f} s;"
                        " FORKLIFT_BODY_MIN_RATE)",
                    ) from None
                raise HTTPException(
                    408,
                    f"the request body stopped arriving for {self.idle_s:g} s"
                    " (is Content-Length larger than the body?)",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


# --- per-key limits ---------------------------------------------------------------------------

# What a request holds while it runs, by (method, path): the middleware classifies requests
# from the path alone, so no route has to remember to count itself.
_STREAM = re.compile(r"^/jobs/[^/]+/events$")
_JOB_WAIT = re.compile(r"^/jobs/[^/]+(/result)?$")


def over_limit(amount: int, what: str, limit: int, setting: str) -> ApiError:
    """413: one request that could never fit the key's limit, however long it waited."""
    return ApiError(
        413,
        "too_large",
        f"{amount} {what} is more than one key may hold at once: the limit is {limit} ({setting})",
    )


def limit_reached(held: int, what: str, limit: int, setting: str) -> ApiError:
    """429 with Retry-After: the key holds its limit now; it fits once some of it ends."""
    return ApiError(
        429,
        "too_many",
        f"this key already holds {held} {what} of at most {limit} ({setting}); retry when"
        " some have ended",
        {"limit": limit, "held": held, "setting": setting},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@dataclass
class KeyLimits:
    """Per-key counters of this API process: what each key holds open right now."""

    settings: Settings
    held: dict[tuple[str, str], int] = field(default_factory=dict)

    def limit(self, what: str) -> tuple[int, str]:
        s = self.settings
        return {
            "uploads": (s.key_max_uploads, "FORKLIFT_KEY_MAX_UPLOADS"),
            "upload_bytes": (s.key_upload_bytes_limit, "FORKLIFT_KEY_MAX_UPLOAD_BYTES"),
            "streams": (s.key_max_streams, "FORKLIFT_KEY_MAX_STREAMS"),
            "waits": (s.key_max_waits, "FORKLIFT_KEY_MAX_WAITS"),
        }[what]

    def take(self, owner: str, what: str, amount: int = 1) -> Callable[[], None]:
        """Count `amount` against the key's limit, or raise 429 (413 if it can never fit).

        Returns the release function (call it once, in a `finally`).
        """
        limit, setting = self.limit(what)
        label = what.replace("_", " ")
        if amount > limit:
            raise over_limit(amount, label, limit, setting)
        key = (owner, what)
        now = self.held.get(key, 0)
        if now + amount > limit:
            raise limit_reached(now, label, limit, setting)
        self.held[key] = now + amount
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.held.get(key, 0) - amount
            if left > 0:
                self.held[key] = left
            else:
                self.held.pop(key, None)

        return release

    def holds(self, owner: str, what: str) -> int:
        """What the key holds of `what` in this process right now."""
        return self.held.get((owner, what), 0)

    @contextlib.contextmanager
    def holding(self, owner: str, what: str, amount: int = 1) -> Iterator[None]:
        release = self.take(owner, what, amount)
        try:
            yield
        finally:
            release()


def caller_key(scope: Scope, settings: Settings) -> str:
    """The owner id the request's key maps to ('' in open mode), as `api.deps` derives it.

    An unknown key gets a bucket of its own, and its request fails with 401 right after.
    """
    if not settings.api_keys:
        return ""
    for name, value in scope["headers"]:
        if name == b"authorization":  # parsed as FastAPI's HTTPBearer parses it
            scheme, token = get_authorization_scheme_param(value.decode("latin-1"))
            if scheme.lower() == "bearer" and token:
                return owner_id(token)
    return "-"


def _kind(scope: Scope) -> str | None:
    method, path = scope["method"], scope["path"]
    if method == "POST" and path == "/arrays":
        return "uploads"
    if method == "GET" and _STREAM.match(path):
        return "streams"
    if method == "POST" and path == "/jobs/wait":
        return "waits"
    if method == "GET" and _JOB_WAIT.match(path):
        query = scope.get("query_string", b"").decode("latin-1")
        for name, value in parse_qsl(query):
            if name == "wait":
                with contextlib.suppress(ValueError):
                    if float(value) > 0:
                        return "waits"
    return None


class KeyLimitMiddleware:
    """Counts uploads, event streams and long-polls per key for as long as each request runs.

    The count is held until the response is complete (a stream's last event included), so
    it is exact whatever the route does; 429 with `Retry-After` before the app sees the
    request when the key holds its limit already.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _kind(scope) if scope["type"] == "http" else None
        state = getattr(scope["app"].state, "forklift", None) if kind else None
        if state is None:
            await self.app(scope, receive, send)
            return
        try:
            release = state.limits.take(caller_key(scope, self.settings), kind)
        except ApiError as exc:
            answer = error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)
            await answer(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            release()


# --- reserved bytes of same-host registrations, per key, in Redis ------------------------------

# Open registrations outlive the request that made them (up to UPLOAD_TIMEOUT_S, across API
# processes), so they are counted in Redis, per owner: a hash (array id -> nbytes, plus the
# running 'total') and a sorted set (array id -> deadline, Redis's clock). Each script prunes
# the entries past their deadline first: a reservation that expired unseen stops counting.
_PRUNE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local n = redis.call('HGET', KEYS[1], id)
  if n then
    redis.call('HINCRBY', KEYS[1], 'total', '-' .. n)
    redis.call('HDEL', KEYS[1], id)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
"""

_TAKE_REGISTERED = (
    """
-- KEYS: sizes, deadlines   ARGV: id, nbytes, limit, timeout, bytes held elsewhere
"""
    + _PRUNE
    + """
local held = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local n = tonumber(ARGV[2])
if held + tonumber(ARGV[5]) + n > tonumber(ARGV[3]) then return {0, held} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'total', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]) + 60)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]) + 60)
return {1, held + n}
"""
)

_RELEASE_REGISTERED = (
    """
-- KEYS: sizes, deadlines, marker   ARGV: id
redis.call('DEL', KEYS[3])
"""
    + _PRUNE
    + """
local n = redis.call('HGET', KEYS[1], ARGV[1])
if n then
  redis.call('HINCRBY', KEYS[1], 'total', '-' .. n)
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
return n and 1 or 0
"""
)


class RegisteredBytesStore:
    """The one owner of the per-key registration counts (`Keys.registered_bytes`,
    `Keys.registered_deadlines`): every read and write of them goes through these scripts.

    The release also deletes the registration's marker (`RegistrationStore.key`, passed in
    KEYS), so the marker and its bytes end together.
    """

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.keys = settings.keys
        self._take = client.register_script(_TAKE_REGISTERED)
        self._release = client.register_script(_RELEASE_REGISTERED)

    def _owner_keys(self, owner: str) -> list[str]:
        return [self.keys.registered_bytes(owner), self.keys.registered_deadlines(owner)]

    async def take(
        self, owner: str, array_id: str, nbytes: int, limit: int, timeout_s: int, elsewhere: int
    ) -> tuple[bool, int]:
        """Count `nbytes` for `timeout_s` unless the key's open registrations plus `elsewhere`
        would pass `limit`: (taken, bytes its registrations hold)."""
        args: list[str | int] = [array_id, nbytes, limit, timeout_s, elsewhere]
        taken, held = await self._take(keys=self._owner_keys(owner), args=args)
        return bool(int(taken)), int(held)

    async def release(self, owner: str, array_id: str, marker: str) -> bool:
        """Uncount the registration (False: it no longer counted) and delete its marker."""
        reply = await self._release(keys=[*self._owner_keys(owner), marker], args=[array_id])
        return bool(int(reply))


_BYTES_SETTING = "FORKLIFT_KEY_MAX_UPLOAD_BYTES"


class RegisteredBytes:
    """The bytes a key's open `POST /arrays/register` reservations hold, exact across APIs.

    Checked against FORKLIFT_KEY_MAX_UPLOAD_BYTES together with the bytes this process's
    HTTP uploads of the key hold right now (an HTTP upload is checked against its own
    process's uploads only: it does not ask Redis). Counted in Redis by
    `RegisteredBytesStore`; here, the limit and its HTTP errors.
    """

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.settings = settings
        self.store = RegisteredBytesStore(client, settings)

    def refuse_oversized(self, nbytes: int) -> None:
        """413 for one reservation larger than the key's whole limit: waiting cannot help."""
        limit = self.settings.key_upload_bytes_limit
        if nbytes > limit:
            raise over_limit(nbytes, "reserved bytes", limit, _BYTES_SETTING)

    async def take(
        self, owner: str, array_id: str, nbytes: int, timeout_s: int, elsewhere: int = 0
    ) -> None:
        """Count a reservation of `nbytes` for `timeout_s`, or raise 429 (413: never fits)."""
        self.refuse_oversized(nbytes)
        limit = self.settings.key_upload_bytes_limit
        taken, held = await self.store.take(owner, array_id, nbytes, limit, timeout_s, elsewhere)
        if not taken:
            raise limit_reached(held + elsewhere, "reserved bytes", limit, _BYTES_SETTING)

    async def release(self, owner: str, array_id: str, marker: str) -> None:
        """Uncount the reservation (if still counted) and delete its marker, in one script."""
        await self.store.release(owner, array_id, marker)

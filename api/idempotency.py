"""Idempotent submission: an `Idempotency-Key` header makes `POST /jobs` (and `/jobs/batch`)
safe to send again. A client that lost the answer retries with the same key and gets the job
the first request created (200, its current view), never a second one.

One string per (owner, sha256 of the key), `keys.idempotency`, holds a claim as JSON: the
job ids (chosen by `submissions.prepare` before anything is written), a fingerprint of the
body and a state. The first request takes it with SET NX as `pending` (TTL `PENDING_S`, so a
process that dies mid-submission does not hold the key for a day), records and publishes its
jobs, then turns it `done` with the full TTL (FORKLIFT_IDEMPOTENCY_TTL, counted from then).
A failed submission (any 4xx/5xx) deletes the claim if it is still its own, and the key is
free again. A request that finds the claim:

- with another body's fingerprint: 422 `idempotency_key_reused` (as Stripe does);
- `done`: the claimed jobs' current views (200, `Idempotent-Replayed: true`); if a record is
  gone meanwhile (deleted, or expired after FORKLIFT_JOB_TTL): 409 `idempotency_job_gone`,
  never a second job under a key that already made one;
- `pending`: waits (polling, at most `WAIT_S`) for the first request to settle; still pending
  after that: 409 `idempotency_key_in_use` with Retry-After; claim deleted (the first failed):
  the request goes on as a fresh submission.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header, Response
from pydantic import BaseModel

from api import submissions
from api.deps import AppState
from api.errors import ApiError
from shared.schemas import JobView

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"  # answer header of a replay (Stripe's name)
MAX_KEY = 200
PENDING_S = 60.0  # a claim whose submission never settled frees after this
WAIT_S = 5.0  # how long a request waits for another one holding its key
POLL_S = 0.05
_CLAIM_TRIES = 3  # claim lost, then freed again by a failing winner: at most this many times

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=HEADER,
        min_length=1,
        max_length=MAX_KEY,
        pattern=r"^[ -~]+$",
        description="1..200 printable ASCII characters (a uuid4, say). The same key (per API"
        " key, within FORKLIFT_IDEMPOTENCY_TTL) with the same body answers 200 with what the"
        " first request created, and queues nothing; with another body, 422.",
    ),
]

REPLAY_RESPONSE: dict[str, Any] = {
    "description": "an earlier request with the same `Idempotency-Key` created this: its"
    " current view (nothing new queued)",
    "headers": {
        REPLAYED: {"description": "`true`", "required": True, "schema": {"type": "string"}}
    },
}
CONFLICT_RESPONSE: dict[str, Any] = {
    "description": "`idempotency_key_in_use`: a request with this key is still under way"
    " (retry after `Retry-After` s); `idempotency_job_gone`: the job this key created no"
    " longer exists (send a new key)"
}

# KEYS: claim   ARGV: expected value, new value ('' deletes), ttl ms  -> 1 if it was ours
_SETTLE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


def sha256_hex(key: str) -> str:
    """How a key is named in Redis: its digest (bounded, and no client text in key names)."""
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(body: BaseModel) -> str:
    """The body as parsed (defaults filled, keys sorted): the same request however spelled."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class _Claim:
    """One key of one owner: read, take, settle."""

    def __init__(self, state: AppState, owner: str, key: str, body: BaseModel) -> None:
        self.state = state
        self.key = state.settings.keys.idempotency(owner, sha256_hex(key))
        self.owner = owner
        self.fp = fingerprint(body)
        self.mine = ""  # the pending value this request wrote

    async def existing(self) -> list[JobView] | None:
        """The views of what the key made; None if no one holds it (a fresh submission).
        Waits for a pending claim to settle."""
        deadline = time.monotonic() + WAIT_S
        while True:
            raw = await self.state.redis.get(self.key)
            if raw is None:
                return None
            claim = json.loads(raw)
            if claim["fp"] != self.fp:
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    f"this {HEADER} was sent with another body; use a new key for a new submission",
                )
            if claim["state"] == "done":
                return await self._views(claim["ids"])
            if time.monotonic() >= deadline:
                raise ApiError(
                    409,
                    "idempotency_key_in_use",
                    f"a request with this {HEADER} is still under way; retry in a second",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(POLL_S)

    async def _views(self, ids: list[str]) -> list[JobView]:
        records = await self.state.jobs.get_many(ids)
        gone = [i for i, r in zip(ids, records, strict=True) if r is None or r.owner != self.owner]
        if gone:
            raise ApiError(
                409,
                "idempotency_job_gone",
                f"the job(s) this {HEADER} created are gone ({', '.join(gone)}); send a new"
                " key to submit again",
                {"ids": ids, "gone": gone},
            )
        return [r.view() for r in records if r is not None]

    def _value(self, ids: list[str], state: str) -> str:
        return json.dumps({"ids": ids, "fp": self.fp, "state": state})

    async def take(self, ids: list[str]) -> bool:
        value = self._value(ids, "pending")
        ttl = min(PENDING_S, self.state.settings.idempotency_ttl)
        taken = await self.state.redis.set(self.key, value, nx=True, px=int(ttl * 1000))
        if taken:
            self.mine = value
        return bool(taken)

    async def settle(self, ids: list[str] | None) -> None:
        """`done` with the full TTL (ids: what was made), or deleted (None): if still ours."""
        new = "" if ids is None else self._value(ids, "done")
        ttl_ms = int(self.state.settings.idempotency_ttl * 1000)
        script = self.state.redis.register_script(_SETTLE)
        await script(keys=[self.key], args=[self.mine, new, ttl_ms])


async def submit(
    state: AppState,
    owner: str,
    key: str | None,
    body: BaseModel,
    prepare: Callable[[], Awaitable[list[submissions.Prepared]]],
    response: Response,
) -> list[JobView]:
    """Submit what `prepare` validates, once per key: the views, and on a replay the
    response's status set to 200 and its `Idempotent-Replayed` header. Without a key, a
    plain submission."""
    if key is None:
        return await submissions.submit(state, await prepare(), owner)
    claim = _Claim(state, owner, key, body)
    # Looked at before `prepare`: a replay must not depend on the inputs still being there
    # (a job's uploaded inputs are freed when it ends).
    views = await claim.existing()
    if views is None:
        jobs = await prepare()
        ids = [job.job_id for job in jobs]
        for _ in range(_CLAIM_TRIES):
            if await claim.take(ids):
                break
            views = await claim.existing()  # another request got there first
            if views is not None:
                break
        else:
            raise ApiError(
                409,
                "idempotency_key_in_use",
                f"requests with this {HEADER} keep failing; retry in a second",
                headers={"Retry-After": "1"},
            )
    if views is not None:
        response.status_code = 200
        response.headers[REPLAYED] = "true"
        return views
    try:
        views = await submissions.submit(state, jobs, owner)
    except BaseException:
        await claim.settle(None)
        raise
    await claim.settle(ids)
    return views

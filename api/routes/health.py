"""/healthz: is Redis answering, and how many workers are online.

A good answer is reused for `FRESH_S` (per API process): load balancers and orchestrators poll
this endpoint all the time, also while the workers need every core, and on a busy host a
Redis round trip per poll doubles the processes that must be scheduled before it answers.
A failed check is never reused, so Redis going down shows within `FRESH_S`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import State
from api.errors import RETRY_AFTER_S, drop_stale_connections
from shared.redis_io import REDIS_ERRORS
from shared.schemas import Health, HealthDown
from shared.workers import WorkerStore

router = APIRouter(tags=["health"])

FRESH_S = 0.5


@router.get(
    "/healthz",
    summary="Check that the API and Redis answer",
    response_model=Health,
    responses={503: {"description": "Redis is down", "model": HealthDown}},
)
async def healthz(state: State) -> Any:
    """200 while Redis answers (even with no worker online: jobs then wait in the queue)."""
    settings = state.settings
    cached = state.last_good_health
    try:
        if cached is not None and time.monotonic() - cached[0] < FRESH_S:
            workers = cached[1]
        else:  # one round trip: the count proves Redis answers, no PING needed
            workers = await WorkerStore(state.redis, settings).count_online()
            state.last_good_health = (time.monotonic(), workers)
    except REDIS_ERRORS as exc:
        state.last_good_health = None
        await drop_stale_connections(state.redis, exc)
        error = {"code": "unavailable", "message": "Redis is unavailable; retry in a few seconds"}
        return JSONResponse(
            {"status": "unavailable", "redis": False, "workers": None, "error": error},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return {
        "status": "ok" if workers else "no_workers",
        "redis": True,
        "workers": workers,
        "shm_domain": settings.shm_domain,
    }

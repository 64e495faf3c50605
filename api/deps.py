"""Dependencies: the app's state (settings, Redis stores, event hub) and who is calling."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError, not_found
from api.events import JobEventHub
from api.limits import KeyLimits
from api.owners import owner_id
from shared.arrays.replicas import ReplicaStore
from shared.arrays.store import ArrayStore, RegistrationStore
from shared.dependencies import DependencyStore
from shared.due import DueStore
from shared.joblist import JobLister
from shared.jobstore import JobRecord, JobStore
from shared.schedules import ScheduleStore
from shared.schemas import is_id
from shared.settings import Settings


@dataclass
class AppState:
    settings: Settings
    redis: aioredis.Redis
    jobs: JobStore[aioredis.Redis]
    arrays: ArrayStore[aioredis.Redis]
    hub: JobEventHub
    limits: KeyLimits
    # (monotonic time, workers online) of the last /healthz check that reached Redis
    last_good_health: tuple[float, int] | None = None
    # open same-host registrations; this domain's cross-host counters
    registrations: RegistrationStore[aioredis.Redis] = field(init=False)
    replicas: ReplicaStore[aioredis.Redis] = field(init=False)
    dependencies: DependencyStore[aioredis.Redis] = field(init=False)  # waiting jobs
    due: DueStore[aioredis.Redis] = field(init=False)  # delayed jobs and retries
    schedules: ScheduleStore[aioredis.Redis] = field(init=False)  # periodic jobs
    listing: JobLister = field(init=False)  # GET /jobs, bulk cancel, removing records

    def __post_init__(self) -> None:
        self.registrations = RegistrationStore(self.redis, self.settings)
        self.replicas = ReplicaStore(self.redis, self.settings)
        self.dependencies = DependencyStore(self.redis, self.settings)
        self.due = DueStore(self.redis, self.settings)
        self.schedules = ScheduleStore(self.redis, self.settings)
        self.listing = JobLister(self.jobs)


# Dependencies are `async def` although they never await: FastAPI runs a plain `def`
# dependency in the thread pool, a thread hop per request for a dictionary lookup.


async def get_state(request: Request) -> AppState:
    return request.app.state.forklift


State = Annotated[AppState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="one of FORKLIFT_API_KEYS, when set")


async def get_owner(
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's owner id ('' when the API runs open). Keys compared in constant time."""
    keys = state.settings.api_keys
    if not keys:
        return ""
    offered = credentials.credentials if credentials else ""
    match = False
    for key in keys:
        match |= hmac.compare_digest(offered.encode(), key.get_secret_value().encode())
    if not match:
        raise ApiError(
            401,
            "unauthorized",
            "missing or unknown API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return owner_id(offered)


Owner = Annotated[str, Depends(get_owner)]


def only_query(*names: str) -> Any:
    """A dependency refusing query parameters a route does not take (422): a filter spelled
    wrong (`?state=running`) would otherwise be ignored and list everything."""
    known = frozenset(names)

    async def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise ApiError(
                422,
                "unknown_parameter",
                f"unknown query parameter(s): {', '.join(repr(u[:40]) for u in unknown[:5])};"
                f" this route takes {', '.join(sorted(known))}",
            )

    return Depends(check)


async def load_job(state: AppState, job_id: str, owner: str) -> JobRecord:
    """The caller's job, or 404 (also for another owner's: existence is not told)."""
    record = await state.jobs.get(job_id) if is_id(job_id) else None
    if record is None or record.owner != owner:
        raise not_found("job", job_id)
    return record

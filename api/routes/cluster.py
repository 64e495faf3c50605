"""/cluster: the shm domains (hosts), their live workers, and what each holds in shared memory.

Needs a key when keys are set (it names hosts, workers and their pids); costs a fixed number
of Redis commands per domain, read from kept counters (`api/topology.py`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import Owner, State
from api.topology import read_cluster
from shared.schemas import WorkerSeen

router = APIRouter(tags=["health"])


class ClusterDomain(BaseModel):
    domain: str
    api_url: str = Field("", description="the domain's internal API URL, as its workers report")
    workers: list[WorkerSeen]
    concurrency: int = Field(description="worker processes in the domain")
    segments: int = Field(
        description="segments counted against the domain's cap: arrays, replicas, uploads"
    )
    bytes: int = Field(description="bytes of those segments (the cap's counter)")
    arrays: int = Field(description="the domain's own arrays (uploads in flight included)")
    replicas: int = Field(description="copies of other domains' arrays, pulled for jobs")
    shm_bytes: int = Field(description="bytes counted against the domain's cap (uploads too)")


class Cluster(BaseModel):
    domain: str = Field(description="this API's shm domain")
    domains: list[ClusterDomain]


@router.get("/cluster", summary="List the shm domains and their workers", response_model=Cluster)
async def cluster(state: State, _: Owner) -> Any:
    """Every shm domain with a live worker or arrays in shared memory."""
    views = await read_cluster(state.redis, state.settings)
    domains = []
    for v in views:
        urls = sorted({w.api_url for w in v.workers if w.api_url})
        if v.domain == state.settings.shm_domain and state.settings.api_internal_url:
            urls = [state.settings.api_internal_url]
        domains.append(
            ClusterDomain(
                domain=v.domain,
                api_url=urls[0] if urls else "",
                workers=sorted(v.workers, key=lambda w: w.name),
                concurrency=sum(w.concurrency for w in v.workers),
                segments=v.segments,
                bytes=v.shm_bytes,
                arrays=v.arrays,
                replicas=v.replicas,
                shm_bytes=v.shm_bytes,
            )
        )
    return Cluster(domain=state.settings.shm_domain, domains=domains)

"""Who is where: live workers by shm domain, and what each domain holds in shared memory.

Read from the worker presence records (`shared/workers.py`), the set of domains the APIs
announce, and the array registry's kept figures (byte counter and ledger per domain through
`ArrayStore.usage`, replica set per domain). Routing (`api/enqueue.py`) asks which domains
have a live worker (`WorkerStore.live_domains`); `GET /cluster` shows it all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.arrays.store import ArrayStore, ShmUsage
from shared.schemas import WorkerSeen
from shared.settings import Settings
from shared.workers import WorkerStore


@dataclass
class DomainView:
    domain: str
    workers: list[WorkerSeen] = field(default_factory=list)
    segments: int = 0  # ledger entries: arrays, replicas and uploads in flight
    replicas: int = 0  # copies of other domains' arrays, pulled for jobs
    shm_bytes: int = 0  # the cap's counter: includes uploads in flight

    @property
    def arrays(self) -> int:
        return max(0, self.segments - self.replicas)


async def announce_domain(client: Any, settings: Settings) -> None:
    """Called by each API at startup, so /cluster finds its domain without a keyspace scan."""
    await client.sadd(settings.keys.domains, settings.shm_domain)


async def read_cluster(client: Any, settings: Settings) -> list[DomainView]:
    """Every domain with a live worker or something in shared memory (async client).

    Kept figures only: per domain the byte counter, the ledger's length and the replica
    set's size, a fixed number of commands whatever the number of arrays.
    """
    keys = settings.keys
    workers: list[WorkerSeen] = await WorkerStore(client, settings).live()
    announced = await client.smembers(keys.domains)
    known = sorted({w.domain for w in workers} | set(announced) | {settings.shm_domain})
    usage: dict[str, ShmUsage] = await ArrayStore(client, settings).usage(known)
    pipe = client.pipeline(transaction=False)
    for domain in known:
        pipe.scard(keys.replicas(domain))
    replicas = await pipe.execute()
    views = {
        domain: DomainView(
            domain=domain,
            segments=usage[domain].segments,
            replicas=int(replicas[i] or 0),
            shm_bytes=usage[domain].bytes,
        )
        for i, domain in enumerate(known)
    }
    for w in workers:
        views[w.domain].workers.append(w)
    return [
        v
        for d, v in sorted(views.items())
        if v.workers or v.segments or v.shm_bytes or d == settings.shm_domain
    ]

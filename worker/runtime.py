"""Per-process state of a worker child: Redis client, stores and identity.

Built lazily and keyed by pid, so a client created before the prefork fork is never shared
by two processes (a forked socket would interleave replies).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cached_property

import redis
from redis import Redis

from shared.arrays.store import ArrayStore
from shared.jobstore import JobStore
from shared.redis_io import sync_redis
from shared.settings import Settings, get_settings


@dataclass
class Runtime:
    settings: Settings
    pid: int

    @cached_property
    def redis(self) -> redis.Redis:
        return sync_redis(self.settings)

    @cached_property
    def jobs(self) -> JobStore[Redis]:
        return JobStore(self.redis, self.settings)

    @cached_property
    def arrays(self) -> ArrayStore[Redis]:
        return ArrayStore(self.redis, self.settings)

    @cached_property
    def hostname(self) -> str:
        return os.environ.get("FORKLIFT_WORKER_NAME") or socket.gethostname()


_runtime: Runtime | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = Runtime(settings=get_settings(), pid=os.getpid())
    return _runtime

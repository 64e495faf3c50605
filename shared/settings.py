"""One settings object, read from the environment, shared by the API, the workers and tools.

Every knob a deployment may turn is here, named `FORKLIFT_*` (plus the conventional
`REDIS_URL`), so the compose file, the launcher and the tests all speak the same language.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

BUILTIN_JOB_MODULES = ("worker.jobs.cpu", "worker.jobs.numeric")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _dev_shm_bytes() -> int:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:  # pragma: no cover - no /dev/shm
        return 0
    return stat.f_blocks * stat.f_frsize


def derive_shm_domain() -> str:
    """Processes that share a boot and an IPC namespace see the same `/dev/shm`."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # pragma: no cover - non-Linux
        boot_id = os.uname().nodename
    try:
        ipc_ns = os.readlink("/proc/self/ns/ipc")
    except OSError:  # pragma: no cover - non-Linux
        ipc_ns = ""
    return hashlib.sha256(f"{boot_id}/{ipc_ns}".encode()).hexdigest()[:12]


class Settings(BaseModel):
    """Deployment settings; build with `Settings.from_env()` or `get_settings()`."""

    model_config = ConfigDict(frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("forklift", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    queue: str = Field("forklift", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    shm_prefix: str = Field("forklift_", pattern=r"^forklift_[A-Za-z0-9_]{0,40}$")
    shm_domain: str = Field(default_factory=derive_shm_domain)
    job_modules: tuple[str, ...] = ()

    job_time_limit: float = Field(3600.0, gt=0)
    job_kill_grace: float = Field(10.0, gt=0)
    job_max_attempts: int = Field(3, ge=1)
    # Seconds past the hard time limit after which the message of a job whose worker vanished
    # (SIGKILL, OOM, power loss) is delivered again: the Redis transport's visibility timeout.
    redelivery_margin: float = Field(600.0, gt=0)
    job_ttl: int = Field(86400, gt=0)
    array_ttl: int = Field(3600, gt=0)
    max_wait: float = Field(60.0, ge=0)
    max_json_bytes: int = Field(1 << 20, gt=0)
    max_upload_bytes: int = Field(8 << 30, gt=0)
    # Seconds a client may go silent in the middle of a request body (a Content-Length larger
    # than what it sends, a stalled upload) before the API answers 408 and lets go.
    body_timeout: float = Field(30.0, gt=0)
    shm_limit_bytes: int = Field(default_factory=lambda: _dev_shm_bytes() // 2, ge=0)
    janitor_interval: float = Field(60.0, gt=0)
    # Freed segments kept allocated for reuse (shared/arrays/pool.py): -1 = a quarter of
    # shm_limit_bytes, 0 = off.
    shm_pool_bytes: int = Field(-1, ge=-1)

    api_keys: tuple[SecretStr, ...] = ()
    log_format: str = Field("text", pattern=r"^(text|json)$")
    # Celery task events cost a publish per state change; Flower turns them on by itself.
    celery_events: bool = False

    # Several shm domains (hosts): the URL other domains reach this domain's API at, recorded
    # in every array made here, and the secret the APIs' /internal endpoints require.
    api_internal_url: str = Field("", pattern=r"^(https?://[^\s/?#]+(/[^\s?#]*)?)?$")
    internal_token: SecretStr | None = None

    # Address space a job may add to its worker child (RLIMIT_AS, set per job on top of what
    # the child maps already, attached input segments included); 0 = no limit.
    child_memory_limit_bytes: int = Field(0, ge=0)
    worker_concurrency: int = Field(default_factory=_cpu_count, ge=1)
    max_tasks_per_child: int = Field(0, ge=0)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Read `REDIS_URL` and `FORKLIFT_<FIELD>` (upper case); unset means default."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        if env.get("REDIS_URL"):
            values["redis_url"] = env["REDIS_URL"]
        for name in cls.model_fields:
            raw = env.get(f"FORKLIFT_{name.upper()}")
            if raw is None or raw == "":
                continue
            if name in ("job_modules", "api_keys"):
                values[name] = tuple(m.strip() for m in raw.split(",") if m.strip())
            else:
                values[name] = raw
        return cls.model_validate(values)

    @property
    def all_job_modules(self) -> tuple[str, ...]:
        return BUILTIN_JOB_MODULES + tuple(
            m for m in self.job_modules if m not in BUILTIN_JOB_MODULES
        )

    @property
    def shm_pool_limit(self) -> int:
        if self.shm_pool_bytes < 0:
            return self.shm_limit_bytes // 4
        return self.shm_pool_bytes

    def domain_queue(self, domain: str | None = None) -> str:
        """The queue only workers of one shm domain consume: jobs go where their data is."""
        return f"{self.queue}.{domain or self.shm_domain}"

    def key(self, *parts: str) -> str:
        """A Redis key in forklift's namespace, so a stack can share a Redis database."""
        return ":".join((self.key_prefix, *parts))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()

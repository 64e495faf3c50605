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

from shared.keys import Keys, keys_for

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


def _machine_memory_bytes() -> int:
    """RAM this process may use: MemTotal, or the cgroup's memory.max when lower (containers)."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        total = 0
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap.isdigit() and (total == 0 or int(cap) < total):
            total = int(cap)
    except OSError:
        pass
    return total


def _default_child_memory(data: dict[str, object]) -> int:
    """An even share, per worker child, of the RAM left beside the shared-memory cap.

    Arrays in /dev/shm are RAM too: what the machine has minus the cap, split between the
    `worker_concurrency` children (at least 256 MiB each), so a job that allocates without
    bound fails with "memory limit" instead of sending the host into the OOM killer.
    """
    ram = _machine_memory_bytes()
    if ram <= 0:  # pragma: no cover - unknown machine: no limit
        return 0
    shm = int(data.get("shm_limit_bytes") or 0)  # type: ignore[call-overload]
    children = int(data.get("worker_concurrency") or 1)  # type: ignore[call-overload]
    return max(256 << 20, (ram - shm) // max(1, children))


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
    # Seconds after which a job whose worker stopped beating, or no longer holds it, is
    # declared lost by the reaper (shared/jobs_reaper.py) and delivered again (or failed once
    # its attempts are spent), whatever the visibility timeout; also how long a queued job's
    # message may be missing from the broker before the job is failed (purged). The reaper
    # runs every third of it.
    worker_lost_after: float = Field(15.0, ge=3)
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

    worker_concurrency: int = Field(default_factory=_cpu_count, ge=1)
    max_tasks_per_child: int = Field(0, ge=0)
    # Address space a job may add to its worker child (RLIMIT_AS, set per job on top of what
    # the child maps already, attached input segments included); 0 = no limit. Default: the
    # machine's RAM less shm_limit_bytes, split between worker_concurrency children. The API
    # refuses (422) a job whose estimated memory passes it, before anything is queued.
    child_memory_limit_bytes: int = Field(default_factory=_default_child_memory, ge=0)

    # Networked deployments: an API bound to a non-loopback address with no api_keys refuses
    # to start unless this says the open API is meant (e.g. behind a loopback-only publish).
    allow_open: bool = False
    # Where a container's port is published on its host (compose passes its
    # FORKLIFT_BIND_ADDRESS): an open API listens on 0.0.0.0 inside its container, and a
    # loopback publish is what keeps others out, so it counts as loopback. Empty = no container.
    published_address: str = ""
    # A request body must keep arriving at this many bytes per second on average, after a
    # grace of body_timeout seconds, or it ends with 408 (a slow upload holds its
    # reservation for a bounded time); 0 = no rate, only body_timeout.
    body_min_rate: int = Field(1 << 20, ge=0)
    # Per key (per API process; the open API is one key): uploads in flight, bytes those
    # uploads reserve (-1 = half of shm_limit_bytes with keys, all of it open), open event
    # streams and long-polls.
    # Past one of them the request gets 429 with Retry-After.
    # The byte limit also holds a key's open same-host registrations (POST /arrays/register
    # until commit/abandon/expiry), counted in Redis, exactly across API processes, together
    # with the key's HTTP uploads in the reserving process (api/limits.py RegisteredBytes).
    key_max_uploads: int = Field(8, ge=1)
    key_max_upload_bytes: int = Field(-1, ge=-1)
    key_max_streams: int = Field(32, ge=1)
    key_max_waits: int = Field(64, ge=1)

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
    def key_upload_bytes_limit(self) -> int:
        """-1: half the shm cap with keys set; the whole cap open (one bucket for everyone)."""
        if self.key_max_upload_bytes < 0:
            return self.shm_limit_bytes // 2 if self.api_keys else self.shm_limit_bytes
        return self.key_max_upload_bytes

    @property
    def job_memory_budget(self) -> tuple[int, str]:
        """Bytes a job may allocate in its child, and the setting that says so (submit checks)."""
        if self.child_memory_limit_bytes > 0:
            return self.child_memory_limit_bytes, "FORKLIFT_CHILD_MEMORY_LIMIT_BYTES"
        return _machine_memory_bytes(), "the machine's RAM"

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

    @property
    def keys(self) -> Keys:
        """Every Redis key and channel of this stack (`shared/keys.py`)."""
        return keys_for(self.key_prefix)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()

"""One settings object, read from the environment, shared by the API, the workers and tools.

Every knob a deployment may turn is here, named `FORKLIFT_*` (plus the conventional
`REDIS_URL`), so the compose file, the launcher and the tests all speak the same language.

Read by pydantic-settings, highest first: values passed to `Settings(...)`, the environment
(`FORKLIFT_<FIELD>`; an empty value means the default), then one file per setting in the
secrets directory (Docker and Kubernetes secrets: `FORKLIFT_SECRETS_DIR`, else `/run/secrets`
when it exists). A `.env` file is read only where a launcher asks for it (`forklift up`):
`Settings.from_env(env, env_file=...)`, and `with_env_file` for the environment its children
get, so every process of a stack reads the same values.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from shared.keys import Keys, keys_for
from shared.trust import normalized_url

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
    shm, children = data.get("shm_limit_bytes"), data.get("worker_concurrency")
    shm_bytes = shm if isinstance(shm, int) else 0
    share = children if isinstance(children, int) and children > 0 else 1
    return max(256 << 20, (ram - shm_bytes) // share)


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


SECRETS_DIR = Path("/run/secrets")  # where Docker (compose `secrets:`) mounts secrets

# The mapping `Settings.from_env` reads instead of os.environ, for the build under way.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("forklift_environ", default=None)


class SettingsFileError(ValueError):
    """A settings file or folder that was asked for is not there."""


def secrets_dir(env: Mapping[str, str]) -> Path | None:
    """`FORKLIFT_SECRETS_DIR` (it must exist: a typo must not drop the secrets silently), else
    `/run/secrets` when it exists, else none."""
    named = env.get("FORKLIFT_SECRETS_DIR", "")
    if named:
        folder = Path(named).expanduser()
        if not folder.is_dir():
            raise SettingsFileError(f"FORKLIFT_SECRETS_DIR={named!r} is not a directory")
        return folder
    return SECRETS_DIR if SECRETS_DIR.is_dir() else None


def with_env_file(
    env: Mapping[str, str], env_file: str | os.PathLike[str] | None
) -> dict[str, str]:
    """`env` over a `.env` file: the file fills what `env` leaves unset or empty.

    What `forklift up` gives the processes it starts, so the API and the workers read the
    file's values as their environment and never look for a `.env` themselves.
    """
    merged = dict(env)
    if env_file is None:
        return merged
    path = Path(env_file).expanduser()
    if not path.is_file():
        raise SettingsFileError(f"no env file at {str(path)!r}")
    for name, value in dotenv_values(path).items():
        if value is not None and not merged.get(name):
            merged[name] = value
    return merged


class _Environ(EnvSettingsSource):
    """The environment source over the mapping given to `Settings.from_env`, else os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def _variable(name: str, env: Mapping[str, str]) -> str:
    """The environment variable a field is read from (`redis_url`: whichever of two is set)."""
    if name == "redis_url" and not env.get("FORKLIFT_REDIS_URL"):
        return "REDIS_URL"
    return f"FORKLIFT_{name.upper()}"


AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")

_SECRET_FIELDS = {"redis_password", "internal_token", "api_keys"}


def _named_by_variable(exc: ValidationError, env: Mapping[str, str]) -> ValidationError:
    """The same errors, each placed at its environment variable instead of its field name."""
    details: list[InitErrorDetails] = []
    for error in exc.errors():
        if error["type"] == "default_factory_not_called":  # a consequence, not a bad value
            continue
        loc = error["loc"]
        field = str(loc[0]) if loc else ""
        if field in Settings.model_fields or field.upper().endswith("REDIS_URL"):
            name = "redis_url" if field.upper().endswith("REDIS_URL") else field
            loc = (_variable(name, env), *loc[1:])
        shown = error["input"]
        if field in _SECRET_FIELDS:  # a bad secret is named, never printed
            shown = "**********"
        elif isinstance(shown, str) and (
            field.upper().endswith("REDIS_URL") or field == "broker_url"
        ):
            shown = redacted_url(shown)
        detail: InitErrorDetails = {"type": error["type"], "loc": loc, "input": shown}
        if "ctx" in error:
            detail["ctx"] = error["ctx"]
        details.append(detail)
    return ValidationError.from_exception_data("forklift settings", details)


class Settings(BaseSettings):
    """Deployment settings; build with `Settings.from_env()` or `get_settings()`."""

    model_config = SettingsConfigDict(
        frozen=True,
        env_prefix="FORKLIFT_",
        env_ignore_empty=True,
        # Lists are comma-separated (`FORKLIFT_API_KEYS=k1,k2`), not JSON: `_comma_list`.
        enable_decoding=False,
        # Other FORKLIFT_* variables (the client's FORKLIFT_URL, compose's) are not settings.
        extra="ignore",
        validate_by_name=True,
    )

    # FORKLIFT_REDIS_URL first, then the conventional REDIS_URL.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("FORKLIFT_REDIS_URL", "REDIS_URL"),
    )
    # Redis's password (its `requirepass`), folded into redis_url (and so into the Celery
    # broker URL) when that URL names none: a secret file can hold it apart from the URL.
    redis_password: SecretStr | None = None
    # The Celery broker (its transport): empty = the Redis of redis_url (password included),
    # or amqp:// (RabbitMQ). Job records, arrays and events stay in Redis whichever it is.
    broker_url: str = Field(default="", pattern=r"^((redis|rediss|unix|amqp|amqps|pyamqp)://.*)?$")
    key_prefix: str = Field(default="forklift", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    queue: str = Field(default="forklift", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    shm_prefix: str = Field(default="forklift_", pattern=r"^forklift_[A-Za-z0-9_]{0,40}$")
    shm_domain: str = Field(default_factory=derive_shm_domain)
    job_modules: tuple[str, ...] = ()

    job_time_limit: float = Field(default=3600.0, gt=0)
    job_kill_grace: float = Field(default=10.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    # Seconds past the hard time limit after which the message of a job whose worker vanished
    # (SIGKILL, OOM, power loss) is delivered again: the Redis transport's visibility timeout.
    redelivery_margin: float = Field(default=600.0, gt=0)
    # Seconds after which a job whose worker stopped beating, or no longer holds it, is
    # declared lost by the reaper (shared/jobs_reaper.py) and delivered again (or failed once
    # its attempts are spent), whatever the visibility timeout; also how long a queued job's
    # message may be missing from the broker before the job is failed (purged). The reaper
    # runs every third of it.
    worker_lost_after: float = Field(default=15.0, ge=3)
    job_ttl: int = Field(default=86400, gt=0)
    # Seconds an `Idempotency-Key` answers with the job(s) it first made (api/idempotency.py).
    idempotency_ttl: int = Field(default=86400, gt=0)
    array_ttl: int = Field(default=3600, gt=0)
    max_wait: float = Field(default=60.0, ge=0)
    max_json_bytes: int = Field(default=1 << 20, gt=0)
    max_upload_bytes: int = Field(default=8 << 30, gt=0)
    # Seconds a client may go silent in the middle of a request body (a Content-Length larger
    # than what it sends, a stalled upload) before the API answers 408 and lets go.
    body_timeout: float = Field(default=30.0, gt=0)
    shm_limit_bytes: int = Field(default_factory=lambda: _dev_shm_bytes() // 2, ge=0)
    janitor_interval: float = Field(default=60.0, gt=0)
    # Freed segments kept allocated for reuse (shared/arrays/pool.py): -1 = a quarter of
    # shm_limit_bytes, 0 = off.
    shm_pool_bytes: int = Field(default=-1, ge=-1)

    api_keys: tuple[SecretStr, ...] = ()
    log_format: str = Field(default="text", pattern=r"^(text|json)$")
    # Celery task events cost a publish per state change; Flower turns them on by itself.
    celery_events: bool = False

    # Several shm domains (hosts): the URL other domains reach this domain's API at, recorded
    # in every array made here, and the secret the APIs' /internal endpoints require.
    api_internal_url: str = Field(default="", pattern=r"^(https?://[^\s/?#]+(/[^\s?#]*)?)?$")
    internal_token: SecretStr | None = None
    # The other domains' FORKLIFT_API_INTERNAL_URL values: the only APIs an array is read
    # from (with the internal token), whatever URL a record in Redis names (shared/trust.py).
    peer_urls: tuple[str, ...] = ()

    worker_concurrency: int = Field(default_factory=_cpu_count, ge=1)
    # `"parallel": "auto"` runs a job as at most one part per live worker process of its
    # domain, and gives every part at least this many bytes of its split input.
    parallel_min_part_bytes: int = Field(default=8 << 20, ge=1)
    max_tasks_per_child: int = Field(default=0, ge=0)
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
    body_min_rate: int = Field(default=1 << 20, ge=0)
    # Per key (per API process; the open API is one key): uploads in flight, bytes those
    # uploads reserve (-1 = half of shm_limit_bytes with keys, all of it open), open event
    # streams and long-polls.
    # Past one of them the request gets 429 with Retry-After.
    # The byte limit also holds a key's open same-host registrations (POST /arrays/register
    # until commit/abandon/expiry), counted in Redis, exactly across API processes, together
    # with the key's HTTP uploads in the reserving process (api/limits.py RegisteredBytes).
    key_max_uploads: int = Field(default=8, ge=1)
    key_max_upload_bytes: int = Field(default=-1, ge=-1)
    key_max_streams: int = Field(default=32, ge=1)
    key_max_waits: int = Field(default=64, ge=1)

    @field_validator("job_modules", "api_keys", "peer_urls", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("peer_urls")
    @classmethod
    def _peer_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(normalized_url(url) for url in value))

    @field_validator("redis_password")
    @classmethod
    def _redis_password(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """Checked here, not when folded below: an error then would show the password."""
        url = info.data.get("redis_url")
        if value is not None and isinstance(url, str):
            redis_url_with_password(url, value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _fold_redis_password(self) -> Settings:
        """One URL for every Redis client and the broker: the password goes into it."""
        if self.redis_password is not None:
            url = redis_url_with_password(self.redis_url, self.redis_password.get_secret_value())
            object.__setattr__(self, "redis_url", url)  # frozen: set once, while validating
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment (or `from_env`'s mapping), then secret files."""
        environ = _ENVIRON.get()
        if environ is None:
            environ = os.environ
        secrets = file_secret_settings
        if isinstance(secrets, SecretsSettingsSource) and secrets.secrets_dir is None:
            secrets = SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir(environ))
        return init_settings, _Environ(settings_cls, environ), dotenv_settings, secrets

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = None,
    ) -> Settings:
        """Read `env` (default: os.environ) over `env_file`, and the secrets directory.

        A bad value raises pydantic's ValidationError, each error named by its variable
        (`FORKLIFT_JOB_TTL`); a missing env file or secrets directory, SettingsFileError.
        """
        environ = with_env_file(os.environ if env is None else env, env_file)
        token = _ENVIRON.set(environ)
        try:
            return cls()
        except ValidationError as exc:
            raise _named_by_variable(exc, environ) from None
        finally:
            _ENVIRON.reset(token)

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

    @property
    def broker(self) -> str:
        """The Celery broker's URL: FORKLIFT_BROKER_URL, else the Redis URL."""
        return self.broker_url or self.redis_url

    @property
    def broker_is_amqp(self) -> bool:
        """RabbitMQ (AMQP) rather than Redis: priorities, queue depth and the reaper differ."""
        return urlsplit(self.broker).scheme in AMQP_SCHEMES

    def domain_queue(self, domain: str | None = None) -> str:
        """The queue only workers of one shm domain consume: jobs go where their data is."""
        return f"{self.queue}.{domain or self.shm_domain}"

    @property
    def keys(self) -> Keys:
        """Every Redis key and channel of this stack (`shared/keys.py`)."""
        return keys_for(self.key_prefix)


def redis_url_with_password(url: str, password: str) -> str:
    """`url` carrying `password` (percent-encoded); a URL with another password is an error."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = dict(parse_qsl(parts.query))
        if query.get("password", password) != password:
            raise ValueError("REDIS_URL and FORKLIFT_REDIS_PASSWORD name different passwords")
        query["password"] = password
        return f"{url.partition('?')[0]}?{urlencode(query)}"  # urlunsplit drops unix://'s //
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"REDIS_URL must be redis://, rediss:// or unix://, not {parts.scheme}://")
    if parts.password is not None:
        if unquote(parts.password) != password:
            raise ValueError("REDIS_URL and FORKLIFT_REDIS_PASSWORD name different passwords")
        return url
    user = quote(unquote(parts.username), safe="") if parts.username else ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def redacted_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()

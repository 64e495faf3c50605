"""Payload schemas: what travels over HTTP, through the broker, and into Redis records."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

ID_PATTERN = r"^[0-9a-f]{32}$"

# Parts one parallel job may run as, at most.
MAX_PARTS = 256
_ID = re.compile(ID_PATTERN)


# Bounds of what a submission may ask for (each checked before anything is written).
MAX_PRIORITY = 9  # priorities are 0..9, higher first
MAX_DELAY_S = 30 * 86400.0  # how far ahead `delay` / `not_before` may put a job
MAX_RETRIES = 25
MAX_TAGS = 16
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 200
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.\-/]+$"
_TAG_KEY = re.compile(TAG_KEY_PATTERN)


def _check_tags(tags: dict[str, str]) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    for key, value in tags.items():
        if not (0 < len(key) <= MAX_TAG_KEY and _TAG_KEY.fullmatch(key)):
            raise ValueError(
                f"tag key {key[:MAX_TAG_KEY]!r}: 1 to {MAX_TAG_KEY} of A-Z a-z 0-9 _ . - /"
            )
        if len(value) > MAX_TAG_VALUE:
            raise ValueError(f"tag {key!r}: a value has at most {MAX_TAG_VALUE} characters")
    return tags


Tags = Annotated[
    dict[str, str],
    AfterValidator(_check_tags),
    Field(description=f"metadata, at most {MAX_TAGS} `key: value` pairs; filter with ?tag=k:v"),
]


def is_id(text: str) -> bool:
    """Job and array ids are 32 lowercase hex digits; anything else is never looked up."""
    return bool(_ID.fullmatch(text))


class JobStatus(StrEnum):
    waiting = "waiting"  # for an upstream job's result (an input `{"job": id}`)
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class ArrayRef(BaseModel):
    """What a worker needs to attach an array: only names and numbers, never the bytes.

    The base of the array family: `ArrayMeta` (what clients see) adds its times, and the
    registry's `ArrayRecord` (shared/arrays/store.py) its owner and state.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    segment: str
    shape: tuple[int, ...]
    dtype: str
    order: str = "C"
    nbytes: int
    domain: str

    def info(self) -> ArrayInfo:
        """Shape and NumPy dtype, what input checks look at (`@job(check=)`)."""
        return ArrayInfo(self.shape, np.dtype(self.dtype), self.order)


class ArrayMeta(ArrayRef):
    """An array as clients see it."""

    created_at: float
    expires_at: float


@dataclass(frozen=True)
class ArrayInfo:
    """An array's shape, dtype and memory order without its bytes: an ndarray's look for
    input checks and for planning a split (`order` as `shared/splits.py` reads it)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    order: str = "C"


class ArrayInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    array: str = Field(description="id of an uploaded array or of an array result")


class JobInput(BaseModel):
    """An input that is another job's array result, used once that job has succeeded."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(
        description="id of the upstream job; in POST /jobs/batch also `#<index>` of an"
        " earlier entry of the same batch"
    )
    key: str | None = Field(
        default=None,
        max_length=200,
        description="for a dict result: the name of the array to take",
    )


Parallel = Annotated[int, Field(ge=1, le=MAX_PARTS)] | Literal["auto"]


class JobSubmission(BaseModel):
    """Body of `POST /jobs`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"task": "fib", "params": {"n": 25}},
                {"task": "sum", "params": {"axis": 0}, "inputs": {"a": {"array": "<id>"}}},
            ]
        },
    )

    task: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, ArrayInput | JobInput] = Field(default_factory=dict)
    timeout: float | None = Field(
        None, gt=0, description="seconds; may only lower the server's job time limit"
    )
    parallel: Parallel = Field(
        default=1,
        description="run as this many parts over the same arrays (a splittable task);"
        " `auto`: the live worker processes of the inputs' domain",
    )
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY, description="0..9, higher first")
    delay: float | None = Field(
        default=None, ge=0, le=MAX_DELAY_S, description="seconds from now before the job may start"
    )
    not_before: datetime | None = Field(
        default=None,
        description="the time (ISO 8601, or unix seconds) before which it may not start",
    )
    retries: int | None = Field(
        default=None,
        ge=0,
        le=MAX_RETRIES,
        description="retries of a raising job; may only lower the job's",
    )
    tags: Tags = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_start_time(self) -> JobSubmission:
        if self.delay is not None and self.not_before is not None:
            raise ValueError("give `delay` or `not_before`, not both")
        return self


MAX_BATCH = 1000


class JobBatch(BaseModel):
    """Body of `POST /jobs/batch`."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobSubmission] = Field(min_length=1, max_length=MAX_BATCH)


class JobWait(BaseModel):
    """Body of `POST /jobs/wait`."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)
    wait: float = Field(0, ge=0, description="seconds to wait for the jobs to end")
    any: bool = Field(False, description="answer as soon as one job has ended")


class Progress(BaseModel):
    fraction: float = 0.0
    note: str = ""


class WorkerProcess(BaseModel):
    """A worker process and the shm domain it serves: what every view of a worker shares."""

    pid: int = 0
    domain: str = ""


class WorkerInfo(WorkerProcess):
    """Where a job ran (the host and pid of the child that ran it)."""

    hostname: str = ""


class WorkerPresence(WorkerProcess):
    """A worker's heartbeat record (`Keys.worker`): written by `worker/heartbeat.py`, read
    through `shared/workers.py:WorkerStore`."""

    name: str
    concurrency: int = 0
    started_at: float = 0.0
    api_url: str = Field("", description="the internal API URL of the worker's domain")


class WorkerSeen(WorkerPresence):
    """A presence record with its last beat: `GET /cluster`, `/metrics`, routing."""

    last_seen: float = Field(description="unix time of the last heartbeat")
    online: bool = True


class Attempt(BaseModel):
    """One run of a job: when it started and, if it ended badly, why (`JobView.attempts`)."""

    started_at: float
    finished_at: float | None = None
    error: str | None = None


class Parts(BaseModel):
    """A parallel job's parts: how many, how many ended well or badly, and their ids (each
    part is a record of its own, `GET /jobs/{part id}` shows where it ran)."""

    total: int
    done: int = 0
    failed: int = 0
    ids: list[str] = Field(default_factory=list)


class JobBase(BaseModel):
    """The fields a job has both as stored (`shared/jobstore.py:JobRecord`) and as shown."""

    id: str
    task: str
    status: JobStatus
    params: dict[str, Any]
    inputs: dict[str, str] = Field(description="input name → array id")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    error: str | None = None
    result: Any = None
    parent: str | None = Field(default=None, description="a part's parallel job")
    upstream: dict[str, JobInput] | None = Field(
        default=None, description="inputs that are other jobs' results (input name -> job)"
    )
    upstream_failed: str | None = Field(
        default=None, description="the upstream job whose failure or cancellation ended this one"
    )
    priority: int = 0
    tags: dict[str, str] = Field(default_factory=dict)
    not_before: float | None = Field(
        default=None, description="a delayed job: it does not start before this unix time"
    )
    retries: int = Field(default=0, description="retries allowed if the job raises")
    retry_at: float | None = Field(
        default=None, description="a job waiting to be retried (`queued`): its next start"
    )


class JobView(JobBase):
    """A job as clients see it (`GET /jobs/{id}`)."""

    worker: WorkerInfo | None = None
    parts: Parts | None = None
    attempts: list[Attempt] = Field(
        default_factory=list, description="every run so far, oldest first, with its error"
    )


class JobList(BaseModel):
    """`GET /jobs`: a page of the caller's jobs, newest first."""

    jobs: list[JobView]
    next: str | None = Field(description="the cursor of the next page; null on the last")


class JobBatchView(BaseModel):
    jobs: list[JobView]


# Periodic jobs (shared/schedules.py). Each run is a job tagged `schedule: <id>`.
MAX_SCHEDULES = 100  # schedules one owner may have
MAX_EVERY_S = 366 * 86400.0
MAX_CRON = 120  # characters of a cron expression
MAX_SCHEDULE_PARAMS = 64 * 1024  # bytes of a schedule's params, as JSON
SCHEDULE_TAG = "schedule"


class ScheduleSpec(BaseModel):
    """What a schedule runs and when: the fields its body and its view share (the job part
    is a submission's, validated as one: api/submissions.py:prepare)."""

    task: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, ArrayInput] = Field(
        default_factory=dict, description="uploaded arrays; each must still exist at each run"
    )
    timeout: float | None = Field(
        None, gt=0, description="seconds; may only lower the server's job time limit"
    )
    parallel: Parallel = 1
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY, description="0..9, higher first")
    retries: int | None = Field(
        default=None, ge=0, le=MAX_RETRIES, description="may only lower the job's"
    )
    tags: Tags = Field(default_factory=dict)
    cron: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CRON,
        description="5 fields, UTC: minute hour day-of-month month day-of-week (0 = Sunday);"
        " day-of-month and day-of-week must both match (Celery's crontab)",
    )
    every: float | None = Field(
        default=None, ge=1, le=MAX_EVERY_S, description="seconds between runs"
    )
    name: str = Field(default="", max_length=200)


class ScheduleCreate(ScheduleSpec):
    """Body of `POST /schedules`: exactly one of `cron` and `every`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"task": "fib", "params": {"n": 25}, "every": 60},
                {"task": "fib", "params": {"n": 25}, "cron": "0 9 * * 1-5", "name": "daily"},
            ]
        },
    )

    @model_validator(mode="after")
    def _one_rule(self) -> ScheduleCreate:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of `cron` and `every`")
        if SCHEDULE_TAG in self.tags:
            raise ValueError(f"tag `{SCHEDULE_TAG}` is set on each run by the scheduler")
        if len(self.tags) >= MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS - 1} tags (each run also gets `{SCHEDULE_TAG}`)")
        return self


class ScheduleView(ScheduleSpec):
    """A schedule as its owner sees it (`GET /schedules/{id}`); times are unix seconds."""

    id: str
    created_at: float
    next_run: float | None = Field(default=None, description="when it runs next")
    last_run: float | None = Field(default=None, description="when it last fired")
    last_job: str | None = Field(default=None, description="the job its last run submitted")
    runs: int = Field(default=0, description="jobs submitted so far")
    skipped: int = Field(default=0, description="runs refused (an input gone, say)")
    last_error: str | None = Field(
        default=None, description="why the latest run was refused; cleared by a run that starts"
    )


class ScheduleList(BaseModel):
    schedules: list[ScheduleView]


MAX_CANCEL = 10_000  # jobs one `POST /jobs/cancel` by filter cancels at most
_TAG_FILTER = MAX_TAG_KEY + 1 + MAX_TAG_VALUE  # `key:value`


class JobCancel(BaseModel):
    """Body of `POST /jobs/cancel`: `ids`, or a filter (`tag`, `task`, `status`), not both."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, min_length=1, max_length=MAX_BATCH
    )
    tag: (
        Annotated[str, Field(max_length=_TAG_FILTER)]
        | Annotated[list[Annotated[str, Field(max_length=_TAG_FILTER)]], Field(max_length=MAX_TAGS)]
        | None
    ) = Field(default=None, description="`key:value`, or a list of them (all must match)")
    task: str | None = Field(default=None, max_length=200)
    status: list[JobStatus] | None = Field(
        default=None,
        max_length=len(JobStatus),
        description="only these of queued, waiting, running (default: all three)",
    )

    @model_validator(mode="after")
    def _one_way(self) -> JobCancel:
        by_filter = self.tag is not None or self.task is not None or self.status is not None
        if self.ids is not None and by_filter:
            raise ValueError("give `ids` or a filter (`tag`, `task`, `status`), not both")
        if self.ids is None and not by_filter:
            raise ValueError("give `ids` or a filter (`tag`, `task`, `status`)")
        return self


class CancelSkipped(BaseModel):
    id: str
    status: str = Field(description="its status (already final), `part`, or `not_found`")


class CancelReply(BaseModel):
    """Reply of `POST /jobs/cancel`."""

    cancelled: list[str]
    skipped: list[CancelSkipped]
    more: bool = Field(
        False, description="a filter matched more than one request cancels: send it again"
    )


class PartRef(BaseModel):
    """Which part of a parallel job a message runs (shared/splits.py:PartInfo's numbers)."""

    parent: str
    index: int
    total: int
    start: int
    stop: int
    length: int


class TaskPayload(BaseModel):
    """The one argument of the Celery task: JSON only, arrays by reference."""

    job_id: str
    task: str
    params: dict[str, Any]
    inputs: dict[str, ArrayRef] = Field(default_factory=dict)
    timeout: float | None = None
    owner: str = ""
    part: PartRef | None = None
    output: ArrayRef | None = None  # the in-place output segment (reserved, not yet visible)
    priority: int = 0  # forklift's 0..9, higher first (api/enqueue.py maps it to the broker's)
    retries: int = 0  # retries allowed (the job's, lowered by the submission's)
    retried: int = 0  # retries made so far (the message of a retry is rebuilt from the record)


class TaskInfo(BaseModel):
    name: str
    doc: str
    params_schema: dict[str, Any]
    inputs: dict[str, dict[str, Any]]
    splittable: bool = Field(default=False, description="accepts `parallel` (runs as parts)")
    retries: int = Field(default=0, description="retries of a raising job (`@job(retries=)`)")


class ErrorDetail(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    """`GET /healthz` while Redis answers; `no_workers` while no worker is online (jobs then
    wait in the queue)."""

    status: Literal["ok", "no_workers"]
    redis: bool
    workers: int = Field(description="workers online (each a pool of processes)")
    shm_domain: str = Field(description="this API's shm domain")


class HealthDown(BaseModel):
    """`GET /healthz` (a 503) while Redis does not answer."""

    status: Literal["unavailable"]
    redis: bool
    workers: None
    error: ErrorDetail


class ShmInfo(BaseModel):
    """`GET /arrays/register/info`: what a same-host client needs to register segments."""

    shm_prefix: str = Field(description="segment names must start with this")
    shm_domain: str = Field(description="only clients in this domain can register segments")
    reservation_timeout: int = Field(description="seconds between reserve and commit")

"""What the sync and async clients share: constants, argument splitting, outcomes, backoff."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import numpy as np
from pydantic import TypeAdapter, ValidationError

from forklift.errors import (
    ForkliftError,
    JobCancelled,
    JobFailed,
    Timeout,
    Unavailable,
    error_from_response,
    retry_after,
)
from forklift.handles import ArrayHandle, JobOutput
from shared.schemas import (
    MAX_DELAY_S,
    MAX_PARTS,
    MAX_PRIORITY,
    MAX_RETRIES,
    ArrayInput,
    JobInput,
    JobStatus,
    JobView,
    Tags,
)

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, API_KEY_ENV = "FORKLIFT_URL", "FORKLIFT_API_KEY"
USER_AGENT = "forklift-client/0.1"
POLL_S = 30.0  # one long-poll; the server caps it at FORKLIFT_MAX_WAIT (60 s by default)
SSE_READ_S = 45.0  # the server sends a keep-alive every 15 s
SHM_THRESHOLD = 1 << 20  # auto mode registers arrays at least this big
FINAL = frozenset({"succeeded", "failed", "cancelled"})


def resolve_url(url: str | None) -> str:
    """`url`, else `FORKLIFT_URL`, else the local stack (an empty value means unset)."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else `FORKLIFT_API_KEY`, else none (an open stack)."""
    return api_key or os.environ.get(API_KEY_ENV) or None


def is_final(view: JobView | None) -> bool:
    """The job has ended (a final view never changes again)."""
    return view is not None and view.status.is_final


def headers_for(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, ArrayHandle):
        return value.id
    if isinstance(value, JobOutput):  # resolved by the client before; here: another's job
        raise TypeError(f"{value!r}: a job of another client cannot be an input here")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_json(body: Any) -> bytes:
    return json.dumps(body, default=_json_default).encode()


JSON_HEADERS = {"Content-Type": "application/json"}


def idempotent_json_headers(key: str) -> dict[str, str]:
    """A submission's headers: the server makes one job of every request with `key`, so it
    may be sent again when its answer is lost (api/idempotency.py)."""
    return {**JSON_HEADERS, "Idempotency-Key": key}


@dataclass
class Arguments:
    """A job's keyword arguments sorted into params, handles to reuse, arrays to upload and
    other jobs' results (`JobInput`s: the client turns job handles into those first)."""

    params: dict[str, Any] = field(default_factory=dict)
    handles: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    jobs: dict[str, JobInput] = field(default_factory=dict)


def split_arguments(arguments: Mapping[str, Any]) -> Arguments:
    out = Arguments()
    for name, value in arguments.items():
        if isinstance(value, ArrayHandle):
            out.handles[name] = value.id
        elif isinstance(value, ArrayInput):
            out.handles[name] = value.array
        elif isinstance(value, np.ndarray):
            out.arrays[name] = value
        elif isinstance(value, JobInput):
            out.jobs[name] = value
        else:
            out.params[name] = value
    return out


Parallel = int | str | None  # a part count >= 1, "auto", or None (one part: not sent)


def check_parallel(parallel: Parallel) -> Parallel:
    """`parallel` as given, refused here (ValueError) unless an int >= 1 or "auto": before
    any array is uploaded for a job the API would refuse."""
    if parallel is None or parallel == "auto":
        return parallel
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel: an int >= 1 or 'auto', not {parallel!r}")
    if parallel > MAX_PARTS:
        raise ValueError(f"parallel: at most {MAX_PARTS} parts, not {parallel}")
    return parallel


def _number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: a number, not {value!r}")
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name}: from {low:.15g} to {high:.15g}, not {value!r}")
    return float(value)


def _count(name: str, value: object, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValueError(f"{name}: an int from 0 to {high}, not {value!r}")
    return value


_TAGS: TypeAdapter[dict[str, str]] = TypeAdapter(Tags)


@dataclass(frozen=True)
class Queueing:
    """A submission's queue fields; None leaves each to the server (priority 0, at once,
    the job's own retries, no tags). Checked when made (ValueError), so nothing is uploaded
    for a job the API would refuse.

    `priority`: 0..9, higher first. `delay` (seconds or a timedelta) or `not_before` (an
    aware datetime, or unix seconds): the job stays `queued` until then. A naive datetime
    is refused: the API reads a naive time as UTC, Python as local time. `retries`: may only
    lower the job's own. `tags`: at most 16 `key: value` strings."""

    priority: int | None = None
    delay: float | timedelta | None = None
    not_before: datetime | float | None = None
    retries: int | None = None
    tags: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        self.fields()  # every check, now

    def fields(self) -> dict[str, Any]:
        """The body's fields for what was given."""
        out: dict[str, Any] = {}
        if self.priority is not None:
            out["priority"] = _count("priority", self.priority, MAX_PRIORITY)
        if self.delay is not None and self.not_before is not None:
            raise ValueError("give delay or not_before, not both")
        if self.delay is not None:
            delay = self.delay
            seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
            out["delay"] = _number("delay", seconds, 0, MAX_DELAY_S)
        if isinstance(self.not_before, datetime):
            if self.not_before.utcoffset() is None:
                raise ValueError(
                    "not_before: a naive datetime is ambiguous; give one with a tzinfo"
                    " (datetime.now(UTC) + ...) or unix seconds"
                )
            out["not_before"] = self.not_before.isoformat()
        elif self.not_before is not None:
            out["not_before"] = _number("not_before", self.not_before, 0, float("inf"))
        if self.retries is not None:
            out["retries"] = _count("retries", self.retries, MAX_RETRIES)
        if self.tags is not None:
            try:
                out["tags"] = _TAGS.validate_python(dict(self.tags))
            except ValidationError as exc:
                message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
                raise ValueError(f"tags: {message}") from None
        return out


def submission_body(
    task: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    time_limit: float | None,
    *,
    jobs: Mapping[str, JobInput] | None = None,
    parallel: Parallel = None,
    queueing: Queueing | None = None,
) -> dict[str, Any]:
    """A `POST /jobs` body: array inputs by id, job inputs as `{"job", "key"?}`; `parallel`
    sent only when it asks for more than one part (1 is the API's default); the queue
    fields only as given."""
    body: dict[str, Any] = {"task": task, "params": params}
    if inputs or jobs:
        body["inputs"] = {name: {"array": array_id} for name, array_id in inputs.items()}
        for name, ref in (jobs or {}).items():
            body["inputs"][name] = ref.model_dump(exclude_none=True)
    if time_limit is not None:
        body["timeout"] = time_limit
    if check_parallel(parallel) not in (None, 1):
        body["parallel"] = parallel
    if queueing is not None:
        body.update(queueing.fields())
    return body


BATCH = 500  # jobs per `POST /jobs/batch` or `POST /jobs/wait` (the server takes 1000)


def chunks(items: list[Any], size: int = BATCH) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def is_array_ref(value: Any) -> bool:
    """A job result's `{"array": meta}`: an array the worker stored."""
    return (
        isinstance(value, dict)
        and set(value) == {"array"}
        and isinstance(value["array"], dict)
        and "id" in value["array"]
        and "dtype" in value["array"]
    )


def map_arrays(value: Any, convert: Callable[[dict[str, Any]], Any]) -> Any:
    """`value` with every nested `{"array": meta}` replaced by `convert(meta)`."""
    if is_array_ref(value):
        return convert(value["array"])
    if isinstance(value, dict):
        return {k: map_arrays(v, convert) for k, v in value.items()}
    if isinstance(value, list):
        return [map_arrays(v, convert) for v in value]
    return value


def array_metas(value: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    map_arrays(value, found.append)
    return found


def outcome_error(view: JobView) -> JobFailed | JobCancelled | None:
    """The JobFailed / JobCancelled of a job that ended without a result, else None."""
    if view.status == JobStatus.failed:
        return JobFailed(view.error or "the job failed", job_id=view.id, view=view)
    if view.status == JobStatus.cancelled:
        return JobCancelled(view.error or "the job was cancelled", job_id=view.id, view=view)
    return None


class Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + max(0.0, timeout)

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def poll(self, cap: float = POLL_S) -> float:
        remaining = self.remaining()
        return cap if remaining is None else min(cap, remaining)

    def timeout_error(self, what: str) -> Timeout:
        return Timeout(f"{what}: still not done after {self.timeout:g} s", code="timeout")


class Backoff:
    """Delays between retries: exponential with jitter, given up after `window` seconds."""

    def __init__(self, window: float, first: float = 0.1, cap: float = 5.0) -> None:
        self.window = window
        self.first = first
        self.cap = cap
        self._delay = first
        self._since: float | None = None

    def reset(self) -> None:
        self._delay = self.first
        self._since = None

    def next_delay(
        self,
        reason: str,
        deadline: Deadline,
        hint: float | None = None,
        give_up: ForkliftError | None = None,
    ) -> float:
        """Seconds to wait before the next try; Unavailable/Timeout when out of patience
        (`give_up` instead of Unavailable, when given)."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since > self.window:
            if give_up is not None:
                raise give_up
            raise Unavailable(
                f"{reason} (retried for {self.window:g} s)", code="unavailable", status=None
            )
        delay = min(self._delay, self.cap) * random.uniform(0.5, 1.0)
        if hint is not None:
            delay = max(delay, min(hint, self.cap))
        self._delay = min(self._delay * 2, self.cap)
        remaining = deadline.remaining()
        if remaining is not None and delay >= remaining:
            raise deadline.timeout_error(reason)
        return delay

    def after_error_response(self, response: Any, deadline: Deadline) -> float:
        """For a request answered >= 400 (body read): the error, raised, unless it is worth
        waiting out (`worth_retrying`); then the seconds to wait before trying again. A 429
        still refused once the window has passed is raised as itself."""
        error = error_from_response(response.status_code, response.content, response.headers)
        if not worth_retrying(response):
            raise error
        give_up = None if isinstance(error, Unavailable) else error
        hint = retry_after(response.headers, 1.0)
        return self.next_delay(error.message, deadline, hint, give_up)


def worth_retrying(response: Any) -> bool:
    """503 (the stack is not ready), 429 with Retry-After (the key is at a per-key limit
    that frees when its other requests end), or 409 with Retry-After (another request with
    the same Idempotency-Key is under way): the same request may pass later."""
    status = response.status_code
    return status == 503 or (status in (409, 429) and "retry-after" in response.headers)


# --- listing and bulk cancel (`GET /jobs`, `POST /jobs/cancel`) ---------------------------

# A tag filter: "k:v", a list of them, or a mapping {k: v}; every pair must match.
TagFilter: TypeAlias = "str | Iterable[str] | Mapping[str, str] | None"


def tag_filters(tag: TagFilter) -> list[str]:
    """The `k:v` strings of a tag filter."""
    if tag is None:
        return []
    if isinstance(tag, str):
        return [tag]
    if isinstance(tag, Mapping):
        return [f"{key}:{value}" for key, value in tag.items()]
    return [str(item) for item in tag]


def status_list(status: str | Iterable[str]) -> list[str]:
    """One status, a comma-separated string or several, as a list."""
    items = [status] if isinstance(status, str) else list(status)
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]


def _unix(value: float | datetime) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(float(value))


def list_params(
    status: str | Iterable[str] | None,
    task: str | None,
    tag: TagFilter,
    since: float | datetime | None,
    until: float | datetime | None,
) -> list[tuple[str, str]]:
    """The query of `GET /jobs` for these filters."""
    params: list[tuple[str, str]] = []
    if status is not None:
        params += [("status", name) for name in status_list(status)]
    if task is not None:
        params.append(("task", task))
    params += [("tag", item) for item in tag_filters(tag)]
    if since is not None:
        params.append(("since", _unix(since)))
    if until is not None:
        params.append(("until", _unix(until)))
    return params

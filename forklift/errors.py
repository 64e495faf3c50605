"""Typed exceptions carrying what the server said: its message, error code and HTTP status.

ForkliftError                 base; .message, .code, .status, .detail
├── NotFound                  404: unknown job, array, task or registration
├── InvalidRequest            other 4xx (bad params, bad array, not allowed, conflict)
├── ServerError               5xx other than 503 (e.g. 507 shared memory full)
│   └── Unavailable           503, or the server could not be reached
├── JobError                  the job ended without a result; .job_id, .view
│   ├── JobFailed             it raised (or timed out); .message is the server's error
│   └── JobCancelled          it was cancelled (also concurrent.futures.CancelledError)
└── Timeout                   waiting took longer than the timeout given (also TimeoutError)

The two "also"s let code written for `concurrent.futures` catch what it expects.
"""

from __future__ import annotations

import json
from concurrent.futures import CancelledError
from typing import Any

from shared.schemas import JobView


class ForkliftError(Exception):
    """Any error the client raises; `message` is the server's text when it sent one."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class NotFound(ForkliftError):
    """404: the job, array, task or registration does not exist (or is not the caller's)."""


class InvalidRequest(ForkliftError):
    """A 4xx other than 404: the request was refused; `message` says why."""


class ServerError(ForkliftError):
    """A 5xx: the server failed (507: shared memory is full)."""


class Unavailable(ServerError):
    """503, or the server could not be reached: retrying later may work."""


class JobError(ForkliftError):
    """The job ended without a result."""

    def __init__(self, message: str, *, job_id: str, view: JobView | None = None) -> None:
        super().__init__(message, code=f"job_{view.status.value}" if view else None)
        self.job_id = job_id
        self.view = view


class JobFailed(JobError):
    """The job raised; `message` is the server's error text, e.g. 'ValueError: ...'."""


class JobCancelled(JobError, CancelledError):
    """The job was cancelled before it finished."""


class Timeout(ForkliftError, TimeoutError):
    """The wait ran out before the job ended."""


def error_from_response(status: int, body: bytes, headers: Any = None) -> ForkliftError:
    """The exception for an error response in forklift's `{"error": {...}}` shape (or not)."""
    code: str | None = None
    detail: Any = None
    message = ""
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        code = error.get("code")
        message = str(error.get("message") or "")
        detail = error.get("detail")
    elif isinstance(payload, dict) and "detail" in payload:  # a plain FastAPI error
        message = str(payload["detail"])
    if not message:
        message = body[:500].decode("utf-8", "replace").strip() or f"HTTP {status}"
    if status == 404:
        cls: type[ForkliftError] = NotFound
    elif status == 503:
        cls = Unavailable
    elif 400 <= status < 500:
        cls = InvalidRequest
    else:
        cls = ServerError
    return cls(message, code=code, status=status, detail=detail)


def retry_after(headers: Any, default: float) -> float:
    """Seconds from a Retry-After header (only the delay form), else `default`."""
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default

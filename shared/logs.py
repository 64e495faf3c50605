"""Logging for the API and the workers: readable text, or JSON lines for a log pipeline.

`setup_logging(settings, "api")` (or `"worker"`) installs one handler on the root logger.
`FORKLIFT_LOG_FORMAT=json` writes one JSON object per line:

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "forklift.worker",
     "msg": "job 3f.. ended succeeded in 0.012 s", "process": "worker", "pid": 4242,
     "job_id": "3f..", "task": "fib", "domain": "a1b2c3d4e5f6", "state": "succeeded",
     "duration": 0.0121}

`job_id`, `task` and `domain` come from the job context (`job_context()` / `bind_job()`), so
every line logged while a job runs carries them, whichever logger wrote it. Fields passed with
`extra={...}` are written too. The text format shows the job context as a `[job=.. task=..]`
suffix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any

from shared.settings import Settings

JOB_FIELDS = ("job_id", "task", "domain")

_job: ContextVar[dict[str, str] | None] = ContextVar("forklift_job_log_context", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "fl_process",
    "fl_job",
    "color_message",  # uvicorn's duplicate of msg with ANSI colours
    *JOB_FIELDS,
}


def bind_job(job_id: str, task: str, domain: str) -> Token[dict[str, str] | None]:
    """Attach a job to every log line of this context until `unbind_job(token)`."""
    return _job.set({"job_id": job_id, "task": task, "domain": domain})


def unbind_job(token: Token[dict[str, str] | None] | None = None) -> None:
    if token is None:
        _job.set(None)
    else:
        _job.reset(token)


@contextlib.contextmanager
def job_context(job_id: str, task: str, domain: str) -> Iterator[None]:
    token = bind_job(job_id, task, domain)
    try:
        yield
    finally:
        unbind_job(token)


def current_job() -> dict[str, str] | None:
    return _job.get()


class JobContextFilter(logging.Filter):
    """Stamps each record with the process role and the current job (None outside a job)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _job.get() or {}
        for name in JOB_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, ctx.get(name))
        record.fl_process = self.process
        parts = [f"{n.removesuffix('_id')}={getattr(record, n)}" for n in JOB_FIELDS]
        record.fl_job = f" [{' '.join(parts)}]" if getattr(record, "job_id", None) else ""
        return True


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, process, pid, job fields, extras."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": getattr(record, "fl_process", ""),
            "pid": record.process,
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and name not in out:
                if name == "data" and isinstance(value, dict) and record.name.startswith("celery"):
                    # Celery's task lines carry the payload (params, owner): keep it out.
                    value = {k: v for k, v in value.items() if k not in ("args", "kwargs")}
                out[name] = _json_safe(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def _level_no(level: int | str) -> int:
    return level if isinstance(level, int) else int(logging.getLevelName(level.upper()))


TEXT_FORMAT = (
    "%(asctime)s %(levelname)-7s %(fl_process)s[%(process)d] %(name)s: %(message)s%(fl_job)s"
)


def setup_logging(
    settings: Settings, process: str, level: int | str = logging.INFO
) -> logging.Handler:
    """Route every logger through one handler on the root logger (stderr); idempotent.

    In JSON mode uvicorn's own loggers are sent through it too, so an API's output is all
    JSON lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler._forklift = True  # type: ignore[attr-defined]
    handler.addFilter(JobContextFilter(process))
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_forklift", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if process == "worker" and _level_no(level) > logging.DEBUG:
        # Celery's own per-task lines ("Task ... received", "... succeeded in") repeat what
        # forklift's one line per job says, with less context, and cost the worker's main
        # process time on every job. Failures still show (WARNING and up); DEBUG shows all.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if settings.log_format == "json":
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            uv = logging.getLogger(name)
            uv.handlers.clear()
            uv.propagate = True
    return handler

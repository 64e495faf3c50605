"""The `forklift` command: `forklift up` runs a stack; the rest move jobs and arrays.

    forklift submit fib n=30 --wait          forklift put data.npy          (prints the id)
    forklift submit sum a=@data.npy --wait   forklift get <array-id> -o out.npy
    forklift status <job-id>                 forklift cancel <job-id>
    forklift wait <job-id> -o out.npy        forklift tasks

Arguments `k=v` are params (v parsed as JSON when it is valid JSON, else taken as a string);
for a task's array inputs, `k=<array-id>` reuses an array, `k=@file.npy` uploads a file and
`k=job:<job-id>` (or `job:<job-id>:<key>`) takes another job's array result once it succeeds.
`--parallel N|auto` runs a splittable task as N parts; `--priority N` (0..9, higher first),
`--delay S` or `--not-before TIME`, `--retries N` and `--tag k=v` queue it.
Exit codes: 0 ok, 1 job failed or cancelled, 2 usage error or request refused (4xx),
3 not found, 4 server unavailable or any other error (including a wait that timed out).

Built on click: the client options (`--url`, `--api-key`, `--retry-for`, `--json`,
`--quiet`) stand before the command or after it, and shell completion comes from click
(`forklift completion bash` prints the script).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
from click.core import ParameterSource
from click.shell_completion import get_completion_class

from forklift import (
    ArrayHandle,
    ArrayInput,
    Client,
    ForkliftError,
    InvalidRequest,
    Job,
    JobError,
    JobInput,
    NotFound,
    Timeout,
    common,
    launcher,
)
from forklift.progress import Bars
from shared.schemas import MAX_DELAY_S, MAX_PRIORITY, MAX_RETRIES

EXIT_OK = 0
EXIT_JOB = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_ERROR = 4
EXIT_INTERRUPTED = 130

RETRY_WINDOW_S = 10.0  # how long to retry through connection errors and 503s

_ARRAY_ID = re.compile(r"[0-9a-f]{1,64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOTE_WIDTH = 40

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(click.UsageError):
    """Bad command-line arguments (exit code 2), shown with the command's usage line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, click.get_current_context(silent=True))


@dataclass
class Options:
    """The client options, from the environment, before the command, then after it."""

    url: str = common.DEFAULT_URL
    api_key: str | None = None
    retry_for: float = RETRY_WINDOW_S
    json: bool = False
    quiet: bool = False


def _version() -> str:
    try:
        return metadata.version("forklift")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


# -- options ---------------------------------------------------------------------------------


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Keep an option given on the command line (or, at the top, by its variable)."""
    if param.name is None or ctx.get_parameter_source(param.name) in (
        None,
        ParameterSource.DEFAULT,
    ):
        return
    setattr(ctx.ensure_object(Options), param.name, value)


def client_options(*, top: bool) -> Callable[[F], F]:
    """`--url` and the others: on the group (with their environment variables) and on each
    client command (a value given after the command wins)."""

    def envvar(name: str) -> str | None:
        return name if top else None

    common_args: dict[str, Any] = {"callback": _store, "expose_value": False}
    options = [
        click.option(
            "--url",
            envvar=envvar("FORKLIFT_URL"),
            show_envvar=top,
            metavar="URL",
            help=f"the API (default {common.DEFAULT_URL})",
            **common_args,
        ),
        click.option(
            "--api-key",
            envvar=envvar("FORKLIFT_API_KEY"),
            show_envvar=top,
            help="API key",
            **common_args,
        ),
        click.option(
            "--retry-for",
            type=float,
            metavar="S",
            help=f"retry through connection errors and 503s for S seconds "
            f"(default {RETRY_WINDOW_S:g})",
            **common_args,
        ),
        click.option(
            "--json", "json", is_flag=True, help="machine-readable output on stdout", **common_args
        ),
        click.option(
            "-q", "--quiet", is_flag=True, help="no progress bars and no notes", **common_args
        ),
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _options() -> Options:
    return click.get_current_context().ensure_object(Options)


def _bars(*, no_progress: bool = False) -> Bars:
    opts = _options()
    return Bars(enabled=not (no_progress or opts.json or opts.quiet))


def _note(text: str) -> None:
    """An informational line on stderr (not with --quiet)."""
    if not _options().quiet:
        click.echo(text, err=True)


def _client() -> Client:
    opts = _options()
    return Client(opts.url, opts.api_key or None, retry_window=opts.retry_for)


def _complete_task(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Task names for shell completion, asked of the stack (nothing when it does not answer
    within a second: completion must never hang a shell)."""
    opts = ctx.find_object(Options) or Options()
    try:
        with Client(opts.url, opts.api_key or None, timeout=1.0, retry_window=0) as client:
            names = [info.name for info in client.tasks()]
    except (ForkliftError, OSError):
        return []
    return sorted(name for name in names if name.startswith(incomplete))


# -- parsing ---------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true, null, lists...), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_arguments(
    pairs: Sequence[str], input_names: set[str]
) -> tuple[dict[str, Any], dict[str, ArrayInput | JobInput], dict[str, Path]]:
    """(params, inputs by array or job id, files to upload) from `k=v` words."""
    params: dict[str, Any] = {}
    ids: dict[str, ArrayInput | JobInput] = {}
    files: dict[str, Path] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _NAME.fullmatch(key):
            raise UsageError(f"expected k=v, got {pair!r}")
        if key in params or key in ids or key in files:
            raise UsageError(f"{key!r} given twice")
        if key in input_names:
            if value.startswith("@"):
                path = Path(value[1:])
                if not path.is_file():
                    raise UsageError(f"{key}=@{path}: no such file")
                files[key] = path
            elif _ARRAY_ID.fullmatch(value):
                ids[key] = ArrayInput(array=value)
            elif value.startswith(JOB_PREFIX):
                ids[key] = parse_job_input(key, value)
            else:
                raise UsageError(
                    f"{key} is an array input: give an array id, @file.npy or job:<job-id>"
                )
        elif value.startswith("@") and value.endswith(".npy"):
            raise UsageError(f"{key} is not an array input of this task")
        else:
            params[key] = parse_value(value)
    return params, ids, files


JOB_PREFIX = "job:"


def parse_job_input(name: str, value: str) -> JobInput:
    """`job:<id>` (the job's array result) or `job:<id>:<key>` (one array of its dict)."""
    ident, colon, key = value.removeprefix(JOB_PREFIX).partition(":")
    if not _ARRAY_ID.fullmatch(ident) or (colon and not key):
        raise UsageError(f"{name}={value}: expected job:<job-id> or job:<job-id>:<key>")
    return JobInput(job=ident, key=key or None)


def parse_parallel(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """`--parallel`: a part count >= 1 or `auto`."""
    if value is None or value == "auto":
        return value
    try:
        return common.check_parallel(int(value))
    except ValueError:
        raise click.BadParameter(f"{value!r}: a number of parts >= 1, or auto") from None


def parse_time(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """`--not-before`: unix seconds, or ISO 8601 (a time without an offset is UTC, as the
    API reads it)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: unix seconds or ISO 8601 (2026-12-02T08:00:00Z)"
        ) from None
    return when if when.utcoffset() is not None else when.replace(tzinfo=UTC)


def parse_tags(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    """`--tag k=v` (or `k:v`: a key has neither), repeatable; None when none is given."""
    tags: dict[str, str] = {}
    for value in values:
        cut = min((i for i in (value.find("="), value.find(":")) if i > 0), default=-1)
        if cut < 0:
            raise click.BadParameter(f"{value!r}: KEY=VALUE")
        key, text = value[:cut], value[cut + 1 :]
        if key in tags:
            raise click.BadParameter(f"{key!r} given twice")
        tags[key] = text
    return tags or None


# -- output ----------------------------------------------------------------------------------


def as_data(value: Any) -> Any:
    """A view as plain JSON data: pydantic models and dataclasses become dicts."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list | tuple):
        return [as_data(v) for v in value]
    return value


def _emit(value: Any, text: str | None = None) -> None:
    if _options().json:
        click.echo(json.dumps(as_data(value)))
    elif text is not None:
        click.echo(text)


def _show_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _describe_status(view: dict[str, Any]) -> str:
    parts = [view["id"], view.get("task", ""), view["status"]]
    progress = view.get("progress")
    if progress and view["status"] == "running":
        parts.append(f"{float(progress.get('fraction', 0)):.0%}")
    if view.get("parts"):
        parts.append(_parts_text(view["parts"]))
    if view["status"] == "queued" and (view.get("not_before") or 0) > time.time():
        at = datetime.fromtimestamp(view["not_before"], UTC)
        parts.append(f"not before {at:%Y-%m-%d %H:%M:%S} UTC")
    if view.get("priority"):
        parts.append(f"priority {view['priority']}")
    if progress and view["status"] == "running" and progress.get("note"):
        parts.append(progress["note"])
    text = "  ".join(str(p) for p in parts if p != "")
    if view.get("upstream_failed") and not view.get("error"):
        text += f"\nupstream job {view['upstream_failed']} did not succeed"
    if view.get("error"):
        text += f"\nerror: {view['error']}"
    elif view["status"] == "succeeded":
        result: Any = view.get("result")
        if common.is_array_ref(result):
            meta = result["array"]
            text += f"\nresult: array {meta['id']} {meta['dtype']} {tuple(meta['shape'])}"
        else:
            text += f"\nresult: {_show_value(result)}"
    return text


def _parts_text(parts: dict[str, Any]) -> str:
    """A parallel job's parts: `3/8 parts` (`, 1 failed`)."""
    text = f"{parts.get('done', 0)}/{parts.get('total', 0)} parts"
    return text + (f", {parts['failed']} failed" if parts.get("failed") else "")


def _file_size(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return None


# -- waiting ---------------------------------------------------------------------------------


def _wait(job: Job, timeout: float | None, no_progress: bool) -> dict[str, Any]:
    """Wait for the job: with a progress bar (live events) on a terminal, else long-polls."""
    bars = _bars(no_progress=no_progress)
    if not bars.enabled:
        return as_data(job.wait(timeout))
    deadline = common.Deadline(timeout)
    with bars.job(f"{job.task or 'job'} {job.id[:8]}") as bar:
        status: str = "queued"
        progress: dict[str, Any] = {}
        try:
            # A job view at each change of state, a progress report in between.
            for event in job.events(timeout=timeout):
                item = as_data(event)
                if "status" in item:
                    status, progress = item["status"], item.get("progress") or progress
                    if item.get("parts"):  # a parallel job: its parts beside its status
                        status = f"{item['status']} {_parts_text(item['parts'])}"
                else:
                    progress = item
                note = str(progress.get("note") or "")[:_NOTE_WIDTH]
                bar.update(status, {**progress, "note": note})
        except ForkliftError as exc:
            if isinstance(exc, NotFound | Timeout):
                raise
            # events unavailable (an older server, a proxy): fall back to long-polling
    view = as_data(job.view)
    if view.get("status") in common.FINAL and "result" in view:
        return dict(view)
    return as_data(job.wait(deadline.remaining()))


def _put_file(client: Client, path: Path, ttl: float | None = None) -> ArrayHandle:
    """Upload a file, with a bytes bar on a terminal."""
    with _bars().transfer(f"put {path.name}", _file_size(path)) as progress:
        return client.put_file(path, ttl, progress=progress)


def _save(client: Client, array_id: str, output: str, nbytes: int | None = None) -> None:
    """Download an array into a file, with a bytes bar on a terminal (sized once the
    response says how long it is)."""
    with _bars().transfer(f"get {array_id[:8]}", nbytes) as progress:
        client.save_array(array_id, output, progress=progress)


def _finish(client: Client, job: Job, view: dict[str, Any], output: str | None) -> int:
    """Print a final job view; the exit code."""
    status = view["status"]
    if status != "succeeded":
        _emit(view)
        click.echo(f"forklift: job {job.id} {status}: {view.get('error') or status}", err=True)
        return EXIT_JOB
    result: Any = view.get("result")
    if common.is_array_ref(result):
        meta = result["array"]
        if output:
            _save(client, meta["id"], output, meta.get("nbytes"))
            _note(f"saved array {meta['id']} to {output}")
        _emit(view, meta["id"])
    else:
        if output:
            _note("forklift: the result is not an array; -o ignored")
        _emit(view, _show_value(result))
    return EXIT_OK


# -- the command -----------------------------------------------------------------------------


@click.group(
    name="forklift",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 ok, 1 job failed/cancelled, 2 usage error or request refused,"
    " 3 not found, 4 server unavailable or other error.",
)
@click.version_option(_version(), "--version", prog_name="forklift", message="%(prog)s %(version)s")
@client_options(top=True)
def cli() -> None:
    """Submit CPU-heavy jobs to a forklift stack and move arrays in and out."""


def _waiting(f: F) -> F:
    f = click.option("--no-progress", is_flag=True, help="no progress bar on a terminal")(f)
    f = click.option("-o", "--output", help="save an array result to this .npy file")(f)
    f = click.option("--timeout", type=float, metavar="S", help="give up waiting after S s")(f)
    return f


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="API bind address")
@click.option("--port", type=int, default=8000, show_default=True, help="API port")
@click.option(
    "--workers",
    "--concurrency",
    "workers",
    type=int,
    help="worker processes (default FORKLIFT_WORKER_CONCURRENCY, else the cores)",
)
@click.option(
    "--redis-port",
    type=int,
    default=launcher.DEFAULT_REDIS_PORT,
    show_default=True,
    help="with REDIS_URL unset, use a Redis answering on 127.0.0.1:PORT, else start an "
    "embedded one on a free port",
)
@click.option(
    "--stop-timeout",
    type=float,
    default=20.0,
    show_default=True,
    help="seconds to let children stop after SIGTERM before killing them",
)
@click.option("--log-level", default="info", show_default=True, help="uvicorn and celery level")
@click.option(
    "--broker",
    metavar="URL",
    help="Celery broker, e.g. amqp://guest:guest@127.0.0.1:5672// (RabbitMQ); default "
    "FORKLIFT_BROKER_URL, else the Redis",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="settings file (default ./.env when there is one); the environment wins",
)
def up(
    host: str,
    port: int,
    workers: int | None,
    redis_port: int,
    stop_timeout: float,
    log_level: str,
    broker: str | None,
    env_file: Path | None,
) -> int:
    """Run the stack here: API, workers (and Redis).

    Runs the forklift API and a worker pool in the foreground (and an embedded Redis when
    REDIS_URL is unset and none answers locally). Ctrl-C stops everything. The client options
    given before `up` are accepted and ignored.
    """
    options = launcher.UpOptions(
        host, port, workers, redis_port, stop_timeout, log_level, env_file, broker
    )
    return launcher.run(options)


@cli.command()
@click.argument("task", shell_complete=_complete_task)
@click.argument("arguments", nargs=-1, metavar="[K=V]...")
@click.option("--wait", is_flag=True, help="wait for the job and print its result")
@click.option("--time-limit", type=float, metavar="S", help="lower the job's time limit")
@click.option(
    "--parallel",
    metavar="N|auto",
    callback=parse_parallel,
    help="run as N parts over the same arrays (a splittable task); auto: one per worker",
)
@click.option(
    "--priority",
    type=click.IntRange(0, MAX_PRIORITY),
    metavar="N",
    help=f"0..{MAX_PRIORITY}, higher runs first (default 0)",
)
@click.option(
    "--delay", type=click.FloatRange(0, MAX_DELAY_S), metavar="S", help="start in S seconds"
)
@click.option(
    "--not-before",
    callback=parse_time,
    metavar="TIME",
    help="start at TIME: ISO 8601 (UTC unless it has an offset) or unix seconds",
)
@click.option(
    "--retries",
    type=click.IntRange(0, MAX_RETRIES),
    metavar="N",
    help="retry a raising job at most N times (only lowers the task's own)",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    callback=parse_tags,
    metavar="K=V",
    help="a tag on the job (repeatable)",
)
@_waiting
@client_options(top=False)
def submit(
    task: str,
    arguments: tuple[str, ...],
    wait: bool,
    time_limit: float | None,
    parallel: int | str | None,
    priority: int | None,
    delay: float | None,
    not_before: datetime | float | None,
    retries: int | None,
    tags: dict[str, str] | None,
    timeout: float | None,
    output: str | None,
    no_progress: bool,
) -> int:
    """Submit a job; with --wait, wait for its result.

    Params as K=V (V is JSON if it parses, else a string); array inputs as K=<array-id>,
    K=@file.npy (uploaded for this job, freed when it ends) or K=job:<job-id> (that job's
    array result, K=job:<job-id>:<key> for one array of a dict result; it need not have
    finished). A delayed job (--delay, --not-before) is `queued` until its time.
    """
    try:  # refused before anything is sent
        queueing = common.Queueing(priority, delay, not_before, retries, tags)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with _client() as client:
        info = as_data(client.task(task))
        params, ids, files = parse_arguments(arguments, set(info.get("inputs") or {}))
        uploads: list[ArrayHandle] = []
        try:
            for name, path in files.items():
                handle = _put_file(client, path)
                uploads.append(handle)
                ids[name] = ArrayInput(array=handle.id)
            values: dict[str, Any] = {**params, **ids}
            job = client.submit_job(
                task,
                values,
                time_limit=time_limit,
                parallel=parallel,
                priority=queueing.priority,
                delay=queueing.delay,
                not_before=queueing.not_before,
                retries=queueing.retries,
                tags=queueing.tags,
            )
        finally:
            for handle in uploads:  # freed by the server when the job ends
                with contextlib.suppress(ForkliftError):
                    client.delete_array(handle)
        if not wait:
            _emit(job.view, job.id)
            return EXIT_OK
        return _finish(client, job, _wait(job, timeout, no_progress), output)


@cli.command("wait")
@click.argument("job_id")
@_waiting
@client_options(top=False)
def wait_command(job_id: str, timeout: float | None, output: str | None, no_progress: bool) -> int:
    """Wait for a job and print its result."""
    with _client() as client:
        job = client.job(job_id)
        job.task = as_data(job.status()).get("task")
        return _finish(client, job, _wait(job, timeout, no_progress), output)


@cli.command()
@click.argument("job_id")
@client_options(top=False)
def status(job_id: str) -> int:
    """Show a job's status and progress."""
    with _client() as client:
        view = as_data(client.job(job_id).status())
    _emit(view, _describe_status(view))
    return EXIT_OK


@cli.command()
@click.argument("job_ids", nargs=-1, metavar="[JOB_ID]...")
@click.option("--tag", "tags", multiple=True, callback=parse_tags, help="k=v (or k:v): all match")
@click.option("--task", help="only jobs of this task")
@click.option("--status", "statuses", multiple=True, help="only queued, waiting or running")
@client_options(top=False)
def cancel(
    job_ids: tuple[str, ...],
    tags: dict[str, str] | None,
    task: str | None,
    statuses: tuple[str, ...],
) -> int:
    """Cancel a queued or running job; several by id; or all yours matching --tag/--task."""
    by_filter = bool(tags or task or statuses)
    if by_filter == bool(job_ids):
        raise UsageError("give job ids or a filter (--tag, --task, --status), not both")
    if len(job_ids) == 1:
        return _cancel_one(job_ids[0])
    with _client() as client:
        if by_filter:
            reply = client.cancel_many(tag=tags, task=task, status=statuses or None)
        else:
            reply = client.cancel_many(list(job_ids))
    lines = [f"{job_id} cancelled" for job_id in reply.cancelled]
    lines += [f"{skip.id} {skip.status}: not cancelled" for skip in reply.skipped]
    lines.append(f"{len(reply.cancelled)} cancelled")
    if reply.more:
        lines.append("more match: run it again")
    _emit(reply, "\n".join(lines))
    return EXIT_OK


def _cancel_one(job_id: str) -> int:
    with _client() as client:
        job = client.job(job_id)
        cancelled = job.cancel()
        view = as_data(job.view if job.view is not None else job.status())
    if not cancelled:  # it had already ended: the request is refused, as the API's 409
        _emit(view)
        click.echo(f"forklift: error: job {job_id} has already {view['status']}", err=True)
        return EXIT_USAGE
    _emit(view, f"{view['id']} {view['status']}")
    return EXIT_OK


@cli.command()
@click.option("--status", "statuses", multiple=True, help="repeat, or comma-separate")
@click.option("--task", help="only jobs of this task")
@click.option("--tag", "tags", multiple=True, callback=parse_tags, help="k=v (or k:v): all match")
@click.option("--since", callback=parse_time, help="created at or after (unix s or ISO 8601)")
@click.option("--until", callback=parse_time, help="created at or before")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@client_options(top=False)
def jobs(
    statuses: tuple[str, ...],
    task: str | None,
    tags: dict[str, str] | None,
    since: float | datetime | None,
    until: float | datetime | None,
    limit: int,
) -> int:
    """List your jobs, newest first."""
    with _client() as client:
        found = as_data(
            list(
                client.jobs(
                    status=statuses or None,
                    task=task,
                    tag=tags,
                    since=since,
                    until=until,
                    limit=limit,
                    page_size=min(limit, 1000),
                )
            )
        )
    if _options().json:
        click.echo(json.dumps(found))
        return EXIT_OK
    width = max((len(view["task"]) for view in found), default=4)
    for view in found:
        tagged = " ".join(f"{k}={v}" for k, v in sorted((view.get("tags") or {}).items()))
        created = _when(view["created_at"])
        line = f"{view['id']}  {view['task']:<{width}}  {view['status']:<9}  {created}  {tagged}"
        click.echo(line.rstrip())
    return EXIT_OK


@cli.command("delete-job")
@click.argument("job_id")
@client_options(top=False)
def delete_job(job_id: str) -> int:
    """Remove a finished job's record and its result arrays."""
    with _client() as client:
        view = as_data(client.delete_job(job_id))
    _emit(view, f"{view['id']} deleted")
    return EXIT_OK


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--ttl", type=float, metavar="S", help="seconds to keep it (at most the server's)")
@click.option(
    "--shm",
    is_flag=True,
    help="register it through shared memory instead (same host as the stack only)",
)
@client_options(top=False)
def put(file: Path, ttl: float | None, shm: bool) -> int:
    """Upload a .npy file; prints the array id."""
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    with _client() as client:
        if shm:
            try:
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise UsageError(f"{file}: {exc}") from None
            handle = client.put_array(arr, ttl, shared_memory=True)
        else:
            handle = _put_file(client, file, ttl)
    _emit(handle, handle.id)
    return EXIT_OK


@cli.command()
@click.argument("array_id")
@click.option("-o", "--output", help="file to write (default <id>.npy; - for stdout)")
@client_options(top=False)
def get(array_id: str, output: str | None) -> int:
    """Download an array as .npy."""
    target = output or f"{array_id}.npy"
    with _client() as client:
        if target == "-":
            client.write_array(array_id, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return EXIT_OK
        _save(client, array_id, target)
    _emit({"id": array_id, "path": str(target)}, str(target))
    return EXIT_OK


@cli.command()
@click.argument("array_id")
@client_options(top=False)
def delete(array_id: str) -> int:
    """Delete an array."""
    with _client() as client:
        freed = client.delete_array(array_id)
    state = "deleted" if freed else "deleted when the jobs using it end"
    _emit({"id": array_id, "freed": freed}, f"{array_id} {state}")
    return EXIT_OK


@cli.command()
@click.argument("name", required=False, shell_complete=_complete_task)
@client_options(top=False)
def tasks(name: str | None) -> int:
    """List the tasks the stack runs (or describe one)."""
    with _client() as client:
        found = as_data([client.task(name)] if name else client.tasks())
    if _options().json:
        click.echo(json.dumps(found))
        return EXIT_OK
    width = max((len(t["name"]) for t in found), default=0)
    for task in found:
        doc = (task.get("doc") or "").strip().splitlines()
        click.echo(f"{task['name']:<{width}}  {doc[0] if doc else ''}")
        params = list((task.get("params_schema") or {}).get("properties", {}))
        inputs = list(task.get("inputs") or {})
        details = []
        if inputs:
            details.append("arrays: " + ", ".join(inputs))
        if params:
            details.append("params: " + ", ".join(params))
        if details:
            click.echo(f"{'':<{width}}  " + "; ".join(details))
    return EXIT_OK


def _when(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _describe_schedule(view: dict[str, Any]) -> str:
    rule = f"cron {view['cron']}" if view.get("cron") else f"every {view['every']:g} s"
    text = f"{view['id']} {view['task']} {rule} next {_when(view.get('next_run'))} UTC"
    text += f" runs {view['runs']}"
    if view.get("name"):
        text += f" ({view['name']})"
    if view.get("last_error"):
        text += f" last refused: {view['last_error']}"
    return text


@cli.command()
@click.argument("task", shell_complete=_complete_task)
@click.argument("arguments", nargs=-1, metavar="[K=V]...")
@click.option("--cron", metavar="EXPR", help="5 fields, UTC: 'minute hour day month weekday'")
@click.option("--every", type=float, metavar="S", help="run every S seconds (>= 1)")
@click.option("--name", default="", help="a name to recognise it by")
@click.option("--time-limit", type=float, metavar="S", help="lower each run's time limit")
@click.option(
    "--priority", type=click.IntRange(0, MAX_PRIORITY), metavar="N", help="each run's priority"
)
@click.option(
    "--retries", type=click.IntRange(0, MAX_RETRIES), metavar="N", help="lower each run's retries"
)
@click.option(
    "--tag", "tags", multiple=True, callback=parse_tags, metavar="K=V", help="a tag of each run"
)
@client_options(top=False)
def schedule(
    task: str,
    arguments: tuple[str, ...],
    cron: str | None,
    every: float | None,
    name: str,
    time_limit: float | None,
    priority: int | None,
    retries: int | None,
    tags: dict[str, str] | None,
) -> int:
    """Run a job periodically (--cron or --every); prints the schedule's id.

    Params as K=V, as for submit; array inputs only as K=<array-id> of an uploaded array,
    which must still exist at each run (upload it with a long enough --ttl). Each run is a
    job tagged schedule:<id>. Stop it with `forklift unschedule <id>`.
    """
    if (cron is None) == (every is None):
        raise UsageError("give exactly one of --cron and --every")
    with _client() as client:
        info = as_data(client.task(task))
        params, ids, files = parse_arguments(arguments, set(info.get("inputs") or {}))
        if files or any(isinstance(ref, JobInput) for ref in ids.values()):
            raise UsageError("a schedule's array inputs are ids of uploaded arrays")
        view = client.schedule(
            task,
            {**params, **ids},
            cron=cron,
            every=every,
            name=name,
            time_limit=time_limit,
            priority=priority,
            retries=retries,
            tags=tags,
        )
    data = as_data(view)
    _emit(data, _describe_schedule(data))
    return EXIT_OK


@cli.command()
@client_options(top=False)
def schedules() -> int:
    """List your schedules."""
    with _client() as client:
        found = as_data(client.schedules())
    if _options().json:
        click.echo(json.dumps(found))
        return EXIT_OK
    for view in found:
        click.echo(_describe_schedule(view))
    return EXIT_OK


@cli.command()
@click.argument("schedule_id")
@client_options(top=False)
def unschedule(schedule_id: str) -> int:
    """Delete a schedule (its past runs stay)."""
    with _client() as client:
        client.unschedule(schedule_id)
    _emit({"id": schedule_id, "deleted": True}, f"{schedule_id} deleted")
    return EXIT_OK


COMPLETE_VAR = "_FORKLIFT_COMPLETE"


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the shell completion script.

    \b
    bash:  eval "$(forklift completion bash)"    (or add it to ~/.bashrc)
    zsh:   eval "$(forklift completion zsh)"     (or add it to ~/.zshrc)
    fish:  forklift completion fish > ~/.config/fish/completions/forklift.fish

    Commands and options complete, and task names too, asked of the stack at --url.
    """
    complete = get_completion_class(shell)
    assert complete is not None  # click knows the three choices
    click.echo(complete(cli, {}, "forklift", COMPLETE_VAR).source())
    return EXIT_OK


#: The commands that talk to a stack (all but `up` and `completion`).
CLIENT_COMMANDS = tuple(sorted(set(cli.commands) - {"up", "completion"}))


def exit_code(exc: ForkliftError) -> int:
    if isinstance(exc, JobError):
        return EXIT_JOB
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, InvalidRequest):
        return EXIT_USAGE
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run the command, return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(
            args, prog_name="forklift", complete_var=COMPLETE_VAR, standalone_mode=False
        )
    except click.ClickException as exc:  # usage errors (2) and the like
        exc.show()
        return exc.exit_code
    except click.Abort:  # Ctrl-C
        click.echo("forklift: interrupted", err=True)
        return EXIT_INTERRUPTED
    except ForkliftError as exc:
        status_text = f" (HTTP {exc.status})" if exc.status else ""
        click.echo(f"forklift: error{status_text}: {exc.message}", err=True)
        return exit_code(exc)
    except OSError as exc:
        click.echo(f"forklift: error: {exc}", err=True)
        return EXIT_ERROR
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""The `forklift` command line: `forklift up` runs a stack; the rest move jobs and arrays.

    forklift submit fib n=30 --wait          forklift put data.npy          (prints the id)
    forklift submit sum a=@data.npy --wait   forklift get <array-id> -o out.npy
    forklift status <job-id>                 forklift cancel <job-id>
    forklift wait <job-id> -o out.npy        forklift tasks

Arguments `k=v` are params (v parsed as JSON when it is valid JSON, else taken as a string);
for a task's array inputs, `k=<array-id>` reuses an array and `k=@file.npy` uploads a file.
Exit codes: 0 ok, 1 job failed or cancelled, 2 usage error or request refused (4xx),
3 not found, 4 server unavailable or any other error (including a wait that timed out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from forklift import common
from forklift._sync.client import Client, Job
from forklift.errors import ForkliftError, InvalidRequest, JobError, NotFound, Timeout
from forklift.handles import ArrayHandle
from shared import launcher

EXIT_OK = 0
EXIT_JOB = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_ERROR = 4

RETRY_WINDOW_S = 10.0  # how long to retry through connection errors and 503s

_ARRAY_ID = re.compile(r"[0-9a-f]{1,64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


# -- parsing --------------------------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--url",
        default=default,
        help="the API (default: $FORKLIFT_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument("--api-key", default=default, help="API key (default: $FORKLIFT_API_KEY)")
    parser.add_argument(
        "--retry-for",
        type=float,
        default=RETRY_WINDOW_S if top else argparse.SUPPRESS,
        metavar="S",
        help=f"retry through connection errors and 503s for S seconds (default {RETRY_WINDOW_S:g})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="machine-readable output on stdout",
    )


def _version() -> str:
    try:
        return metadata.version("forklift")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forklift",
        description="Submit CPU-heavy jobs to a forklift stack and move arrays in and out.",
        epilog="exit codes: 0 ok, 1 job failed/cancelled, 2 usage error or request refused,"
        " 3 not found, 4 server unavailable or other error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # `up` runs the stack rather than talking to one: the client options are accepted before it
    # (they are global) and ignored.
    p = sub.add_parser(
        "up", help="run the stack here: API, workers (and Redis)", description=launcher.DESCRIPTION
    )
    launcher.add_arguments(p)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common_options(p, top=False)
        return p

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--timeout", type=float, help="give up waiting after S seconds")
        p.add_argument("-o", "--output", help="save an array result to this .npy file")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")

    p = command("submit", "submit a job; with --wait, wait for its result")
    p.add_argument("task", help="task name (see `forklift tasks`)")
    p.add_argument(
        "arguments",
        nargs="*",
        metavar="k=v",
        help="params as k=v (v is JSON if it parses, else a string); array inputs as"
        " k=<array-id> or k=@file.npy",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--time-limit", type=float, help="lower the job's time limit (seconds)")
    waiting(p)

    p = command("wait", "wait for a job and print its result")
    p.add_argument("job_id")
    waiting(p)

    p = command("status", "show a job's status and progress")
    p.add_argument("job_id")

    p = command("cancel", "cancel a queued or running job")
    p.add_argument("job_id")

    p = command("put", "upload a .npy file; prints the array id")
    p.add_argument("file", help=".npy file")
    p.add_argument("--ttl", type=float, help="seconds to keep it (at most the server's)")
    p.add_argument(
        "--shm",
        action="store_true",
        help="register it through shared memory instead (same host as the stack only)",
    )

    p = command("get", "download an array as .npy")
    p.add_argument("array_id")
    p.add_argument("-o", "--output", help="file to write (default <id>.npy; - for stdout)")

    p = command("delete", "delete an array")
    p.add_argument("array_id")

    p = command("tasks", "list the tasks the stack runs")
    p.add_argument("name", nargs="?", help="describe one task")
    return parser


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true, null, lists...), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_arguments(
    pairs: Sequence[str], input_names: set[str]
) -> tuple[dict[str, Any], dict[str, str], dict[str, Path]]:
    """(params, array ids, files to upload) from `k=v` words."""
    params: dict[str, Any] = {}
    ids: dict[str, str] = {}
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
                ids[key] = value
            else:
                raise UsageError(f"{key} is an array input: give an array id or @file.npy")
        elif value.startswith("@") and value.endswith(".npy"):
            raise UsageError(f"{key} is not an array input of this task")
        else:
            params[key] = parse_value(value)
    return params, ids, files


# -- output ---------------------------------------------------------------------------------


class ProgressBar:
    """One line on a terminal: `[#####-----]  50%  note  running 3.2 s`, redrawn in place."""

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self.start = time.monotonic()
        self._shown = 0

    def update(self, status: str, progress: dict[str, Any] | None) -> None:
        fraction = float((progress or {}).get("fraction") or 0.0)
        if status == "succeeded":
            fraction = 1.0
        filled = round(max(0.0, min(1.0, fraction)) * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        note = str((progress or {}).get("note") or "")[:40]
        elapsed = time.monotonic() - self.start
        line = f"{self.label} [{bar}] {fraction:4.0%} {status} {elapsed:5.1f}s {note}".rstrip()
        self.stream.write("\r" + line.ljust(self._shown))
        self.stream.flush()
        self._shown = len(line)

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


def _emit(args: argparse.Namespace, value: Any, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(value))
    elif text is not None:
        print(text)


def _show_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _describe_status(view: dict[str, Any]) -> str:
    parts = [view["id"], view.get("task", ""), view["status"]]
    progress = view.get("progress")
    if progress and view["status"] == "running":
        parts.append(f"{float(progress.get('fraction', 0)):.0%}")
        if progress.get("note"):
            parts.append(progress["note"])
    text = "  ".join(str(p) for p in parts if p != "")
    if view.get("error"):
        text += f"\nerror: {view['error']}"
    elif view["status"] == "succeeded":
        result = view.get("result")
        if common.is_array_ref(result):
            meta = result["array"]
            text += f"\nresult: array {meta['id']} {meta['dtype']} {tuple(meta['shape'])}"
        else:
            text += f"\nresult: {_show_value(result)}"
    return text


# -- commands -------------------------------------------------------------------------------


def _wait(client: Client, job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Wait for the job: with a progress bar (live events) on a terminal, else long-polls."""
    if args.no_progress or not sys.stderr.isatty():
        return job.wait(args.timeout)
    bar = ProgressBar(sys.stderr, f"{job.task or 'job'} {job.id[:8]}")
    deadline = common.Deadline(args.timeout)
    try:
        for event in job.events(timeout=args.timeout):
            bar.update(event["status"], event.get("progress"))
    except ForkliftError as exc:
        if isinstance(exc, (NotFound, Timeout)):
            raise
        # events unavailable (an older server, a proxy): fall back to long-polling
    finally:
        bar.close()
    if job.view.get("status") in common.FINAL and "result" in job.view:
        return job.view
    return job.wait(deadline.remaining())


def _finish(client: Client, job: Job, view: dict[str, Any], args: argparse.Namespace) -> int:
    """Print a final job view; the exit code."""
    status = view["status"]
    if status != "succeeded":
        _emit(args, view)
        print(f"forklift: job {job.id} {status}: {view.get('error') or status}", file=sys.stderr)
        return EXIT_JOB
    result = view.get("result")
    if common.is_array_ref(result):
        meta = result["array"]
        if args.output:
            client.save_array(meta["id"], args.output)
            print(f"saved array {meta['id']} to {args.output}", file=sys.stderr)
        _emit(args, view, meta["id"])
    else:
        if args.output:
            print("forklift: the result is not an array; -o ignored", file=sys.stderr)
        _emit(args, view, _show_value(result))
    return EXIT_OK


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    info = client.task(args.task)
    params, ids, files = parse_arguments(args.arguments, set(info.get("inputs", {})))
    uploads: list[ArrayHandle] = []
    try:
        for name, path in files.items():
            handle = client.put_file(path)
            uploads.append(handle)
            ids[name] = handle.id
        arguments: dict[str, Any] = {**params}
        for name, ident in ids.items():
            arguments[name] = ArrayHandle(id=ident, shape=(), dtype="")
        job = client.submit_job(args.task, arguments, time_limit=args.time_limit)
    finally:
        for handle in uploads:  # freed by the server when the job ends
            with contextlib.suppress(ForkliftError):
                client.delete_array(handle)
    if not args.wait:
        _emit(args, job.view, job.id)
        return EXIT_OK
    return _finish(client, job, _wait(client, job, args), args)


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.job_id)
    job.task = job.status().get("task")
    return _finish(client, job, _wait(client, job, args), args)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    view = client.job(args.job_id).status()
    _emit(args, view, _describe_status(view))
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    view = client.job(args.job_id).cancel()
    _emit(args, view, f"{view['id']} {view['status']}")
    return EXIT_OK


def cmd_put(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if args.shm:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
        handle = client.put_array(arr, args.ttl, shared_memory=True)
    else:
        handle = client.put_file(path, args.ttl)
    _emit(args, dataclasses.asdict(handle), handle.id)
    return EXIT_OK


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    output = args.output or f"{args.array_id}.npy"
    if output == "-":
        client.write_array(args.array_id, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return EXIT_OK
    client.save_array(args.array_id, output)
    _emit(args, {"id": args.array_id, "path": str(output)}, str(output))
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    freed = client.delete_array(args.array_id)
    state = "deleted" if freed else "deleted when the jobs using it end"
    _emit(args, {"id": args.array_id, "freed": freed}, f"{args.array_id} {state}")
    return EXIT_OK


def cmd_tasks(client: Client, args: argparse.Namespace) -> int:
    tasks = [client.task(args.name)] if args.name else client.tasks()
    if args.json:
        print(json.dumps(tasks))
        return EXIT_OK
    width = max((len(t["name"]) for t in tasks), default=0)
    for task in tasks:
        doc = (task.get("doc") or "").strip().splitlines()
        print(f"{task['name']:<{width}}  {doc[0] if doc else ''}")
        params = list((task.get("params_schema") or {}).get("properties", {}))
        inputs = list(task.get("inputs") or {})
        details = []
        if inputs:
            details.append("arrays: " + ", ".join(inputs))
        if params:
            details.append("params: " + ", ".join(params))
        if details:
            print(f"{'':<{width}}  " + "; ".join(details))
    return EXIT_OK


COMMANDS = {
    "submit": cmd_submit,
    "wait": cmd_wait,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "put": cmd_put,
    "get": cmd_get,
    "delete": cmd_delete,
    "tasks": cmd_tasks,
}


def exit_code(exc: ForkliftError) -> int:
    if isinstance(exc, JobError):
        return EXIT_JOB
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, InvalidRequest):
        return EXIT_USAGE
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "up":
        return launcher.run(args)
    url = args.url or os.environ.get("FORKLIFT_URL") or common.DEFAULT_URL
    api_key = args.api_key or os.environ.get("FORKLIFT_API_KEY") or None
    try:
        with Client(url, api_key, retry_window=args.retry_for) as client:
            return COMMANDS[args.command](client, args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"forklift: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ForkliftError as exc:
        status = f" (HTTP {exc.status})" if exc.status else ""
        print(f"forklift: error{status}: {exc.message}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("forklift: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"forklift: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

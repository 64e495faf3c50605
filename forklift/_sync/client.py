"""The blocking client: `Client`, `Job`, `as_completed`.

GENERATED from forklift/_async/client.py by `python -m forklift._unasync`: do not edit this
file. Edit the async client (its docstring says how the two differ), then run that command
again; `--check` (and tests/unit/test_client_generated.py) tells whether this file is current.

    with Client() as fl:                           # FORKLIFT_URL, FORKLIFT_API_KEY
        job = fl.submit("matmul", a=x, b=y)        # returns once submitted
        c = job.result(timeout=60)                 # long-polls; an ndarray or a JSON value
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import InvalidStateError
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
from pydantic import ValidationError

from forklift import common
from forklift._concurrency import (
    Pending,
    Watcher,
    offload,
    sleep,
    watch,
)
from forklift.common import Backoff, Deadline, Parallel, Queueing, worth_retrying
from forklift.errors import (
    ForkliftError,
    InvalidRequest,
    JobCancelled,
    JobError,
    JobFailed,
    NotFound,
    ServerError,
    Unavailable,
    error_from_response,
)
from forklift.handles import ArrayHandle, JobOutput, array_id
from forklift.npy_stream import (
    CHUNK,
    NPY,
    ByteProgress,
    NpyReader,
    counted,
    file_chunks,
    npy_chunks,
    npy_length,
)
from forklift.same_host import (
    RecycledSegmentUnavailable,
    discard_segment,
    fill_segment,
    local_domain,
    registration,
)
from forklift.sse import SseParser, event_item
from shared.arrays import mappings
from shared.arrays.segments import ShmFullError
from shared.schemas import (
    ArrayInput,
    CancelReply,
    Health,
    HealthDown,
    JobBatchView,
    JobInput,
    JobList,
    JobStatus,
    JobView,
    Progress,
    ScheduleList,
    ScheduleView,
    ShmInfo,
    TaskInfo,
)

log = logging.getLogger("forklift")

ArrayOrId = ArrayHandle | ArrayInput | str  # an array by handle, by `{"array": id}` or by id


class Job:
    """A job on the server, followed as a `concurrent.futures.Future` follows a call.

    `result()` waits for it and gives its value, `events()` follows it live, `view` is the
    `JobView` last seen (None before the first answer).
    """

    def __init__(
        self,
        client: Client,
        job_id: str | None = None,
        *,
        task: str | None = None,
        view: JobView | None = None,
        submission: Pending[JobView] | None = None,
    ) -> None:
        self.client = client
        self.task = task or (view.task if view else None)
        self._id = job_id or (view.id if view else None)
        self._view = view
        self._submission = submission
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Job], object]] = []
        self._called_back = False
        self._watcher: Watcher | None = None

    def __repr__(self) -> str:
        status = self._view.status.value if self._view else "?"
        return f"<Job {self._id or '(submitting)'} {self.task} {status}>"

    @property
    def id(self) -> str:
        """The job's id, known once its submission is through."""
        self._take_submission()
        if self._id is None:
            raise InvalidStateError(f"the {self.task} job has no id until it is submitted")
        return self._id

    @property
    def view(self) -> JobView | None:
        self._take_submission()
        return self._view

    def _take_submission(self) -> None:
        if self._submission is not None and (view := self._submission.peek()) is not None:
            self._seen(view)
            self._submission = None

    def _seen(self, view: JobView) -> None:
        self._view, self._id = view, view.id
        self.task = self.task or view.task

    def _submitted(self) -> str:
        """The job's id once its submission is through; the submission's error if it failed."""
        if self._submission is not None:
            self._seen(self._submission.get())
            self._submission = None
        return self.id

    def output(self, key: str) -> JobOutput:
        """The array `key` of this job's dict result, as an input of another job:
        `fl.submit("histogram", a=job.output("counts"))`. The job itself, passed as an input,
        stands for its one array result; neither needs it to have finished."""
        return JobOutput(self, key)

    def status(self) -> JobView:
        """The job as the server sees it now (status, progress, timings, error, result)."""
        job_id = self._submitted()
        view = JobView.model_validate(self.client._get_json(f"/jobs/{job_id}", retry=True))
        self._seen(view)
        return view

    def _latest(self) -> JobView:
        """The final view if it is known already (it never changes again), else `status()`."""
        view = self.view
        return view if common.is_final(view) and view is not None else self.status()

    def done(self) -> bool:
        """True once the job has ended: succeeded, failed or cancelled."""
        view = self._latest()
        return view.status.is_final

    def running(self) -> bool:
        view = self._latest()
        return view.status == JobStatus.running

    def cancelled(self) -> bool:
        view = self._latest()
        return view.status == JobStatus.cancelled

    def wait(self, timeout: float | None = None) -> JobView:
        """Until the job ends; its final view (no exception for failed jobs).

        Long-polls `GET /jobs/{id}?wait=S`, retrying with backoff through connection errors
        and 503s. Raises `Timeout` when `timeout` seconds pass first.
        """
        job_id = self._submitted()
        deadline = Deadline(timeout)
        view = self.view
        while view is None or not view.status.is_final:
            wait = deadline.poll()
            view = JobView.model_validate(
                self.client._get_json(
                    f"/jobs/{job_id}",
                    params={"wait": round(wait, 3)},
                    timeout=self.client.timeout + wait,
                    retry=True,
                    deadline=deadline,
                )
            )
            self._seen(view)
            if not view.status.is_final and deadline.expired():
                raise deadline.timeout_error(f"job {job_id}")
        return view

    def result(self, timeout: float | None = None, *, download: bool = True) -> Any:
        """Wait, then the job's JSON value, or an ndarray for an array result.

        Raises `JobFailed` (with the server's error text), `JobCancelled` or `Timeout`.
        With `download=False`, array results come back as `ArrayHandle`s to pass on.
        """
        view = self.wait(timeout)
        error = common.outcome_error(view)
        if error is not None:
            raise error
        return self.client._materialize(view, download)

    def exception(self, timeout: float | None = None) -> JobFailed | None:
        """Wait, then the job's `JobFailed` if it failed, None if it succeeded; a cancelled
        job raises `JobCancelled`, as `Future.exception` raises `CancelledError`."""
        error = common.outcome_error(self.wait(timeout))
        if isinstance(error, JobCancelled):
            raise error
        return error

    def cancel(self) -> bool:
        """Cancel the job, a running one interrupted: True if it is now cancelled, False if
        it had already succeeded or failed (or is a part: its parallel job cancels it).
        Through `POST /jobs/cancel`, which never removes a finished job's record as
        `DELETE /jobs/{id}` does."""
        job_id = self._submitted()
        reply = self.client.cancel_many([job_id])
        if reply.skipped and reply.skipped[0].status == "not_found":
            raise NotFound(f"no job with id '{job_id}'", code="job_not_found", status=404)
        view = self.status()
        return view.status == JobStatus.cancelled

    def delete(self) -> JobView:
        """Remove a finished job's record and its result arrays (one another job still uses
        is freed when that job ends); returns the view it had. `InvalidRequest` if the job
        has not finished (`cancel()` it first) or is still stopping."""
        job_id = self._submitted()
        view = self.status()
        if not view.status.is_final:
            raise InvalidRequest(
                f"job {job_id} is {view.status.value}: cancel it, then delete it",
                code="job_not_finished",
                status=409,
            )
        response = self.client._request("DELETE", f"/jobs/{job_id}")
        for meta in common.array_metas(view.result):
            self.client._owned.pop(str(meta["id"]), None)
        return JobView.model_validate(response.json())

    def add_done_callback(self, fn: Callable[[Job], object]) -> None:
        """Call `fn(job)` once the job has ended, as `Future.add_done_callback` does: at once,
        before this returns, if it is known to have ended (its last view is final), else
        from a watcher that long-polls the job: a daemon thread in the blocking client, a
        task on the running loop in the asyncio one, which then needs that loop (outside
        one it raises RuntimeError and adds nothing; callbacks not yet called when the
        loop closes are never called). If the waiting itself fails (the server stays
        away), `fn` is called all the same and `result()` raises why. Exceptions raised by
        `fn` are logged and ignored."""
        with self._lock:
            now = self._called_back or common.is_final(self.view)
            if not now:
                if self._watcher is None:  # first: a watcher that cannot start adds nothing
                    self._watcher = watch(self.wait, self._run_callbacks)
                self._callbacks.append(fn)
        if now:
            self._call(fn)

    def _run_callbacks(self) -> None:
        with self._lock:
            callbacks, self._callbacks, self._called_back = self._callbacks, [], True
        for fn in callbacks:
            self._call(fn)

    def _call(self, fn: Callable[[Job], object]) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("the done callback of %r raised", self)

    def events(self, timeout: float | None = None) -> Iterator[JobView | Progress]:
        """Live state and progress: a `JobView` for each change of state (the first is the
        current one, the last the final one) and a `Progress` for each progress report.
        Reconnects after connection errors (the current state is then sent again)."""
        job_id = self._submitted()
        deadline = Deadline(timeout)
        backoff = Backoff(self.client.retry_window)
        http_timeout = httpx.Timeout(self.client.timeout, read=common.SSE_READ_S)
        while True:
            try:
                with self.client._http.stream(
                    "GET", f"/jobs/{job_id}/events", timeout=http_timeout
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        sleep(backoff.after_error_response(response, deadline))
                        continue
                    parser = SseParser()
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if event is None:
                            if deadline.expired():
                                raise deadline.timeout_error(f"job {job_id}")
                            continue
                        backoff.reset()
                        item = event_item(event.event, event.data)
                        if item is None:
                            continue
                        if isinstance(item, JobView):
                            self._seen(item)
                        yield item
                        if isinstance(item, JobView) and item.status.is_final:
                            return
                        if deadline.expired():
                            raise deadline.timeout_error(f"job {job_id}")
            except httpx.TransportError as exc:
                sleep(backoff.next_delay(f"event stream lost: {exc}", deadline))


def as_completed(jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
    """The jobs as they end, like `concurrent.futures.as_completed`: first those known to
    have ended, then each as `POST /jobs/wait` with `any` reports it. Raises `Timeout` (a
    TimeoutError) when `timeout` seconds pass first. The jobs come from one client; past
    the first `common.BATCH` (long-polled), the rest are looked at between the polls."""
    deadline = Deadline(timeout)
    pending: dict[str, Job] = {}
    for job in jobs:
        pending.setdefault(job._submitted(), job)
    clients = {id(job.client) for job in pending.values()}
    if len(clients) > 1:
        raise ValueError("as_completed: the jobs come from more than one client")
    for job_id, job in list(pending.items()):
        if common.is_final(job.view):
            del pending[job_id]
            yield job
    while pending:
        client = next(iter(pending.values())).client
        ids = list(pending)
        views: list[JobView] = []
        for later in common.chunks(ids[common.BATCH :]):
            views += client._wait_views(later, 0, any_ended=True)
        if not any(view.status.is_final for view in views):
            views += client._wait_views(
                ids[: common.BATCH], deadline.poll(), any_ended=True, deadline=deadline
            )
        for view in views:
            job = pending[view.id]
            job._seen(view)
            if view.status.is_final:
                del pending[view.id]
                yield job
        if pending and deadline.expired():
            raise deadline.timeout_error(f"{len(pending)} job(s)")


class Batch:
    """Jobs sent together, in one `POST /jobs/batch` (per 500), when the `with` block ends.

        with fl.batch() as batch:
            normal = batch.submit("normalize", a=x)
            spectrum = batch.submit("fft", a=normal)        # sent as {"job": "#0"}
            counts = batch.submit("histogram", a=spectrum, bins=64)
        print(counts.result())

    `submit` and `submit_job` take what the client's take and return the job's handle at
    once; it has its id once the block has ended (the batch sent). A job of the batch passed
    as an input of a later one is named by its place in the batch, so the whole pipeline is
    one request and no array crosses HTTP between its steps. Arrays are uploaded when the
    batch is sent (each ndarray object once); nothing is sent if the block raises. A refused
    batch raises when the block ends, and the jobs of its chunks already accepted are
    cancelled. `fl.map` is a batch of one task.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.jobs: list[Job] = []
        self._entries: list[tuple[str, Mapping[str, Any], float | None, Parallel, Queueing]] = []
        self._sent = False

    def submit(
        self,
        task: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        parallel: Parallel = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        not_before: datetime | float | None = None,
        retries: int | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Job:
        return self.submit_job(
            task,
            {**(arguments or {}), **kwargs},
            parallel=parallel,
            priority=priority,
            delay=delay,
            not_before=not_before,
            retries=retries,
            tags=tags,
        )

    def submit_job(
        self,
        task: str,
        arguments: Mapping[str, Any],
        *,
        time_limit: float | None = None,
        parallel: Parallel = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        not_before: datetime | float | None = None,
        retries: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Job:
        queueing = Queueing(priority, delay, not_before, retries, tags)
        return self._add(task, arguments, time_limit, parallel, queueing)

    def _add(
        self,
        task: str,
        arguments: Mapping[str, Any],
        time_limit: float | None,
        parallel: Parallel,
        queueing: Queueing,
    ) -> Job:
        if self._sent:
            raise InvalidStateError("this batch has been sent: submit to a new one")
        common.check_parallel(parallel)
        job = Job(self.client, task=task)
        self.jobs.append(job)
        self._entries.append((task, dict(arguments), time_limit, parallel, queueing))
        return job

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self._send()
        self._sent = True

    def _send(self) -> None:
        """Each chunk's bodies (a job of the same chunk as `#<index>`, of an earlier one by
        its id), then its request; on any failure the accepted jobs are cancelled."""
        self._sent = True
        client = self.client
        temps: list[str] = []
        uploaded: dict[int, tuple[np.ndarray, str]] = {}
        accepted: list[Job] = []
        try:
            for start in range(0, len(self.jobs), common.BATCH):
                jobs = self.jobs[start : start + common.BATCH]
                refs = {id(job): f"#{index}" for index, job in enumerate(jobs)}
                bodies = [
                    client._body(task, args, limit, parallel, uploaded, temps, refs, queue)
                    for task, args, limit, parallel, queue in self._entries[
                        start : start + len(jobs)
                    ]
                ]
                response = client._request(
                    "POST",
                    "/jobs/batch",
                    content=common.encode_json({"jobs": bodies}),
                    headers=common.idempotent_json_headers(uuid.uuid4().hex),
                    retry=True,  # safe: the key makes a resent request the same jobs
                )
                views = JobBatchView.model_validate(response.json()).jobs
                for job, view in zip(jobs, views, strict=True):
                    job._seen(view)
                    accepted.append(job)
        except BaseException:
            for chunk in common.chunks([job.id for job in accepted]):
                with contextlib.suppress(ForkliftError, httpx.HTTPError):
                    client.cancel_many(chunk)
            raise
        finally:
            client._release(temps)


class Client:
    """A forklift client on httpx: arrays in and out, jobs submitted and awaited.

    `url`: the API (else `FORKLIFT_URL`, else http://127.0.0.1:8000); `api_key`: one of the
    stack's FORKLIFT_API_KEYS, sent as a Bearer token (else `FORKLIFT_API_KEY`);
    `timeout`: seconds for one ordinary request (long-polls add their wait);
    `free_on_close`: when the client closes (or its `with` block ends), delete every array
    it uploaded with `put_array` and every array result it fetched;
    `shared_memory`: True registers arrays through shared memory (same host only), False
    always uploads over HTTP, None (default) registers arrays of 1 MiB or more when the
    server is in this process's shm domain;
    `retry_window`: how long idempotent calls retry through connection errors, 503s and
    429s with Retry-After (a per-key limit of the server; past the window, raised as is).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        free_on_close: bool = False,
        shared_memory: bool | None = None,
        retry_window: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = common.resolve_url(url)
        self.timeout = timeout
        self.free_on_close = free_on_close
        self.shared_memory = shared_memory
        self.retry_window = retry_window
        self._http = httpx.Client(
            base_url=self.url,
            headers=common.headers_for(common.resolve_api_key(api_key)),
            timeout=timeout,
            transport=transport,
        )
        self._owned: dict[str, None] = {}
        self._shm_info: ShmInfo | None = None
        self._shm_checked = False

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; with `free_on_close`, delete the arrays this client made."""
        try:
            if self.free_on_close:
                for ident in list(self._owned):
                    with contextlib.suppress(ForkliftError, httpx.HTTPError):
                        self.delete_array(ident)
        finally:
            self._owned.clear()
            self._http.close()
            mappings.sweep()  # kept mappings of segments freed meanwhile (submit's inputs)

    @property
    def owned_arrays(self) -> list[str]:
        """Ids of the arrays this client uploaded or fetched as results and still holds."""
        return list(self._owned)

    # -- HTTP -----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool = False,
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One call; idempotent ones (`retry`) go on through connection errors, 503s and
        429s with Retry-After (a per-key limit)."""
        deadline = deadline or Deadline(None)
        backoff = Backoff(self.retry_window)
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                reason = f"cannot reach {self.url}: {type(exc).__name__}: {exc}"
                if not retry:
                    raise Unavailable(reason, code="unreachable") from exc
                sleep(backoff.next_delay(reason, deadline))
                continue
            if retry and worth_retrying(response):  # 503, or 429 with Retry-After
                sleep(backoff.after_error_response(response, deadline))
                continue
            if response.status_code >= 400:
                raise error_from_response(response.status_code, response.content, response.headers)
            return response

    def _get_json(self, path: str, **kwargs: Any) -> Any:
        response = self._request("GET", path, **kwargs)
        return response.json()

    def _stream_to(
        self, path: str, sink: Callable[[bytes], object], progress: ByteProgress | None = None
    ) -> httpx.Headers:
        """GET `path` and feed each body chunk to `sink`; retried until the body starts.
        `progress(done, total)` after each chunk (total: the Content-Length, if sent)."""
        deadline = Deadline(None)
        backoff = Backoff(self.retry_window)
        while True:
            try:
                with self._http.stream("GET", path) as response:
                    if response.status_code >= 400:
                        response.read()
                        sleep(backoff.after_error_response(response, deadline))
                        continue
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    done = 0
                    for chunk in response.iter_raw(CHUNK):
                        sink(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                    return response.headers
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                reason = f"cannot reach {self.url}: {exc}"
                sleep(backoff.next_delay(reason, deadline))
            except httpx.TransportError as exc:
                raise Unavailable(f"download of {path} broke off: {exc}") from exc

    def _download(self, path: str, progress: ByteProgress | None = None) -> np.ndarray:
        reader = NpyReader()
        self._stream_to(path, reader.feed, progress)
        return reader.finish()

    # -- arrays ---------------------------------------------------------------------------

    def put_array(
        self,
        arr: Any,
        ttl: float | None = None,
        *,
        shared_memory: bool | None = None,
        progress: ByteProgress | None = None,
    ) -> ArrayHandle:
        """Store an array on the server; its handle (pass it to `submit`, or `get_array`).

        Over HTTP the `.npy` encoding is streamed from the array's own buffer (no encoded
        copy). Through shared memory (same host) the array is copied once into a segment
        this process creates and the API adopts. `ttl`: seconds (at most the server's).
        `progress(done, total)` is called as the bytes of an HTTP upload go out.
        """
        arr = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
        npy_length(arr)  # refuses unsupported dtypes before any I/O
        mode = self.shared_memory if shared_memory is None else shared_memory
        if mode is True or (mode is None and arr.nbytes >= common.SHM_THRESHOLD):
            info = self._same_domain_info(required=mode is True)
            if info is not None:
                try:
                    handle = self._register(arr, ttl, info)
                except (InvalidRequest, NotFound, OSError):
                    if mode is True:
                        raise
                else:
                    return handle
        return self._upload(arr, ttl, progress)

    def _upload(
        self, arr: np.ndarray, ttl: float | None, progress: ByteProgress | None = None
    ) -> ArrayHandle:
        length = npy_length(arr)
        response = self._request(
            "POST",
            "/arrays",
            params={"ttl": ttl} if ttl else None,
            content=counted(npy_chunks(arr), length, progress),
            headers={"Content-Type": NPY, "Content-Length": str(length)},
        )
        return self._track(ArrayHandle.from_meta(response.json()))

    def put_file(
        self,
        path: str | os.PathLike[str],
        ttl: float | None = None,
        *,
        progress: ByteProgress | None = None,
    ) -> ArrayHandle:
        """Upload a `.npy` file as it is on disk (streamed; the server checks it);
        `progress(done, total)` as its bytes go out."""
        size = Path(path).stat().st_size
        response = self._request(
            "POST",
            "/arrays",
            params={"ttl": ttl} if ttl else None,
            content=counted(file_chunks(path), size, progress),
            headers={"Content-Type": NPY, "Content-Length": str(size)},
        )
        return self._track(ArrayHandle.from_meta(response.json()))

    def shm_info(self) -> ShmInfo | None:
        """The server's same-host registration settings (its `shm_prefix`, `shm_domain`),
        or None if it has no such route; asked once per client."""
        if not self._shm_checked:
            try:
                info = self._get_json("/arrays/register/info", retry=True)
                self._shm_info = ShmInfo.model_validate(info)
            except NotFound:
                self._shm_info = None
            self._shm_checked = True
        return self._shm_info

    def _same_domain_info(self, *, required: bool) -> ShmInfo | None:
        info = self.shm_info()
        if info is None:
            if required:
                raise InvalidRequest("this server does not accept shared-memory registrations")
            return None
        if info.shm_domain != local_domain() and not required:
            return None
        return info  # required and another domain: the server refuses it with its reason

    def _register(self, arr: np.ndarray, ttl: float | None, info: ShmInfo) -> ArrayHandle:
        """Reserve, fill, commit; a recycled segment this process cannot open: once more, fresh."""
        offload(mappings.sweep)  # kept mappings of segments freed since the last put
        handle = self._register_once(arr, ttl, info, recycle=True)
        if handle is None:
            handle = self._register_once(arr, ttl, info, recycle=False)
            assert handle is not None
        return handle

    def _register_once(
        self, arr: np.ndarray, ttl: float | None, info: ShmInfo, *, recycle: bool
    ) -> ArrayHandle | None:
        name, ident, body = registration(arr, ttl, info.shm_prefix, recycle=recycle)
        reservation = self._request(
            "POST",
            "/arrays/register",
            content=common.encode_json(body),
            headers=common.JSON_HEADERS,
        )
        recycled = bool(reservation.json().get("created"))
        try:
            offload(fill_segment, name, arr, recycled=recycled)
            response = self._request("POST", f"/arrays/register/{ident}/commit")
        except RecycledSegmentUnavailable:
            self._abandon_registration(name, ident, recycled=True)
            return None
        except ShmFullError as exc:
            self._abandon_registration(name, ident, recycled=recycled)
            raise ServerError(str(exc), code="shm_full", status=507) from None
        except BaseException:
            self._abandon_registration(name, ident, recycled=recycled)
            raise
        return self._track(ArrayHandle.from_meta(response.json()))

    def _abandon_registration(self, name: str, ident: str, *, recycled: bool) -> None:
        """DELETE the reservation; a segment made here is unlinked here too.

        A recycled one is the API's to put back into its pool, unless the API cannot be
        reached: then it is unlinked here rather than left for an hour.
        """
        if not recycled:
            discard_segment(name)
        try:
            self._request("DELETE", f"/arrays/register/{ident}")
        except (ForkliftError, httpx.HTTPError):
            discard_segment(name)

    def _track(self, handle: ArrayHandle) -> ArrayHandle:
        self._owned[handle.id] = None
        return handle

    def get_array(self, ref: ArrayOrId, *, progress: ByteProgress | None = None) -> np.ndarray:
        """Download an array (streamed into one freshly allocated ndarray); `progress(done,
        total)` as its bytes arrive."""
        return self._download(f"/arrays/{array_id(ref)}", progress)

    def save_array(
        self,
        ref: ArrayOrId,
        path: str | os.PathLike[str],
        *,
        progress: ByteProgress | None = None,
    ) -> Path:
        """Download an array's `.npy` bytes straight into a file (bit-exact, any size);
        `progress(done, total)` as they arrive."""
        target = Path(path)
        if target.exists() and not target.is_file():  # /dev/null, a pipe: write as it is
            with target.open("wb") as f:
                self.write_array(ref, f, progress=progress)
            return target
        # a partial download never takes the place of the file
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with partial.open("wb") as f:
                self.write_array(ref, f, progress=progress)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def write_array(
        self, ref: ArrayOrId, fileobj: IO[bytes], *, progress: ByteProgress | None = None
    ) -> None:
        """Stream an array's `.npy` bytes into a binary file object (`progress` as above)."""
        self._stream_to(f"/arrays/{array_id(ref)}", fileobj.write, progress)

    def array_meta(self, ref: ArrayOrId) -> ArrayHandle:
        meta = self._get_json(f"/arrays/{array_id(ref)}/meta", retry=True)
        return ArrayHandle.from_meta(meta)

    def delete_array(self, ref: ArrayOrId) -> bool:
        """Free an array: True if freed now, False if freed when the jobs using it end."""
        ident = array_id(ref)
        try:
            response = self._request("DELETE", f"/arrays/{ident}")
        except NotFound:
            self._owned.pop(ident, None)
            raise
        self._owned.pop(ident, None)
        if response.status_code == 204:  # a segment this process mapped may be unlinked now
            offload(mappings.sweep)
        return response.status_code == 204

    # -- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        parallel: Parallel = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        not_before: datetime | float | None = None,
        retries: int | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Job:
        """Submit a job: ndarrays are uploaded, `ArrayHandle`s (or `ArrayInput(array=id)`)
        reused, job handles (or `job.output(key)`, `JobInput(job=id)`) taken as the array
        results of those jobs once they succeed, the rest are params; the job's handle.

        `fl.submit("matmul", a=x, b=y)` or `fl.submit("fib", {"n": 30})`. Arrays uploaded
        here are freed by the server as soon as the job ends. `parallel`: run as this many
        parts over the same arrays, or `"auto"` (one per worker process of the inputs'
        host); a task that does not split refuses more than one part.

        The request carries an `Idempotency-Key` (a fresh uuid4, or `idempotency_key`) and is
        sent again with it through connection errors: the server makes one job of it. The
        same key given to two submits (of the same job) gives that one job, for the
        server's FORKLIFT_IDEMPOTENCY_TTL.

        Queueing (`common.Queueing`, checked before anything is sent): `priority` 0..9,
        higher first; `delay` (seconds, or a timedelta) or `not_before` (an aware datetime,
        or unix seconds): the job waits `queued` until then; `retries`: may only lower the
        task's own; `tags`: `{key: value}` strings shown in the job's view and filtered on.
        A job param of one of these names goes in the `arguments` mapping.
        """
        return self.submit_job(
            task,
            {**(arguments or {}), **kwargs},
            parallel=parallel,
            idempotency_key=idempotency_key,
            priority=priority,
            delay=delay,
            not_before=not_before,
            retries=retries,
            tags=tags,
        )

    def submit_job(
        self,
        task: str,
        arguments: Mapping[str, Any],
        *,
        time_limit: float | None = None,
        parallel: Parallel = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        not_before: datetime | float | None = None,
        retries: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Job:
        """`submit` with the arguments as one mapping and an optional lower time limit."""
        common.check_parallel(parallel)
        queueing = Queueing(priority, delay, not_before, retries, tags)
        key = idempotency_key or uuid.uuid4().hex
        submission = Pending(self._submit(task, arguments, time_limit, parallel, key, queueing))
        return Job(self, task=task, submission=submission)

    def batch(self) -> Batch:
        """Jobs submitted in one request when the block ends (`POST /jobs/batch`); a job of
        the batch given as an input of a later one is a pipeline step the server runs
        when that job has succeeded: `with fl.batch() as batch: ...`."""
        return Batch(self)

    def _submit(
        self,
        task: str,
        arguments: Mapping[str, Any],
        time_limit: float | None,
        parallel: Parallel,
        key: str,
        queueing: Queueing | None = None,
    ) -> JobView:
        temps: list[str] = []
        try:
            body = self._body(task, arguments, time_limit, parallel, {}, temps, queueing=queueing)
            response = self._request(
                "POST",
                "/jobs",
                content=common.encode_json(body),
                headers=common.idempotent_json_headers(key),
                retry=True,  # safe: the key makes a resent request the same job
            )
            return JobView.model_validate(response.json())
        finally:
            self._release(temps)

    def _body(
        self,
        task: str,
        arguments: Mapping[str, Any],
        time_limit: float | None,
        parallel: Parallel,
        uploaded: dict[int, tuple[np.ndarray, str]],
        temps: list[str],
        batch_refs: Mapping[int, str] | None = None,
        queueing: Queueing | None = None,
    ) -> dict[str, Any]:
        """A job's submission body; its ndarray arguments uploaded (each object once), its
        job handles as `JobInput`s (`batch_refs`: `#<index>` of a job of the same batch)."""
        split = common.split_arguments(self._job_inputs(arguments, batch_refs or {}))
        inputs = dict(split.handles)
        for name, arr in split.arrays.items():
            known = uploaded.get(id(arr))
            if known is None:
                handle = self.put_array(arr)
                self._owned.pop(handle.id, None)  # freed with the job, not by close()
                temps.append(handle.id)
                known = uploaded[id(arr)] = (arr, handle.id)
            inputs[name] = known[1]
        return common.submission_body(
            task,
            split.params,
            inputs,
            time_limit,
            jobs=split.jobs,
            parallel=parallel,
            queueing=queueing,
        )

    def _job_inputs(
        self, arguments: Mapping[str, Any], batch_refs: Mapping[int, str]
    ) -> dict[str, Any]:
        """The arguments with each job handle (or `job.output(key)`) as its `JobInput`: the
        job's id once its own submission is through, or its `#<index>` in the batch."""
        out = dict(arguments)
        for name, value in arguments.items():
            job, key = (value.job, value.key) if isinstance(value, JobOutput) else (value, None)
            if isinstance(job, Job):
                ref = batch_refs.get(id(job))
                ident = ref if ref is not None else job._submitted()
                out[name] = JobInput(job=ident, key=key)
        return out

    def _release(self, temps: list[str]) -> None:
        """Ask the server to free uploads made for jobs: at once, or when those jobs end."""
        for ident in temps:
            with contextlib.suppress(ForkliftError, httpx.HTTPError):
                self._request("DELETE", f"/arrays/{ident}")

    def map(
        self,
        task: str,
        iterable: Iterable[Mapping[str, Any]],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        not_before: datetime | float | None = None,
        retries: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Any]:
        """Submit one job per mapping of arguments (`POST /jobs/batch`), then wait for all
        of them (`POST /jobs/wait`); results in input order.

        The same ndarray object appearing in several mappings is uploaded once. A failed job
        raises its JobFailed/JobCancelled (or, with `return_exceptions`, takes its place).
        `priority`, `delay`, `not_before`, `retries` and `tags` apply to every job, as in
        `submit` (`timeout` counts a delay too).
        """
        queueing = Queueing(priority, delay, not_before, retries, tags)
        with self.batch() as batch:
            jobs = [batch._add(task, args, None, None, queueing) for args in iterable]
        self._wait_all(jobs, Deadline(timeout))
        results: list[Any] = []
        for job in jobs:
            try:
                results.append(job.result(0))
            except JobError as exc:
                if not return_exceptions:
                    raise
                results.append(exc)
        return results

    def _wait_views(
        self,
        ids: list[str],
        wait: float,
        *,
        any_ended: bool = False,
        deadline: Deadline | None = None,
    ) -> list[JobView]:
        """`POST /jobs/wait`: the views of `ids` once all have ended (with `any_ended`, one
        has), or after `wait` seconds."""
        body = {"ids": ids, "wait": round(wait, 3), "any": any_ended}
        response = self._request(
            "POST",
            "/jobs/wait",
            content=common.encode_json(body),
            headers=common.JSON_HEADERS,
            timeout=self.timeout + wait,
            retry=True,
            deadline=deadline,
        )
        return JobBatchView.model_validate(response.json()).jobs

    def _wait_all(self, jobs: list[Job], deadline: Deadline) -> None:
        """Long-poll many jobs per request until all have ended."""
        pending = {job.id: job for job in jobs if not common.is_final(job.view)}
        while pending:
            wait = deadline.poll()
            for chunk in common.chunks(list(pending)):
                for view in self._wait_views(chunk, wait, deadline=deadline):
                    pending[view.id]._seen(view)
                    if view.status.is_final:
                        del pending[view.id]
            if pending and deadline.expired():
                raise deadline.timeout_error(f"{len(pending)} job(s)")

    def job(self, job_id: str) -> Job:
        """A handle on an existing job by id (nothing is fetched yet)."""
        return Job(self, job_id)

    def jobs_page(
        self,
        *,
        status: str | Iterable[str] | None = None,
        task: str | None = None,
        tag: common.TagFilter = None,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobList:
        """One page of `GET /jobs`: the caller's jobs, newest first, and the `next` cursor
        (None on the last page). A page may be short and still have a `next`."""
        params = common.list_params(status, task, tag, since, until)
        params.append(("limit", str(limit)))
        if cursor:
            params.append(("cursor", cursor))
        return JobList.model_validate(self._get_json("/jobs", params=params, retry=True))

    def jobs(
        self,
        *,
        status: str | Iterable[str] | None = None,
        task: str | None = None,
        tag: common.TagFilter = None,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        limit: int | None = None,
        page_size: int = 100,
    ) -> Iterator[JobView]:
        """Every matching job of the caller's, newest first, page after page (`limit`: at
        most that many). `status`: one or several; `tag`: `"k:v"`, a list of them or a
        mapping (all must match); `since`/`until`: creation time (unix s or datetime). Jobs
        submitted while this iterates are not listed."""
        cursor: str | None = None
        left = limit
        while left is None or left > 0:
            size = page_size if left is None else min(page_size, left)
            page = self.jobs_page(
                status=status,
                task=task,
                tag=tag,
                since=since,
                until=until,
                limit=size,
                cursor=cursor,
            )
            for view in page.jobs:
                yield view
                if left is not None:
                    left -= 1
            if page.next is None:
                return
            cursor = page.next

    def cancel_many(
        self,
        ids: Iterable[str | Job] | None = None,
        *,
        tag: common.TagFilter = None,
        task: str | None = None,
        status: str | Iterable[str] | None = None,
    ) -> CancelReply:
        """Cancel jobs by id (at most 1000), or the caller's unfinished jobs matching a
        filter (`tag`, `task`, `status`; at most 10,000 per call: `more` says to call again).
        Finished and unknown ids come back in `skipped` with their status (`not_found`)."""
        body: dict[str, Any] = {}
        if ids is not None:
            body["ids"] = [job.id if isinstance(job, Job) else job for job in ids]
        tags = common.tag_filters(tag)
        if tags:
            body["tag"] = tags
        if task is not None:
            body["task"] = task
        if status is not None:
            body["status"] = common.status_list(status)
        response = self._request(
            "POST",
            "/jobs/cancel",
            content=common.encode_json(body),
            headers=common.JSON_HEADERS,
            retry=True,  # safe: cancelling again changes nothing
        )
        return CancelReply.model_validate(response.json())

    def delete_job(self, job: Job | str) -> JobView:
        """Remove a finished job's record (see `Job.delete`)."""
        return (job if isinstance(job, Job) else self.job(job)).delete()

    def _materialize(self, view: JobView, download: bool) -> Any:
        """A succeeded job's result with its arrays downloaded (or as handles)."""
        value = view.result
        if common.is_array_ref(value):
            handle = self._track(ArrayHandle.from_meta(value["array"]))
            return self._download(f"/jobs/{view.id}/result") if download else handle
        fetched: dict[str, np.ndarray | ArrayHandle] = {}
        for meta in common.array_metas(value):
            handle = self._track(ArrayHandle.from_meta(meta))
            fetched[handle.id] = self.get_array(handle) if download else handle
        return common.map_arrays(value, lambda meta: fetched[str(meta["id"])])

    # -- the rest -------------------------------------------------------------------------

    def tasks(self) -> list[TaskInfo]:
        """Every task the stack runs, with its params' JSON schema and array inputs."""
        infos = self._get_json("/tasks", retry=True)
        return [TaskInfo.model_validate(info) for info in infos]

    def task(self, name: str) -> TaskInfo:
        return TaskInfo.model_validate(self._get_json(f"/tasks/{name}", retry=True))

    # -- schedules ------------------------------------------------------------------------

    def schedule(
        self,
        task: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        cron: str | None = None,
        every: float | None = None,
        name: str = "",
        time_limit: float | None = None,
        parallel: Parallel = None,
        priority: int | None = None,
        retries: int | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> ScheduleView:
        """Run `task` periodically: at the times of a 5-field `cron` expression (UTC), or
        `every` seconds. Arguments are as for `submit`, but array inputs must be arrays already
        on the server (handles or ids; they must still exist at each run: upload with a `ttl`
        long enough). Each run is a job tagged `schedule: <id>`; `unschedule` stops it."""
        split = common.split_arguments({**(arguments or {}), **kwargs})
        if split.arrays or split.jobs:
            names = sorted([*split.arrays, *split.jobs])
            raise TypeError(
                f"schedule {task}: inputs {names} must be uploaded arrays (put_array first)"
            )
        body = common.submission_body(
            task, split.params, dict(split.handles), time_limit, parallel=parallel
        )
        given = {"cron": cron, "every": every, "priority": priority, "retries": retries}
        body.update({key: value for key, value in given.items() if value is not None})
        if name:
            body["name"] = name
        if tags:
            body["tags"] = dict(tags)
        response = self._request(
            "POST", "/schedules", content=common.encode_json(body), headers=common.JSON_HEADERS
        )
        return ScheduleView.model_validate(response.json())

    def schedules(self) -> list[ScheduleView]:
        """The caller's schedules, oldest first."""
        listed = ScheduleList.model_validate(self._get_json("/schedules", retry=True))
        return listed.schedules

    def get_schedule(self, schedule_id: str) -> ScheduleView:
        """One schedule (NotFound if it is not the caller's)."""
        return ScheduleView.model_validate(self._get_json(f"/schedules/{schedule_id}", retry=True))

    def unschedule(self, schedule: ScheduleView | str) -> None:
        """Delete a schedule: no run starts after this; past runs stay (NotFound if unknown)."""
        ident = schedule.id if isinstance(schedule, ScheduleView) else schedule
        self._request("DELETE", f"/schedules/{ident}")

    def health(self) -> Health | HealthDown:
        """`GET /healthz`: a `Health`, or the 503's `HealthDown` (returned, not raised: it
        says what is down). Any other error is raised as for every call."""
        try:
            response = self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach {self.url}: {exc}", code="unreachable") from exc
        if response.status_code == 503:
            with contextlib.suppress(ValidationError):  # else a 503 of something in between
                return HealthDown.model_validate_json(response.content)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return Health.model_validate_json(response.content)

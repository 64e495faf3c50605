"""The blocking client: `Client`, `Job`. `forklift._async` has the same API with `await`.

with Client("http://127.0.0.1:8000") as fl:
    job = fl.submit("matmul", a=x, b=y)        # ndarrays are uploaded for you
    c = job.result(timeout=60)                 # long-polls; an ndarray or a JSON value
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from forklift import common
from forklift.common import Backoff, Deadline, worth_retrying
from forklift.errors import (
    ForkliftError,
    InvalidRequest,
    JobError,
    NotFound,
    ServerError,
    Unavailable,
    error_from_response,
)
from forklift.handles import ArrayHandle, array_id
from forklift.npy_stream import (
    CHUNK,
    NPY,
    NpyReader,
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


class Job:
    """A submitted job. `result()` waits for it; `events()` follows it live."""

    def __init__(
        self, client: Client, job_id: str, task: str | None = None, view: dict | None = None
    ) -> None:
        self.client = client
        self.id = job_id
        self.task = task or (view or {}).get("task")
        self.view: dict[str, Any] = view or {}

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.task} {self.view.get('status', '?')}>"

    def status(self) -> dict[str, Any]:
        """The job as the server sees it now (status, progress, timings, error, result)."""
        self.view = self.client._get_json(f"/jobs/{self.id}", retry=True)
        return self.view

    def done(self) -> bool:
        return self.status()["status"] in common.FINAL

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; its final view (no exception for failed jobs).

        Long-polls `GET /jobs/{id}?wait=S`, retrying with backoff through connection errors
        and 503s. Raises `Timeout` when `timeout` seconds pass first.
        """
        deadline = Deadline(timeout)
        while True:
            wait = deadline.poll()
            view = self.client._get_json(
                f"/jobs/{self.id}",
                params={"wait": round(wait, 3)},
                timeout=self.client.timeout + wait,
                retry=True,
                deadline=deadline,
            )
            self.view = view
            if view["status"] in common.FINAL:
                return view
            if deadline.expired():
                raise deadline.timeout_error(f"job {self.id}")

    def result(self, timeout: float | None = None, *, download: bool = True) -> Any:
        """Wait, then the job's JSON value, or an ndarray for an array result.

        Raises `JobFailed` (with the server's error text), `JobCancelled` or `Timeout`.
        With `download=False`, array results come back as `ArrayHandle`s to pass on.
        """
        view = self.wait(timeout)
        common.raise_for_outcome(self.id, view)
        return self.client._materialize(self, view.get("result"), download)

    def cancel(self) -> dict[str, Any]:
        """Cancel the job (a running one is interrupted); InvalidRequest if it already ended."""
        self.view = self.client._request("DELETE", f"/jobs/{self.id}").json()
        return self.view

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Live state and progress: dicts like `{"event": "status", **job_view}` or
        `{"event": "progress", "status": "running", "progress": {"fraction", "note"}}`,
        starting with the current state and ending after the final one. Reconnects after
        connection errors (the current state is then sent again)."""
        deadline = Deadline(timeout)
        backoff = Backoff(self.client.retry_window)
        http_timeout = httpx.Timeout(self.client.timeout, read=common.SSE_READ_S)
        while True:
            try:
                with self.client._http.stream(
                    "GET", f"/jobs/{self.id}/events", timeout=http_timeout
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        time.sleep(backoff.after_error_response(response, deadline))
                        continue
                    parser = SseParser()
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if event is None:
                            if deadline.expired():
                                raise deadline.timeout_error(f"job {self.id}")
                            continue
                        backoff.reset()
                        item = event_item(event.event, event.data)
                        if item is None:
                            continue
                        if item["event"] == "status":
                            self.view = {k: v for k, v in item.items() if k != "event"}
                        yield item
                        if item.get("status") in common.FINAL:
                            return
                        if deadline.expired():
                            raise deadline.timeout_error(f"job {self.id}")
            except httpx.TransportError as exc:
                time.sleep(backoff.next_delay(f"event stream lost: {exc}", deadline))


class Client:
    """A forklift client on httpx: arrays in and out, jobs submitted and awaited.

    `url`: the API; `api_key`: one of the stack's FORKLIFT_API_KEYS (sent as a Bearer token);
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
        url: str = common.DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        free_on_close: bool = False,
        shared_memory: bool | None = None,
        retry_window: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.free_on_close = free_on_close
        self.shared_memory = shared_memory
        self.retry_window = retry_window
        self._http = httpx.Client(
            base_url=self.url,
            headers=common.headers_for(api_key),
            timeout=timeout,
            transport=transport,
        )
        self._owned: dict[str, None] = {}
        self._shm_info: dict[str, Any] | None = None
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
                time.sleep(backoff.next_delay(reason, deadline))
                continue
            if retry and worth_retrying(response):  # 503, or 429 with Retry-After
                time.sleep(backoff.after_error_response(response, deadline))
                continue
            if response.status_code >= 400:
                raise error_from_response(response.status_code, response.content, response.headers)
            return response

    def _get_json(self, path: str, **kwargs: Any) -> Any:
        return self._request("GET", path, **kwargs).json()

    def _stream_to(self, path: str, sink: Any) -> httpx.Headers:
        """GET `path` and feed each body chunk to `sink`; retried until the body starts."""
        deadline = Deadline(None)
        backoff = Backoff(self.retry_window)
        while True:
            try:
                with self._http.stream("GET", path) as response:
                    if response.status_code >= 400:
                        response.read()
                        time.sleep(backoff.after_error_response(response, deadline))
                        continue
                    for chunk in response.iter_raw(CHUNK):
                        sink(chunk)
                    return response.headers
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                time.sleep(backoff.next_delay(f"cannot reach {self.url}: {exc}", deadline))
            except httpx.TransportError as exc:
                raise Unavailable(f"download of {path} broke off: {exc}") from exc

    def _download(self, path: str) -> np.ndarray:
        reader = NpyReader()
        self._stream_to(path, reader.feed)
        return reader.finish()

    # -- arrays ---------------------------------------------------------------------------

    def put_array(
        self, arr: Any, ttl: float | None = None, *, shared_memory: bool | None = None
    ) -> ArrayHandle:
        """Store an array on the server; its handle (pass it to `submit`, or `get_array`).

        Over HTTP the `.npy` encoding is streamed from the array's own buffer (no encoded
        copy). Through shared memory (same host) the array is copied once into a segment
        this process creates and the API adopts. `ttl`: seconds (at most the server's).
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
        return self._upload(arr, ttl)

    def _upload(self, arr: np.ndarray, ttl: float | None) -> ArrayHandle:
        response = self._request(
            "POST",
            "/arrays",
            params={"ttl": ttl} if ttl else None,
            content=npy_chunks(arr),
            headers={"Content-Type": NPY, "Content-Length": str(npy_length(arr))},
        )
        return self._track(ArrayHandle.from_meta(response.json()))

    def put_file(self, path: str | os.PathLike[str], ttl: float | None = None) -> ArrayHandle:
        """Upload a `.npy` file as it is on disk (streamed; the server checks it)."""
        size = Path(path).stat().st_size
        response = self._request(
            "POST",
            "/arrays",
            params={"ttl": ttl} if ttl else None,
            content=file_chunks(path),
            headers={"Content-Type": NPY, "Content-Length": str(size)},
        )
        return self._track(ArrayHandle.from_meta(response.json()))

    def shm_info(self) -> dict[str, Any] | None:
        """The server's `{"shm_prefix", "shm_domain", ...}`, or None if it has no such route."""
        if not self._shm_checked:
            try:
                self._shm_info = self._get_json("/arrays/register/info", retry=True)
            except NotFound:
                self._shm_info = None
            self._shm_checked = True
        return self._shm_info

    def _same_domain_info(self, *, required: bool) -> dict[str, Any] | None:
        info = self.shm_info()
        if info is None:
            if required:
                raise InvalidRequest("this server does not accept shared-memory registrations")
            return None
        if info.get("shm_domain") != local_domain() and not required:
            return None
        return info  # required and another domain: the server refuses it with its reason

    def _register(self, arr: np.ndarray, ttl: float | None, info: dict[str, Any]) -> ArrayHandle:
        """Reserve, fill, commit; a recycled segment this process cannot open: once more, fresh."""
        mappings.sweep()  # let go of kept mappings of segments freed since the last put
        handle = self._register_once(arr, ttl, info, recycle=True)
        if handle is None:
            handle = self._register_once(arr, ttl, info, recycle=False)
            assert handle is not None
        return handle

    def _register_once(
        self, arr: np.ndarray, ttl: float | None, info: dict[str, Any], *, recycle: bool
    ) -> ArrayHandle | None:
        name, ident, body = registration(arr, ttl, info["shm_prefix"], recycle=recycle)
        reservation = self._request(
            "POST",
            "/arrays/register",
            content=common.encode_json(body),
            headers=common.JSON_HEADERS,
        ).json()
        recycled = bool(reservation.get("created"))
        try:
            fill_segment(name, arr, recycled=recycled)
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

    def get_array(self, ref: ArrayHandle | str) -> np.ndarray:
        """Download an array (streamed into one freshly allocated ndarray)."""
        return self._download(f"/arrays/{array_id(ref)}")

    def save_array(self, ref: ArrayHandle | str, path: str | os.PathLike[str]) -> Path:
        """Download an array's `.npy` bytes straight into a file (bit-exact, any size)."""
        target = Path(path)
        if target.exists() and not target.is_file():  # /dev/null, a pipe: write as it is
            with target.open("wb") as f:
                self.write_array(ref, f)
            return target
        # a partial download never takes the place of the file
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with partial.open("wb") as f:
                self.write_array(ref, f)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def write_array(self, ref: ArrayHandle | str, fileobj: Any) -> None:
        """Stream an array's `.npy` bytes into a binary file object."""
        self._stream_to(f"/arrays/{array_id(ref)}", fileobj.write)

    def array_meta(self, ref: ArrayHandle | str) -> ArrayHandle:
        return ArrayHandle.from_meta(self._get_json(f"/arrays/{array_id(ref)}/meta", retry=True))

    def delete_array(self, ref: ArrayHandle | str) -> bool:
        """Free an array: True if freed now, False if freed when the jobs using it end."""
        ident = array_id(ref)
        try:
            response = self._request("DELETE", f"/arrays/{ident}")
        except NotFound:
            self._owned.pop(ident, None)
            raise
        self._owned.pop(ident, None)
        if response.status_code == 204:  # a segment this process mapped may be unlinked now
            mappings.sweep()
        return response.status_code == 204

    # -- jobs -----------------------------------------------------------------------------

    def submit(
        self, task: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> Job:
        """Submit a job: ndarrays are uploaded, `ArrayHandle`s reused, the rest are params.

        `client.submit("matmul", a=x, b=y)` or `client.submit("fib", {"n": 30})`. Arrays
        uploaded here are freed by the server as soon as the job ends.
        """
        return self.submit_job(task, {**(arguments or {}), **kwargs})

    def submit_job(
        self, task: str, arguments: Mapping[str, Any], *, time_limit: float | None = None
    ) -> Job:
        """`submit` with the arguments as one mapping and an optional lower time limit."""
        temps: list[str] = []
        try:
            return self._submit(task, arguments, time_limit, {}, temps)
        finally:
            self._release(temps)

    def _submit(
        self,
        task: str,
        arguments: Mapping[str, Any],
        time_limit: float | None,
        uploaded: dict[int, tuple[np.ndarray, str]],
        temps: list[str],
    ) -> Job:
        body = common.encode_json(self._body(task, arguments, time_limit, uploaded, temps))
        view = self._request("POST", "/jobs", content=body, headers=common.JSON_HEADERS).json()
        return Job(self, view["id"], task, view)

    def _body(
        self,
        task: str,
        arguments: Mapping[str, Any],
        time_limit: float | None,
        uploaded: dict[int, tuple[np.ndarray, str]],
        temps: list[str],
    ) -> dict[str, Any]:
        """A job's submission body; its ndarray arguments uploaded (each object once)."""
        split = common.split_arguments(arguments)
        inputs = dict(split.handles)
        for name, arr in split.arrays.items():
            known = uploaded.get(id(arr))
            if known is None:
                handle = self.put_array(arr)
                self._owned.pop(handle.id, None)  # freed with the job, not by close()
                temps.append(handle.id)
                known = uploaded[id(arr)] = (arr, handle.id)
            inputs[name] = known[1]
        return common.submission_body(task, split.params, inputs, time_limit)

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
    ) -> list[Any]:
        """Submit one job per mapping of arguments, then wait; results in input order.

        The same ndarray object appearing in several mappings is uploaded once. A failed job
        raises its JobFailed/JobCancelled (or, with `return_exceptions`, takes its place).
        """
        jobs: list[Job] = []
        temps: list[str] = []
        uploaded: dict[int, tuple[np.ndarray, str]] = {}
        try:
            bodies = [self._body(task, args, None, uploaded, temps) for args in iterable]
            for chunk in common.chunks(bodies):
                content = common.encode_json({"jobs": chunk})
                reply = self._request(
                    "POST", "/jobs/batch", content=content, headers=common.JSON_HEADERS
                ).json()
                jobs.extend(Job(self, view["id"], task, view) for view in reply["jobs"])
        except BaseException:
            for job in jobs:
                with contextlib.suppress(ForkliftError, httpx.HTTPError):
                    job.cancel()
            raise
        finally:
            self._release(temps)
        self._wait_all(jobs, Deadline(timeout))
        results: list[Any] = []
        for job in jobs:
            try:
                common.raise_for_outcome(job.id, job.view)
                results.append(self._materialize(job, job.view.get("result"), True))
            except JobError as exc:
                if not return_exceptions:
                    raise
                results.append(exc)
        return results

    def _wait_all(self, jobs: list[Job], deadline: Deadline) -> None:
        """Long-poll many jobs per request (`POST /jobs/wait`) until all have ended."""
        pending = {job.id: job for job in jobs if job.view.get("status") not in common.FINAL}
        while pending:
            wait = deadline.poll()
            for chunk in common.chunks(list(pending)):
                reply = self._request(
                    "POST",
                    "/jobs/wait",
                    content=common.encode_json({"ids": chunk, "wait": round(wait, 3)}),
                    headers=common.JSON_HEADERS,
                    timeout=self.timeout + wait,
                    retry=True,
                    deadline=deadline,
                ).json()
                for view in reply["jobs"]:
                    pending[view["id"]].view = view
                    if view["status"] in common.FINAL:
                        del pending[view["id"]]
            if pending and deadline.expired():
                raise deadline.timeout_error(f"{len(pending)} job(s)")

    def job(self, job_id: str) -> Job:
        """A handle on an existing job by id (nothing is fetched yet)."""
        return Job(self, job_id)

    def _materialize(self, job: Job, value: Any, download: bool) -> Any:
        if common.is_array_ref(value):
            handle = self._track(ArrayHandle.from_meta(value["array"]))
            return self._download(f"/jobs/{job.id}/result") if download else handle

        def fetch(meta: dict[str, Any]) -> Any:
            handle = self._track(ArrayHandle.from_meta(meta))
            return self.get_array(handle) if download else handle

        return common.map_arrays(value, fetch)

    # -- the rest -------------------------------------------------------------------------

    def tasks(self) -> list[dict[str, Any]]:
        """Every task the stack runs, with its params' JSON schema and array inputs."""
        return self._get_json("/tasks", retry=True)

    def task(self, name: str) -> dict[str, Any]:
        return self._get_json(f"/tasks/{name}", retry=True)

    def health(self) -> dict[str, Any]:
        """`GET /healthz` (a 503 body is returned, not raised: it says what is down)."""
        try:
            response = self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach {self.url}: {exc}", code="unreachable") from exc
        return response.json()

"""The asyncio client: `AsyncClient`, `AsyncJob`; the same methods as `Client`, awaited.

async with AsyncClient("http://127.0.0.1:8000") as fl:
    job = await fl.submit("matmul", a=x, b=y)
    c = await job.result(timeout=60)
    async for event in job.events(): ...
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
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
from forklift.npy_stream import CHUNK, NPY, NpyReader, anpy_chunks, npy_length
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

MAP_CONCURRENCY = 32


class AsyncJob:
    """A submitted job; `await job.result()` waits for it, `job.events()` follows it live."""

    def __init__(
        self, client: AsyncClient, job_id: str, task: str | None = None, view: dict | None = None
    ) -> None:
        self.client = client
        self.id = job_id
        self.task = task or (view or {}).get("task")
        self.view: dict[str, Any] = view or {}

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id} {self.task} {self.view.get('status', '?')}>"

    async def status(self) -> dict[str, Any]:
        self.view = await self.client._get_json(f"/jobs/{self.id}", retry=True)
        return self.view

    async def done(self) -> bool:
        return (await self.status())["status"] in common.FINAL

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Until the job ends (long-polls, retrying through outages); its final view."""
        deadline = Deadline(timeout)
        while True:
            wait = deadline.poll()
            view = await self.client._get_json(
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

    async def result(self, timeout: float | None = None, *, download: bool = True) -> Any:
        """The JSON value or ndarray; JobFailed / JobCancelled / Timeout otherwise."""
        view = await self.wait(timeout)
        common.raise_for_outcome(self.id, view)
        return await self.client._materialize(self, view.get("result"), download)

    async def cancel(self) -> dict[str, Any]:
        self.view = (await self.client._request("DELETE", f"/jobs/{self.id}")).json()
        return self.view

    async def events(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Live state and progress, as `Job.events` (an async iterator)."""
        deadline = Deadline(timeout)
        backoff = Backoff(self.client.retry_window)
        http_timeout = httpx.Timeout(self.client.timeout, read=common.SSE_READ_S)
        while True:
            try:
                async with self.client._http.stream(
                    "GET", f"/jobs/{self.id}/events", timeout=http_timeout
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        await asyncio.sleep(backoff.after_error_response(response, deadline))
                        continue
                    parser = SseParser()
                    async for line in response.aiter_lines():
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
                await asyncio.sleep(backoff.next_delay(f"event stream lost: {exc}", deadline))


class AsyncClient:
    """The asyncio twin of `Client` (same arguments, same methods, awaited)."""

    def __init__(
        self,
        url: str = common.DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        free_on_close: bool = False,
        shared_memory: bool | None = None,
        retry_window: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.free_on_close = free_on_close
        self.shared_memory = shared_memory
        self.retry_window = retry_window
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=common.headers_for(api_key),
            timeout=timeout,
            transport=transport,
        )
        self._owned: dict[str, None] = {}
        self._shm_info: dict[str, Any] | None = None
        self._shm_checked = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; with `free_on_close`, delete the arrays this client made."""
        try:
            if self.free_on_close:
                for ident in list(self._owned):
                    with contextlib.suppress(ForkliftError, httpx.HTTPError):
                        await self.delete_array(ident)
        finally:
            self._owned.clear()
            await self._http.aclose()
            mappings.sweep()  # kept mappings of segments freed meanwhile (submit's inputs)

    close = aclose

    @property
    def owned_arrays(self) -> list[str]:
        return list(self._owned)

    # -- HTTP -----------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool = False,
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        deadline = deadline or Deadline(None)
        backoff = Backoff(self.retry_window)
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                reason = f"cannot reach {self.url}: {type(exc).__name__}: {exc}"
                if not retry:
                    raise Unavailable(reason, code="unreachable") from exc
                await asyncio.sleep(backoff.next_delay(reason, deadline))
                continue
            if retry and worth_retrying(response):  # 503, or 429 with Retry-After
                await asyncio.sleep(backoff.after_error_response(response, deadline))
                continue
            if response.status_code >= 400:
                raise error_from_response(response.status_code, response.content, response.headers)
            return response

    async def _get_json(self, path: str, **kwargs: Any) -> Any:
        return (await self._request("GET", path, **kwargs)).json()

    async def _stream_to(self, path: str, sink: Callable[[bytes], Any]) -> httpx.Headers:
        deadline = Deadline(None)
        backoff = Backoff(self.retry_window)
        while True:
            try:
                async with self._http.stream("GET", path) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        await asyncio.sleep(backoff.after_error_response(response, deadline))
                        continue
                    async for chunk in response.aiter_raw(CHUNK):
                        sink(chunk)
                    return response.headers
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                reason = f"cannot reach {self.url}: {exc}"
                await asyncio.sleep(backoff.next_delay(reason, deadline))
            except httpx.TransportError as exc:
                raise Unavailable(f"download of {path} broke off: {exc}") from exc

    async def _download(self, path: str) -> np.ndarray:
        reader = NpyReader()
        await self._stream_to(path, reader.feed)
        return reader.finish()

    # -- arrays ---------------------------------------------------------------------------

    async def put_array(
        self, arr: Any, ttl: float | None = None, *, shared_memory: bool | None = None
    ) -> ArrayHandle:
        """As `Client.put_array`; the shared-memory copy runs in a thread."""
        arr = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
        npy_length(arr)
        mode = self.shared_memory if shared_memory is None else shared_memory
        if mode is True or (mode is None and arr.nbytes >= common.SHM_THRESHOLD):
            info = await self._same_domain_info(required=mode is True)
            if info is not None:
                try:
                    handle = await self._register(arr, ttl, info)
                except (InvalidRequest, NotFound, OSError):
                    if mode is True:
                        raise
                else:
                    return handle
        return await self._upload(arr, ttl)

    async def _upload(self, arr: np.ndarray, ttl: float | None) -> ArrayHandle:
        response = await self._request(
            "POST",
            "/arrays",
            params={"ttl": ttl} if ttl else None,
            content=anpy_chunks(arr),
            headers={"Content-Type": NPY, "Content-Length": str(npy_length(arr))},
        )
        return self._track(ArrayHandle.from_meta(response.json()))

    async def put_file(self, path: str | os.PathLike[str], ttl: float | None = None) -> ArrayHandle:
        size = Path(path).stat().st_size

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(path, "rb") as f:
                while chunk := await f.read(CHUNK):
                    yield chunk

        response = await self._request(
            "POST",
            "/arrays",
            params={"ttl": ttl} if ttl else None,
            content=chunks(),
            headers={"Content-Type": NPY, "Content-Length": str(size)},
        )
        return self._track(ArrayHandle.from_meta(response.json()))

    async def shm_info(self) -> dict[str, Any] | None:
        if not self._shm_checked:
            try:
                self._shm_info = await self._get_json("/arrays/register/info", retry=True)
            except NotFound:
                self._shm_info = None
            self._shm_checked = True
        return self._shm_info

    async def _same_domain_info(self, *, required: bool) -> dict[str, Any] | None:
        info = await self.shm_info()
        if info is None:
            if required:
                raise InvalidRequest("this server does not accept shared-memory registrations")
            return None
        if info.get("shm_domain") != local_domain() and not required:
            return None
        return info

    async def _register(
        self, arr: np.ndarray, ttl: float | None, info: dict[str, Any]
    ) -> ArrayHandle:
        """Reserve, fill, commit; a recycled segment this process cannot open: once more, fresh."""
        # let go of kept mappings of segments freed since the last put
        await asyncio.to_thread(mappings.sweep)
        handle = await self._register_once(arr, ttl, info, recycle=True)
        if handle is None:
            handle = await self._register_once(arr, ttl, info, recycle=False)
            assert handle is not None
        return handle

    async def _register_once(
        self, arr: np.ndarray, ttl: float | None, info: dict[str, Any], *, recycle: bool
    ) -> ArrayHandle | None:
        name, ident, body = registration(arr, ttl, info["shm_prefix"], recycle=recycle)
        reservation = (
            await self._request(
                "POST",
                "/arrays/register",
                content=common.encode_json(body),
                headers=common.JSON_HEADERS,
            )
        ).json()
        recycled = bool(reservation.get("created"))
        try:
            await asyncio.to_thread(fill_segment, name, arr, recycled=recycled)
            response = await self._request("POST", f"/arrays/register/{ident}/commit")
        except RecycledSegmentUnavailable:
            await self._abandon_registration(name, ident, recycled=True)
            return None
        except ShmFullError as exc:
            await self._abandon_registration(name, ident, recycled=recycled)
            raise ServerError(str(exc), code="shm_full", status=507) from None
        except BaseException:
            await self._abandon_registration(name, ident, recycled=recycled)
            raise
        return self._track(ArrayHandle.from_meta(response.json()))

    async def _abandon_registration(self, name: str, ident: str, *, recycled: bool) -> None:
        """DELETE the reservation; a segment made here is unlinked here too.

        A recycled one is the API's to put back into its pool, unless the API cannot be
        reached: then it is unlinked here rather than left for an hour.
        """
        if not recycled:
            discard_segment(name)
        try:
            await self._request("DELETE", f"/arrays/register/{ident}")
        except (ForkliftError, httpx.HTTPError):
            discard_segment(name)

    def _track(self, handle: ArrayHandle) -> ArrayHandle:
        self._owned[handle.id] = None
        return handle

    async def get_array(self, ref: ArrayHandle | str) -> np.ndarray:
        return await self._download(f"/arrays/{array_id(ref)}")

    async def save_array(self, ref: ArrayHandle | str, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        if target.exists() and not target.is_file():  # /dev/null, a pipe: write as it is
            with target.open("wb") as f:
                await self.write_array(ref, f)
            return target
        # a partial download never takes the place of the file
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with partial.open("wb") as f:
                await self.write_array(ref, f)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    async def write_array(self, ref: ArrayHandle | str, fileobj: Any) -> None:
        """Stream an array's `.npy` bytes into a binary file object (written synchronously)."""
        await self._stream_to(f"/arrays/{array_id(ref)}", fileobj.write)

    async def array_meta(self, ref: ArrayHandle | str) -> ArrayHandle:
        meta = await self._get_json(f"/arrays/{array_id(ref)}/meta", retry=True)
        return ArrayHandle.from_meta(meta)

    async def delete_array(self, ref: ArrayHandle | str) -> bool:
        ident = array_id(ref)
        try:
            response = await self._request("DELETE", f"/arrays/{ident}")
        except NotFound:
            self._owned.pop(ident, None)
            raise
        self._owned.pop(ident, None)
        if response.status_code == 204:  # a segment this process mapped may be unlinked now
            await asyncio.to_thread(mappings.sweep)
        return response.status_code == 204

    # -- jobs -----------------------------------------------------------------------------

    async def submit(
        self, task: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> AsyncJob:
        return await self.submit_job(task, {**(arguments or {}), **kwargs})

    async def submit_job(
        self, task: str, arguments: Mapping[str, Any], *, time_limit: float | None = None
    ) -> AsyncJob:
        temps: list[str] = []
        try:
            return await self._submit(task, arguments, time_limit, {}, temps)
        finally:
            await self._release(temps)

    async def _submit(
        self,
        task: str,
        arguments: Mapping[str, Any],
        time_limit: float | None,
        uploaded: dict[int, tuple[np.ndarray, str]],
        temps: list[str],
    ) -> AsyncJob:
        body = await self._body(task, arguments, time_limit, uploaded, temps)
        response = await self._request(
            "POST", "/jobs", content=common.encode_json(body), headers=common.JSON_HEADERS
        )
        view = response.json()
        return AsyncJob(self, view["id"], task, view)

    async def _body(
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
                handle = await self.put_array(arr)
                self._owned.pop(handle.id, None)
                temps.append(handle.id)
                known = uploaded[id(arr)] = (arr, handle.id)
            inputs[name] = known[1]
        return common.submission_body(task, split.params, inputs, time_limit)

    async def _release(self, temps: list[str]) -> None:
        for ident in temps:
            with contextlib.suppress(ForkliftError, httpx.HTTPError):
                await self._request("DELETE", f"/arrays/{ident}")

    async def map(
        self,
        task: str,
        iterable: Iterable[Mapping[str, Any]],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Submit every job (`POST /jobs/batch`), then wait for all of them together
        (`POST /jobs/wait`); results in input order."""
        jobs: list[AsyncJob] = []
        temps: list[str] = []
        uploaded: dict[int, tuple[np.ndarray, str]] = {}
        try:
            bodies = [await self._body(task, args, None, uploaded, temps) for args in iterable]
            for chunk in common.chunks(bodies):
                response = await self._request(
                    "POST",
                    "/jobs/batch",
                    content=common.encode_json({"jobs": chunk}),
                    headers=common.JSON_HEADERS,
                )
                jobs.extend(AsyncJob(self, v["id"], task, v) for v in response.json()["jobs"])
        except BaseException:
            for job in jobs:
                with contextlib.suppress(ForkliftError, httpx.HTTPError):
                    await job.cancel()
            raise
        finally:
            await self._release(temps)
        await self._wait_all(jobs, Deadline(timeout))
        limit = asyncio.Semaphore(MAP_CONCURRENCY)

        async def one(job: AsyncJob) -> Any:
            async with limit:
                try:
                    common.raise_for_outcome(job.id, job.view)
                    return await self._materialize(job, job.view.get("result"), True)
                except JobError as exc:
                    if return_exceptions:
                        return exc
                    raise

        return list(await asyncio.gather(*(one(job) for job in jobs)))

    async def _wait_all(self, jobs: list[AsyncJob], deadline: Deadline) -> None:
        """Long-poll many jobs per request (`POST /jobs/wait`) until all have ended."""
        pending = {job.id: job for job in jobs if job.view.get("status") not in common.FINAL}
        while pending:
            wait = deadline.poll()
            for chunk in common.chunks(list(pending)):
                response = await self._request(
                    "POST",
                    "/jobs/wait",
                    content=common.encode_json({"ids": chunk, "wait": round(wait, 3)}),
                    headers=common.JSON_HEADERS,
                    timeout=self.timeout + wait,
                    retry=True,
                    deadline=deadline,
                )
                for view in response.json()["jobs"]:
                    pending[view["id"]].view = view
                    if view["status"] in common.FINAL:
                        del pending[view["id"]]
            if pending and deadline.expired():
                raise deadline.timeout_error(f"{len(pending)} job(s)")

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def _materialize(self, job: AsyncJob, value: Any, download: bool) -> Any:
        if common.is_array_ref(value):
            handle = self._track(ArrayHandle.from_meta(value["array"]))
            return await self._download(f"/jobs/{job.id}/result") if download else handle
        metas = common.array_metas(value)
        if not metas:
            return value
        fetched: dict[str, Any] = {}
        for meta in metas:
            handle = self._track(ArrayHandle.from_meta(meta))
            fetched[handle.id] = await self.get_array(handle) if download else handle
        return common.map_arrays(value, lambda meta: fetched[str(meta["id"])])

    # -- the rest -------------------------------------------------------------------------

    async def tasks(self) -> list[dict[str, Any]]:
        return await self._get_json("/tasks", retry=True)

    async def task(self, name: str) -> dict[str, Any]:
        return await self._get_json(f"/tasks/{name}", retry=True)

    async def health(self) -> dict[str, Any]:
        try:
            response = await self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach {self.url}: {exc}", code="unreachable") from exc
        return response.json()

"""Both clients under one test: `Client` as it is, `AsyncClient` behind a blocking facade.

A test written against `Client` runs twice (the `client_kind` fixture): once with the
generated sync client, once with the hand-written async one driven through an anyio portal
(an event loop in a thread), so the same assertions cover both.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, cast

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from forklift import (
    AsyncBatch,
    AsyncClient,
    AsyncJob,
    Client,
    Job,
    JobOutput,
    as_completed,
    async_as_completed,
)

KINDS = ("sync", "async")


class Blocking:
    """An `AsyncClient` or `AsyncJob` called from sync code: coroutines run on the portal's
    loop, a returned `AsyncJob` is awaited (submitted, as `Client.submit` returns once the
    job is) and wrapped, async iterators become iterators."""

    def __init__(self, target: object, portal: BlockingPortal) -> None:
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "portal", portal)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.target, name)
        if inspect.ismethod(value):
            return functools.partial(self._call, value)
        return self._wrap(value)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self.target, name, value)

    def __repr__(self) -> str:
        return f"Blocking({self.target!r})"

    def _call(self, method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _unwrapped(args), _unwrapped(kwargs)
        return self._wrap(self.portal.call(functools.partial(_invoke, method, args, kwargs)))

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, AsyncJob):
            return Blocking(value, self.portal)
        if isinstance(value, AsyncBatch):
            return BlockingBatch(value, self.portal)
        if isinstance(value, AsyncIterator):
            return _iterate(value, self.portal)
        return value


class BlockingBatch(Blocking):
    """An `AsyncBatch` as a `Batch`: `with` runs its `async with` on the portal, and its
    `submit` hands back the job unsent (not awaited: its id comes when the block ends)."""

    def __enter__(self) -> BlockingBatch:
        self.portal.call(self.target.__aenter__)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.portal.call(self.target.__aexit__, *exc_info)

    def _call(self, method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _unwrapped(args), _unwrapped(kwargs)

        async def call() -> list[Any]:  # in a list: the portal would await an AsyncJob
            return [method(*args, **kwargs)]

        return self._wrap(self.portal.call(call)[0])


def _unwrapped(values: Any) -> Any:
    """Arguments with each `Blocking` job (also in a mapping, or in a `JobOutput`) as the
    `AsyncJob` it wraps, as the async client takes it."""

    def one(value: Any) -> Any:
        if isinstance(value, Blocking):
            return value.target
        if isinstance(value, JobOutput) and isinstance(value.job, Blocking):
            return JobOutput(value.job.target, value.key)
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        return value

    if isinstance(values, tuple):
        return tuple(one(v) for v in values)
    return {k: one(v) for k, v in values.items()}


async def _invoke(method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    value = method(*args, **kwargs)  # on the loop: `submit` starts its task here
    if inspect.isawaitable(value):  # a coroutine, or an AsyncJob: awaited, it is submitted
        return await value
    return value


def _iterate(items: AsyncIterator[Any], portal: BlockingPortal) -> Iterator[Any]:
    while True:
        try:
            item = portal.call(items.__anext__)
        except StopAsyncIteration:
            return
        yield Blocking(item, portal) if isinstance(item, AsyncJob) else item


@contextlib.contextmanager
def open_client(kind: str, url: str, **kwargs: Any) -> Iterator[Client]:
    """A `Client`, or an `AsyncClient` behind `Blocking` (typed as the `Client` it acts as)."""
    if kind == "sync":
        with Client(url, **kwargs) as fl:
            yield fl
        return
    with start_blocking_portal() as portal:
        target = AsyncClient(url, **kwargs)
        try:
            yield cast(Client, Blocking(target, portal))
        finally:
            portal.call(target.aclose)


#: What a recording server saw: (method, path, JSON body or None) per request.
Recorded = list[tuple[str, str, Any]]


@contextlib.contextmanager
def recording_client(
    kind: str, handler: Callable[[httpx.Request], httpx.Response]
) -> Iterator[Client]:
    """A client of either kind whose requests go to `handler` (an httpx `MockTransport`): for
    unit tests of the request bodies the clients build; the real API's side is the
    integration tests'."""
    transport = httpx.MockTransport(handler)
    with open_client(kind, "http://forklift.test", transport=transport) as client:
        yield client


def posted(recorded: Recorded, path: str) -> list[Any]:
    """The bodies POSTed to `path`, in order."""
    return [body for method, p, body in recorded if method == "POST" and p == path]


def completed(jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
    """`as_completed` for either kind of job."""
    jobs = list(jobs)
    if not jobs or not isinstance(jobs[0], Blocking):
        yield from as_completed(jobs, timeout)
        return
    portal = cast(Blocking, jobs[0]).portal
    targets = [cast(Blocking, job).target for job in jobs]

    async def start() -> AsyncIterator[AsyncJob]:
        return async_as_completed(targets, timeout)

    yield from _iterate(portal.call(start), portal)


def on_http(client: Client, event: str, hook: Callable[[Any], object]) -> Callable[[], None]:
    """Add an httpx event hook (`request` or `response`) to either kind of client; the
    function that removes it again."""
    http = client._http
    added: Callable[[Any], object] = hook
    if isinstance(http, httpx.AsyncClient):

        async def added(item: Any) -> None:
            hook(item)

    http.event_hooks[event].append(added)
    return lambda: http.event_hooks[event].remove(added)

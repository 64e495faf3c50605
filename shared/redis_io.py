"""Redis clients, and how one store class serves sync and async callers with real types.

The API talks to Redis with `redis.asyncio`, the workers with plain `redis`. A store is
generic over the client it is given (`JobStore[redis.Redis]` in a worker,
`JobStore[aioredis.Redis]` in the API). Each method issues one round trip and post-processes
the reply; `then()` applies that post-processing now (sync client) or after the await (async
client), so every store is written once.

`@round_trip` types such a method per client, as redis-py types its own commands (overloads
on the client): the body returns `MaybeAwaitable[T]`; a sync store's caller gets `T`, an async
store's caller `Awaitable[T]`, so mypy flags a missing `await` in the API and a stray one in a
worker. At runtime `round_trip` returns the method unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    TypeAlias,
    TypeVar,
    overload,
)

import redis
import redis.asyncio as aioredis

from shared.settings import Settings

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

MaybeAwaitable: TypeAlias = "T | Awaitable[T]"

AnyRedis = redis.Redis | aioredis.Redis

# What a store is generic over: the client it was given.
ClientT = TypeVar("ClientT", bound=AnyRedis)


def then(value: Any, parse: Callable[[Any], R]) -> MaybeAwaitable[R]:
    """`parse(value)`, or a coroutine that awaits `value` first."""
    if inspect.isawaitable(value):

        async def finish() -> R:
            return parse(await value)

        return finish()
    return parse(value)


def ready(client: AnyRedis, value: T) -> MaybeAwaitable[T]:
    """`value` as a store method returns it without a round trip: awaitable for an async
    client (the caller awaits every method of an async store), the value itself for a sync one."""
    if isinstance(client, aioredis.Redis):

        async def finish() -> T:
            return value

        return finish()
    return value


class _SyncStore(Protocol):
    @property
    def client(self) -> redis.Redis: ...


class _AsyncStore(Protocol):
    @property
    def client(self) -> aioredis.Redis: ...


if TYPE_CHECKING:

    class round_trip(Generic[P, R]):
        """A store method's type per client: `R` on a sync store, `Awaitable[R]` on an async
        one, `MaybeAwaitable[R]` inside a store generic over its client."""

        def __init__(self, method: Callable[Concatenate[Any, P], MaybeAwaitable[R]]) -> None: ...

        @overload
        def __get__(self, store: None, owner: type) -> round_trip[P, R]: ...
        @overload
        def __get__(self, store: _SyncStore, owner: type) -> Callable[P, R]: ...
        @overload
        def __get__(self, store: _AsyncStore, owner: type) -> Callable[P, Awaitable[R]]: ...
        @overload
        def __get__(self, store: object, owner: type) -> Callable[P, MaybeAwaitable[R]]: ...
        def __get__(self, store: object, owner: type) -> Any: ...

else:

    def round_trip(method):
        return method


_CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 3,
    "socket_timeout": 10,
    "health_check_interval": 15,
    "retry_on_timeout": False,
}


def sync_redis(settings: Settings, **overrides: Any) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, **{**_CLIENT_OPTIONS, **overrides})


def async_redis(settings: Settings, **overrides: Any) -> aioredis.Redis:
    return aioredis.Redis.from_url(settings.redis_url, **{**_CLIENT_OPTIONS, **overrides})


REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)

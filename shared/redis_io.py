"""Redis clients and the one trick that lets each store serve sync and async callers.

The API talks to Redis with `redis.asyncio`, the workers with plain `redis`. Each store
method issues one round trip and post-processes the reply; `then()` applies that
post-processing now (sync client) or after the await (async client), so every store is
written once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from shared.settings import Settings

T = TypeVar("T")
R = TypeVar("R")

AnyRedis = redis.Redis | aioredis.Redis


def then(value: Any, parse: Callable[[Any], R]) -> Any:
    """`parse(value)`, or a coroutine that awaits `value` first."""
    if inspect.isawaitable(value):

        async def finish() -> R:
            return parse(await value)

        return finish()
    return parse(value)


def ready(client: AnyRedis, value: T) -> Any:
    """`value` as a store method returns it without a round trip: awaitable for an async
    client (the caller awaits every method of an async store), the value itself for a sync one."""
    if isinstance(client, aioredis.Redis):

        async def finish() -> T:
            return value

        return finish()
    return value


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

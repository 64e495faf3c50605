"""Caps the size of JSON request bodies before the app reads them (413, not a full buffer).

Array uploads have their own, much larger cap and stream into shared memory; they are exempt.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


def _error_body(limit: int) -> bytes:
    message = f"request body over {limit} bytes (FORKLIFT_MAX_JSON_BYTES)"
    return json.dumps({"error": {"code": "too_large", "message": message, "detail": None}}).encode()


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, exempt_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = _error_body(self.max_bytes)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BodyTimeoutMiddleware:
    """408 when a client stops sending a body it announced, instead of a request held forever.

    A Content-Length larger than what the client sends (or an upload that stalls) would keep
    the request, its reservation and its half-filled segment alive until the client goes
    away. Each read of the body may wait at most `idle_s`; once the body is complete, reads
    (e.g. a streaming response listening for the disconnect) are not timed.
    """

    def __init__(self, app: ASGIApp, idle_s: float) -> None:
        self.app = app
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                # asyncio.timeout, not wait_for: wait_for wraps every read in a new task,
                # a measurable cost per chunk of a GiB upload.
                async with asyncio.timeout(self.idle_s):
                    message = await receive()
            except TimeoutError:
                body_done = True
                raise HTTPException(
                    408,
                    f"the request body stopped arriving for {self.idle_s:g} s"
                    " (is Content-Length larger than the body?)",
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)

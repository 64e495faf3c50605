"""An open API (no `FORKLIFT_API_KEYS`) serves loopback only, unless `FORKLIFT_ALLOW_OPEN` says so.

The API cannot ask its server where it listens (`uvicorn api.main:app --host 0.0.0.0`, the
launcher, a Docker CMD, gunicorn workers all bind differently, and uvicorn binds only after
the lifespan has started), so it asks the kernel: right after startup, `check_bind` reads
this process's listening TCP sockets from `/proc/self/fd` and `/proc/self/net/tcp{,6}`, and an
open API bound to any non-loopback address logs why and exits with `EXIT_REFUSED`. Until then,
and as a second line whatever the platform, `OpenBindGuard` refuses (403) any request that
arrived on a non-loopback local address of an open API.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from functools import lru_cache
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from shared.settings import Settings

log = logging.getLogger("forklift.api")

EXIT_REFUSED = 78  # EX_CONFIG: a configuration error, not a crash
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _decode(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    # The kernel prints each 32-bit word in host order (little-endian here).
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, words)


def listening_addresses(proc: Path = Path("/proc/self")) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket this process listens on (Linux)."""
    inodes = set()
    for fd in os.listdir(proc / "fd"):
        try:
            target = os.readlink(proc / "fd" / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN or fields[9] not in inodes:
                continue
            addr, _, port = fields[1].partition(":")
            found.append((_decode(addr, v6), int(port, 16)))
    return found


@lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback; names and unparsable hosts are not."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def refused(settings: Settings) -> bool:
    """Does this configuration forbid serving non-loopback clients?

    A container published on loopback only (`published_address`) reaches no other machine,
    whatever it listens on inside.
    """
    if settings.api_keys or settings.allow_open:
        return False
    return not (settings.published_address and is_loopback(settings.published_address))


def refusal_message(addresses: list[tuple[str, int]]) -> str:
    where = ", ".join(f"{a}:{p}" for a, p in addresses)
    return (
        f"refusing to serve an open API on {where}: FORKLIFT_API_KEYS is not set, so anyone"
        " who reaches the address could use it. Set FORKLIFT_API_KEYS, bind (or, in compose,"
        " publish with FORKLIFT_BIND_ADDRESS) 127.0.0.1, or set FORKLIFT_ALLOW_OPEN=true if a"
        " network boundary keeps others out"
    )


async def check_bind(settings: Settings, wait_s: float = 30.0, every_s: float = 0.02) -> None:
    """Once the server listens, exit the process if an open API listens beyond loopback."""
    if not refused(settings):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            addresses = listening_addresses()
        except OSError as exc:  # no /proc: OpenBindGuard still refuses network clients
            log.info("cannot read this process's sockets (%s); per-request guard only", exc)
            return
        if addresses or loop.time() > deadline:
            break
        await asyncio.sleep(every_s)
    exposed = [(a, p) for a, p in addresses if not is_loopback(a)]
    if exposed:
        log.error(refusal_message(exposed))
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(EXIT_REFUSED)


class OpenBindGuard:
    """403 for a request that reached an open API through a non-loopback local address."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.active = refused(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") if self.active and scope["type"] == "http" else None
        if server and not is_loopback(str(server[0])):
            answer = error_response(
                403,
                "open_api_not_exposed",
                "this API runs without keys and serves loopback clients only"
                " (FORKLIFT_API_KEYS, FORKLIFT_ALLOW_OPEN)",
            )
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)

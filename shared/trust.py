"""What this stack believes of names and addresses it reads from Redis or from a message.

Redis (job records, queue messages, array and replica records, heartbeats) is reachable from
every host of a multi-host stack, so whoever reaches it can rewrite a segment name or the API
address an array record points to. Nothing read there is used before it passes a check here:

- a **segment name** (an array record's, a replica record's, a message's `ArrayRef.segment`)
  must be exactly a name this stack writes for that array: `<FORKLIFT_SHM_PREFIX><id>` for an
  array, `<FORKLIFT_SHM_PREFIX><id>_r` for a replica, the id 32 lowercase hex digits (a uuid4
  hex, `array_id`). Pooled segments (`<prefix>pool_*`) never appear in a record: the pool
  renames one to the array's own name before it is recorded. So no other prefix, no '/', no
  '..', no other array's segment, and nothing is opened, stat'ed, renamed or unlinked first;
- a **peer API URL** (an array record's `api_url`, where another domain's array is read
  from, with this stack's internal token) must be one of `FORKLIFT_PEER_URLS` or this
  domain's own `FORKLIFT_API_INTERNAL_URL`, compared normalized (scheme and host in lower
  case, default port spelled out, no trailing '/'); the URL is not connected to otherwise.
  Heartbeats carry an `api_url` too, but it is only shown (GET /cluster), never fetched.

A refusal raises `Untrusted` (its message names the check and the setting) and is logged as a
security warning on `forklift.security`; the caller turns it into the job's error or the
API's answer.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # settings.py reads peer URLs with `normalized_url`
    from shared.settings import Settings

log = logging.getLogger("forklift.security")

ARRAY_ID = re.compile(r"[0-9a-f]{32}")
REPLICA_SUFFIX = "_r"


class Untrusted(Exception):
    """A name or address read from Redis or a message failed its check; `check` names it
    (`segment_name`, `array_id`, `peer_url`)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check
        self.message = message


def _refuse(check: str, message: str) -> Untrusted:
    log.warning("security: refused by the %s check: %s", check, message, extra={"check": check})
    return Untrusted(check, f"refused by the {check.replace('_', ' ')} check: {message}")


def array_id(value: object, *, where: str) -> str:
    """`value` if it is an id this stack makes (32 lowercase hex), else Untrusted."""
    if not isinstance(value, str) or not ARRAY_ID.fullmatch(value):
        raise _refuse("array_id", f"array id {str(value)[:80]!r} from {where} is not 32 hex digits")
    return value


def segment(
    name: object, array: object, settings: Settings, *, where: str, replica: bool = False
) -> str:
    """`name` if it is exactly the segment this stack writes for array `array` (its replica's
    with `replica`), else Untrusted: nothing of that name is touched."""
    ident = array_id(array, where=where)
    expected = f"{settings.shm_prefix}{ident}{REPLICA_SUFFIX if replica else ''}"
    if name != expected:
        raise _refuse(
            "segment_name",
            f"segment {str(name)[:120]!r} from {where} is not this stack's name for array"
            f" {ident} ({expected!r}: FORKLIFT_SHM_PREFIX={settings.shm_prefix!r})",
        )
    return expected


def normalized_url(url: str) -> str:
    """`scheme://host:port/path` with scheme and host in lower case, the port spelled out and
    no trailing '/'; ValueError for anything but a plain http(s) base URL."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http:// and https:// URLs")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: no user or password in the URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no query or fragment")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"{url!r}: no host")
    port = parts.port or (443 if scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{parts.path.rstrip('/')}"


def allowed_peers(settings: Settings) -> set[str]:
    """The APIs this process may fetch arrays from: FORKLIFT_PEER_URLS and its own."""
    peers = set(settings.peer_urls)
    if settings.api_internal_url:
        with contextlib.suppress(ValueError):  # e.g. a user in it: then it is no peer
            peers.add(normalized_url(settings.api_internal_url))
    return peers


def peer_url(url: str, settings: Settings, *, where: str) -> str:
    """`url` if it is a configured peer's API (see the module's docstring), else Untrusted:
    nothing is connected to."""
    try:
        normal = normalized_url(url)
    except ValueError as exc:
        raise _refuse("peer_url", f"API URL from {where}: {exc}") from None
    if normal not in allowed_peers(settings):
        raise _refuse(
            "peer_url",
            f"API URL {url[:200]!r} from {where} is not one of FORKLIFT_PEER_URLS"
            f" ({', '.join(settings.peer_urls) or 'empty'}) nor this domain's"
            " FORKLIFT_API_INTERNAL_URL",
        )
    return url

"""A Server-Sent Events parser fed one line at a time (sync and async clients share it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from forklift.errors import error_from_response


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str


class SseParser:
    """`feed(line)` returns an event when a blank line completes one, else None.

    Comment lines (`: keep-alive`), `id:` and `retry:` fields are skipped.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def event_item(name: str, data: str) -> dict[str, Any] | None:
    """The dict a client yields for one event: `{"event": name, **data}`; error events raise."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    if name == "error":
        raise error_from_response(404, data.encode())
    if not isinstance(payload, dict):
        return None
    return {"event": name, **payload}

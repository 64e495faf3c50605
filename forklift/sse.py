"""A Server-Sent Events parser fed one line at a time (sync and async clients share it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from forklift.errors import error_from_response
from shared.schemas import JobView, Progress


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


def event_item(name: str, data: str) -> JobView | Progress | None:
    """What a client yields for one event: the `JobView` of a `status` event, the `Progress`
    of a `progress` one; None for what it does not know; an `error` event raises."""
    try:
        payload: Any = json.loads(data)
    except ValueError:
        return None
    if name == "error":
        raise error_from_response(404, data.encode())
    if not isinstance(payload, dict):
        return None
    if name == "status":
        return JobView.model_validate(payload)
    if name == "progress" and isinstance(payload.get("progress"), dict):
        return Progress.model_validate(payload["progress"])
    return None

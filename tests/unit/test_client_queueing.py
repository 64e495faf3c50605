"""The queue fields both clients and the command send: priority, delay / not_before, retries,
tags, on `submit`, `submit_job`, a batch's jobs and `map`.

The server is an httpx `MockTransport` recording each request; what the real API does with
the fields is tests/integration/test_priority_delay.py's. Bad values are refused by the
client (ValueError; the command exits 2) before anything is sent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from forklift import ArrayInput, Client, cli, common
from tests.clients import Recorded, posted, recording_client

A = ArrayInput(array="a" * 32)


def _view(entry: dict[str, Any], status: str = "queued") -> dict[str, Any]:
    return {
        "id": entry.get("id") or uuid.uuid4().hex,
        "task": entry.get("task", "x"),
        "status": status,
        "params": entry.get("params", {}),
        "inputs": {},
        "created_at": 1.0,
        "result": 7 if status == "succeeded" else None,
        "priority": entry.get("priority", 0),
        "tags": entry.get("tags", {}),
    }


def _server(recorded: Recorded) -> Callable[[httpx.Request], httpx.Response]:
    """POST /jobs and /jobs/batch: queued views; POST /jobs/wait: each id succeeded;
    GET /tasks/<name>: a task with input `a` (the command asks it)."""

    def handle(request: httpx.Request) -> httpx.Response:
        body: Any = json.loads(request.content) if request.content else None
        recorded.append((request.method, request.url.path, body))
        path = request.url.path
        if path == "/jobs" and request.method == "POST":
            return httpx.Response(202, json=_view(body))
        if path == "/jobs/batch":
            return httpx.Response(202, json={"jobs": [_view(e) for e in body["jobs"]]})
        if path == "/jobs/wait":
            views = [_view({"id": i}, "succeeded") for i in body["ids"]]
            return httpx.Response(200, json={"jobs": views})
        if path.startswith("/tasks/"):
            name = path.rsplit("/", 1)[1]
            info = {"name": name, "doc": "", "params_schema": {}, "inputs": {"a": {}}}
            return httpx.Response(200, json=info)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    return handle


@pytest.fixture
def fl(kind: str, recorded: Recorded) -> Iterator[Client]:
    with recording_client(kind, _server(recorded)) as client:
        yield client


QUEUE_FIELDS = {"priority", "delay", "not_before", "retries", "tags"}


def test_the_fields_are_sent_as_given_and_only_when_given(fl: Client, recorded: Recorded) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    fl.submit("sum", a=A)
    fl.submit("sum", a=A, priority=9, delay=1.5, retries=2, tags={"team": "geo", "run": "7"})
    fl.submit("sum", a=A, delay=timedelta(minutes=2), priority=0)
    fl.submit_job("sum", {"a": A}, not_before=at, time_limit=5)
    fl.submit_job("sum", {"a": A}, not_before=1_900_000_000.5, tags={})
    plain, full, minutes, aware, unix = posted(recorded, "/jobs")
    assert not QUEUE_FIELDS & set(plain)
    assert {k: full[k] for k in QUEUE_FIELDS & set(full)} == {
        "priority": 9,
        "delay": 1.5,
        "retries": 2,
        "tags": {"team": "geo", "run": "7"},
    }
    assert minutes["delay"] == 120.0 and minutes["priority"] == 0
    assert aware["not_before"] == "2030-01-02T03:04:05+02:00" and aware["timeout"] == 5
    assert unix["not_before"] == 1_900_000_000.5 and unix["tags"] == {}
    assert "delay" not in aware and "delay" not in unix


def test_a_param_named_like_a_field_goes_in_the_mapping(fl: Client, recorded: Recorded) -> None:
    fl.submit("fib", {"priority": "p", "tags": 3}, priority=4)
    (body,) = posted(recorded, "/jobs")
    assert body["params"] == {"priority": "p", "tags": 3} and body["priority"] == 4


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 1.0}, "priority"),
        ({"delay": -0.5}, "delay"),
        ({"delay": float("nan")}, "delay"),
        ({"delay": common.MAX_DELAY_S + 1}, "delay"),
        ({"delay": "soon"}, "delay"),
        ({"delay": 1, "not_before": 2.0}, "not both"),
        ({"not_before": datetime(2030, 1, 1)}, "naive"),
        ({"not_before": "2030-01-01"}, "not_before"),
        ({"retries": 26}, "retries"),
        ({"retries": -1}, "retries"),
        ({"tags": {"a b": "c"}}, "tag key"),
        ({"tags": {"k": "v" * 201}}, "at most 200"),
        ({"tags": {str(i): "x" for i in range(17)}}, "at most 16 tags"),
    ],
)
def test_bad_fields_are_refused_before_anything_is_sent(
    fl: Client, recorded: Recorded, fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fl.submit("sum", a=A, **fields)
    with pytest.raises(ValueError, match=match), fl.batch() as batch:
        batch.submit_job("sum", {"a": A}, **fields)
    with pytest.raises(ValueError, match=match):
        fl.map("sum", [{"a": A}], **fields)
    assert recorded == []


def test_each_job_of_a_batch_has_its_own_fields(fl: Client, recorded: Recorded) -> None:
    with fl.batch() as batch:
        first = batch.submit("normalize", a=A, priority=3, tags={"step": "1"})
        batch.submit_job("sum", {"a": first}, delay=2.0, retries=0)
        batch.submit("sum", a=A)
    ((one, two, three),) = (body["jobs"] for body in posted(recorded, "/jobs/batch"))
    assert (one["priority"], one["tags"]) == (3, {"step": "1"}) and "delay" not in one
    assert (two["delay"], two["retries"], two["inputs"]) == (2.0, 0, {"a": {"job": "#0"}})
    assert not QUEUE_FIELDS & set(three)


def test_map_gives_every_job_the_same_fields(fl: Client, recorded: Recorded) -> None:
    at = datetime.now(UTC) + timedelta(seconds=5)
    results = fl.map("sum", [{"a": A}, {"a": A}], priority=7, not_before=at, tags={"m": "1"})
    assert results == [7, 7]
    ((one, two),) = (body["jobs"] for body in posted(recorded, "/jobs/batch"))
    for body in (one, two):
        assert body["priority"] == 7 and body["tags"] == {"m": "1"}
        assert body["not_before"] == at.isoformat()


# -- the command ---------------------------------------------------------------------------


@pytest.fixture
def command_posts(monkeypatch: pytest.MonkeyPatch, recorded: Recorded) -> Recorded:
    """`forklift` run in this process against the recording server."""
    transport = httpx.MockTransport(_server(recorded))
    monkeypatch.setattr(cli, "_client", lambda: Client("http://forklift.test", transport=transport))
    return recorded


def test_the_command_sends_the_fields(command_posts: Recorded) -> None:
    argv = ["submit", "sum", f"a={A.array}", "--priority", "9", "--delay", "2.5"]
    argv += ["--retries", "1", "--tag", "team=geo", "--tag", "url:http://x/?a=b"]
    assert cli.main(argv) == 0
    assert cli.main(["submit", "fib", "n=3", "--not-before", "2030-01-02T03:04:05"]) == 0
    assert cli.main(["submit", "fib", "n=3", "--not-before", "2030-01-02T03:04:05+01:00"]) == 0
    assert cli.main(["submit", "fib", "n=3", "--not-before", "1900000000"]) == 0
    assert cli.main(["submit", "fib", "n=3"]) == 0
    full, naive, offset, unix, plain = posted(command_posts, "/jobs")
    assert full["inputs"] == {"a": {"array": A.array}}
    assert {k: full[k] for k in QUEUE_FIELDS & set(full)} == {
        "priority": 9,
        "delay": 2.5,
        "retries": 1,
        "tags": {"team": "geo", "url": "http://x/?a=b"},
    }
    assert naive["not_before"] == "2030-01-02T03:04:05+00:00"  # no offset: UTC, as the API
    assert offset["not_before"] == "2030-01-02T03:04:05+01:00"
    assert unix["not_before"] == 1_900_000_000.0
    assert not QUEUE_FIELDS & set(plain)


@pytest.mark.parametrize(
    "options",
    [
        ["--priority", "10"],
        ["--priority", "high"],
        ["--delay", "-1"],
        ["--retries", "-2"],
        ["--not-before", "tomorrow"],
        ["--delay", "1", "--not-before", "1900000000"],
        ["--tag", "novalue"],
        ["--tag", "=v"],
        ["--tag", "k=1", "--tag", "k=2"],
        ["--tag", "bad key=v"],
    ],
)
def test_the_command_refuses_bad_fields_before_it_asks_the_server(options: list[str]) -> None:
    nowhere = "http://127.0.0.1:9"  # nothing is asked: a request here would exit 4
    assert cli.main(["--url", nowhere, "submit", "fib", "n=3", *options]) == 2


def test_status_shows_a_delayed_jobs_time_and_its_priority() -> None:
    view = _view({"task": "fib", "priority": 9}) | {"not_before": 4_102_444_800.0}
    assert "not before 2100-01-01 00:00:00 UTC  priority 9" in cli._describe_status(view)
    started = view | {"status": "running", "not_before": 1.0, "priority": 0}
    assert "not before" not in cli._describe_status(started)
    assert "priority" not in cli._describe_status(started)

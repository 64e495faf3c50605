"""Idempotent submission: the same `Idempotency-Key` gives one job, however often it is sent.

Against the session's stack over HTTP, and a second API process on it (same Redis, prefix
and worker) with two API keys and FORKLIFT_IDEMPOTENCY_TTL=2, for the TTL and the owners. A
job's "one record" is checked on its owner's index (`keys.jobs_by_owner`): the API's own
count of the jobs an owner has, which a second create would grow.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import Response

from api import idempotency, submissions
from api.errors import ApiError
from api.owners import owner_id
from forklift import Client
from shared.schemas import JobStatus, JobSubmission, JobView
from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.redis_proxy import RedisProxy

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers

KEY_A = f"ka-{uuid.uuid4().hex}"
KEY_B = f"kb-{uuid.uuid4().hex}"
TTL = 2


def _owner_jobs(live: Stack, owner: str = "") -> int:
    return int(live.redis.zcard(Settings.from_env(live.env).keys.jobs_by_owner(owner)))


def _run_body(log: Path, tag: str, seconds: float = 0.0) -> dict:
    return {"task": "record_run", "params": {"log": str(log), "tag": tag, "seconds": seconds}}


def _runs(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []


def _post(http: httpx.Client, key: str | bytes, body: dict, path: str = "/jobs") -> httpx.Response:
    return http.post(path, json=body, headers={"Idempotency-Key": key})


@dataclass
class Short:
    url: str

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=30, headers={"authorization": f"Bearer {key}"}
        )


@pytest.fixture(scope="module")
def short(live: Stack) -> Iterator[Short]:
    """An API on the session's stack with two keys and a 2 s idempotency TTL."""
    env = dict(live.env, FORKLIFT_API_KEYS=f"{KEY_A},{KEY_B}", FORKLIFT_IDEMPOTENCY_TTL=str(TTL))
    api, url = stack.start_api(env, proc_name="api-idempotency")
    try:
        yield Short(url)
    finally:
        api.stop()


def test_same_key_twice_gives_one_job(live: Stack, http: httpx.Client, tmp_path: Path) -> None:
    """~0.3 s. The second answer is 200 with the same id and the job's current view."""
    log, key = tmp_path / "runs", uuid.uuid4().hex
    before = _owner_jobs(live)
    first = _post(http, key, _run_body(log, "once"))
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    job_id = first.json()["id"]
    again = _post(http, key, _run_body(log, "once"))
    assert again.status_code == 200, again.text
    assert again.json()["id"] == job_id
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/jobs/{job_id}"
    assert http.get(f"/jobs/{job_id}", params={"wait": 30}).json()["status"] == "succeeded"
    late = _post(http, key, _run_body(log, "once"))  # the current view: ended now
    assert late.status_code == 200 and late.json()["id"] == job_id
    assert late.json()["status"] == "succeeded" and late.json()["result"] == "once"
    assert _owner_jobs(live) - before == 1
    assert [line.split()[:2] for line in _runs(log)] == [["done", "once"]]


def test_same_key_sent_concurrently_gives_one_job(
    live: Stack, http: httpx.Client, tmp_path: Path
) -> None:
    """~0.3 s. Eight requests at once, released by a barrier: one 202, seven 200, one id."""
    log, key = tmp_path / "runs", uuid.uuid4().hex
    before = _owner_jobs(live)
    barrier = threading.Barrier(8)

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=live.url, timeout=30) as own:
            barrier.wait()
            return _post(own, key, _run_body(log, "race"))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [202], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    job_id = answers[0].json()["id"]
    assert http.get(f"/jobs/{job_id}", params={"wait": 30}).json()["status"] == "succeeded"
    assert _owner_jobs(live) - before == 1
    assert len(_runs(log)) == 1


def test_same_key_with_another_body_is_422_and_queues_nothing(
    live: Stack, http: httpx.Client, tmp_path: Path
) -> None:
    """~0.1 s."""
    key = uuid.uuid4().hex
    first = _post(http, key, _run_body(tmp_path / "runs", "a"))
    assert first.status_code == 202, first.text
    before = _owner_jobs(live)
    other = _post(http, key, _run_body(tmp_path / "runs", "b"))
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    batch = _post(http, key, {"jobs": [_run_body(tmp_path / "runs", "a")]}, "/jobs/batch")
    assert batch.status_code == 422 and batch.json()["error"]["code"] == "idempotency_key_reused"
    assert _owner_jobs(live) == before
    http.get(f"/jobs/{first.json()['id']}", params={"wait": 30})


@pytest.mark.parametrize(
    "key", ["", "x" * 201, "caf\u00e9".encode(), b"tab\there"], ids=["empty", "long", "utf8", "tab"]
)
def test_bad_keys_are_refused_and_queue_nothing(
    live: Stack, http: httpx.Client, tmp_path: Path, key: str | bytes
) -> None:
    """~0.05 s each."""
    before = _owner_jobs(live)
    response = _post(http, key, _run_body(tmp_path / "runs", "bad"))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert "Idempotency-Key" in response.json()["error"]["message"]
    assert _owner_jobs(live) == before


def test_longest_key_is_accepted(http: httpx.Client, tmp_path: Path) -> None:
    key = "k" * 199 + "~"
    first = _post(http, key, _run_body(tmp_path / "runs", "long"))
    assert first.status_code == 202, first.text
    assert _post(http, key, _run_body(tmp_path / "runs", "long")).json()["id"] == first.json()["id"]
    http.get(f"/jobs/{first.json()['id']}", params={"wait": 30})


def test_batch_with_the_same_key_gives_the_same_jobs_in_order(
    live: Stack, http: httpx.Client, tmp_path: Path
) -> None:
    """~0.3 s."""
    log, key = tmp_path / "runs", uuid.uuid4().hex
    body = {"jobs": [_run_body(log, f"b{i}") for i in range(3)]}
    before = _owner_jobs(live)
    first = _post(http, key, body, "/jobs/batch")
    assert first.status_code == 202, first.text
    ids = [job["id"] for job in first.json()["jobs"]]
    again = _post(http, key, body, "/jobs/batch")
    assert again.status_code == 200, again.text
    assert [job["id"] for job in again.json()["jobs"]] == ids
    done = http.post("/jobs/wait", json={"ids": ids, "wait": 30}).json()["jobs"]
    assert [job["result"] for job in done] == ["b0", "b1", "b2"]
    assert _owner_jobs(live) - before == 3
    assert sorted(line.split()[1] for line in _runs(log)) == ["b0", "b1", "b2"]


def test_a_refused_submission_leaves_the_key_free(
    live: Stack, http: httpx.Client, tmp_path: Path
) -> None:
    """~0.1 s. The first request with the key fails validation: the key made nothing, so the
    next request with it (another body) is a fresh submission."""
    key = uuid.uuid4().hex
    bad = _post(http, key, {"task": "no_such_task"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "unknown_task"
    good = _post(http, key, _run_body(tmp_path / "runs", "after"))
    assert good.status_code == 202, good.text
    http.get(f"/jobs/{good.json()['id']}", params={"wait": 30})


def test_a_key_whose_job_is_gone_is_409(live: Stack, http: httpx.Client, tmp_path: Path) -> None:
    """~0.2 s. The record removed while the key lives (deleted, or expired after
    FORKLIFT_JOB_TTL): 409, never a second job under the key."""
    key = uuid.uuid4().hex
    first = _post(http, key, _run_body(tmp_path / "runs", "gone"))
    job_id = first.json()["id"]
    assert http.get(f"/jobs/{job_id}", params={"wait": 30}).json()["status"] == "succeeded"
    settings = Settings.from_env(live.env)
    live.redis.delete(settings.keys.job(job_id))
    before = _owner_jobs(live)
    again = _post(http, key, _run_body(tmp_path / "runs", "gone"))
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "idempotency_job_gone"
    assert again.json()["error"]["detail"]["gone"] == [job_id]
    assert _owner_jobs(live) == before


def test_after_the_ttl_the_key_makes_a_new_job(live: Stack, short: Short, tmp_path: Path) -> None:
    """~2.2 s (TTL 2 s, set by FORKLIFT_IDEMPOTENCY_TTL on the second API)."""
    key, body = uuid.uuid4().hex, _run_body(tmp_path / "runs", "ttl")
    with short.client(KEY_A) as a:
        first = _post(a, key, body)
        assert first.status_code == 202, first.text
        started = time.monotonic()
        again = _post(a, key, body)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        time.sleep(max(0.0, TTL + 0.2 - (time.monotonic() - started)))
        late = _post(a, key, body)
        assert late.status_code == 202, late.text
        assert late.json()["id"] != first.json()["id"]
        for job in (first, late):
            a.get(f"/jobs/{job.json()['id']}", params={"wait": 30})
    assert len(_runs(tmp_path / "runs")) == 2


def test_owners_with_the_same_key_get_their_own_jobs(
    live: Stack, short: Short, tmp_path: Path
) -> None:
    """~0.2 s. The key is per API key: B's request with A's key is B's own first one."""
    key, body = uuid.uuid4().hex, _run_body(tmp_path / "runs", "owners")
    before = {k: _owner_jobs(live, owner_id(k)) for k in (KEY_A, KEY_B)}
    with short.client(KEY_A) as a, short.client(KEY_B) as b:
        from_a, from_b = _post(a, key, body), _post(b, key, body)
        assert (from_a.status_code, from_b.status_code) == (202, 202), (from_a.text, from_b.text)
        assert from_a.json()["id"] != from_b.json()["id"]
        assert _post(b, key, body).json()["id"] == from_b.json()["id"]
        assert b.get(f"/jobs/{from_a.json()['id']}").status_code == 404
        a.get(f"/jobs/{from_a.json()['id']}", params={"wait": 30})
        b.get(f"/jobs/{from_b.json()['id']}", params={"wait": 30})
    assert {k: _owner_jobs(live, owner_id(k)) - before[k] for k in before} == {KEY_A: 1, KEY_B: 1}


class FirstAnswerLost(RedisProxy):
    """A TCP proxy to the API (the Redis proxy forwards any TCP) that cuts the connection
    instead of delivering the first answer starting with `status`: the request was handled,
    its answer never arrives, what a network cut or a proxy restart does."""

    def __init__(self, api_url: str, status: bytes) -> None:
        self.status = b"HTTP/1.1 " + status
        self.cut = 0
        self.lock = threading.Lock()
        super().__init__(api_url.replace("http://", "redis://"))

    @property
    def api_url(self) -> str:
        return self.url().replace("redis://", "http://").removesuffix("/0")

    def reply(self, chunk: bytes, connection: dict[str, object]) -> bool:
        with self.lock:
            if self.cut == 0 and chunk.startswith(self.status):
                self.cut += 1
                return False
        return True


@pytest.mark.parametrize("batch", [False, True], ids=["submit", "map"])
def test_client_retries_through_a_lost_answer_without_a_second_job(
    live: Stack, tmp_path: Path, batch: bool
) -> None:
    """~0.5 s each. The answer to the first `POST /jobs` (`/jobs/batch`) is lost: the client
    sends it again with the same key and gets the job the first one made."""
    log = tmp_path / "runs"
    proxy = FirstAnswerLost(live.url, b"202")
    before = _owner_jobs(live)
    try:
        with Client(proxy.api_url, timeout=10) as fl:
            if batch:
                params = [_run_body(log, f"m{i}")["params"] for i in range(2)]
                assert fl.map("record_run", params, timeout=30) == ["m0", "m1"]
            else:
                assert fl.submit("record_run", log=str(log), tag="lost").result(30) == "lost"
    finally:
        proxy.close()
    assert proxy.cut == 1
    assert _owner_jobs(live) - before == (2 if batch else 1)
    assert len(_runs(log)) == (2 if batch else 1)


def test_client_takes_the_callers_key(live: Stack, tmp_path: Path) -> None:
    """~0.3 s. `idempotency_key=`: two submits with one key are one job."""
    key, log = uuid.uuid4().hex, tmp_path / "runs"
    with Client(live.url, timeout=10) as fl:
        first = fl.submit("record_run", log=str(log), tag="mine", idempotency_key=key)
        second = fl.submit("record_run", log=str(log), tag="mine", idempotency_key=key)
        assert first.id == second.id
        assert second.result(30) == "mine"
    assert len(_runs(log)) == 1


def test_the_header_is_documented(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/jobs", "/jobs/batch"):
        op = paths[path]["post"]
        (header,) = [p for p in op["parameters"] if p["name"] == "Idempotency-Key"]
        assert header["in"] == "header" and not header.get("required")
        assert "Idempotent-Replayed" in op["responses"]["200"]["headers"]
        assert {"200", "202", "409", "422"} <= set(op["responses"])


class _Submissions:
    """`submissions.submit` stood in for: each call takes `seconds`, the first `fail` calls
    raise (what a record script's refusal or a broker outage does after the claim), and
    records are kept in memory, read back by the `jobs.get_many` of the fake state."""

    def __init__(self, seconds: float, fail: int = 0) -> None:
        self.seconds, self.fail, self.calls = seconds, fail, 0
        self.made: dict[str, Any] = {}

    async def submit(self, state: Any, jobs: list[submissions.Prepared], owner: str) -> Any:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        if self.calls <= self.fail:
            raise ApiError(503, "unavailable", "the broker is unavailable")
        views = []
        for job in jobs:
            view = JobView(
                id=job.job_id, task="fib", status=JobStatus.queued, params={}, inputs={},
                created_at=time.time(),
            )  # fmt: skip
            self.made[job.job_id] = SimpleNamespace(owner=owner, view=lambda v=view: v)
            views.append(view)
        return views

    async def get_many(self, ids: list[str]) -> list[Any]:
        return [self.made.get(i) for i in ids]


async def _race(live: Stack, fake: _Submissions, count: int) -> list[Any]:
    """`count` requests with one key, 50 ms apart, through `idempotency.submit`: each one's
    (status, id) or its ApiError code."""
    client = aioredis.Redis.from_url(live.env["REDIS_URL"], decode_responses=True)
    state: Any = SimpleNamespace(settings=Settings.from_env(live.env), redis=client, jobs=fake)
    body, key = JobSubmission(task="fib", params={"n": 3}), uuid.uuid4().hex

    async def prepare() -> list[submissions.Prepared]:
        return [submissions.Prepared(body=body, params={"n": 3}, inputs={})]

    async def one(delay: float) -> Any:
        await asyncio.sleep(delay)
        response = Response(status_code=202)
        try:
            (view,) = await idempotency.submit(state, "", key, body, prepare, response)
        except ApiError as exc:
            return exc.code
        return response.status_code, view.id

    try:
        return await asyncio.gather(*(one(0.05 * i) for i in range(count)))
    finally:
        await client.delete(state.settings.keys.idempotency("", idempotency.sha256_hex(key)))
        await client.aclose()


def test_a_failed_first_request_frees_the_key_for_those_waiting(
    live: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~0.7 s. The first request's submission fails after it took the claim: it deletes its
    claim, and of the two that waited, one submits afresh and the other gets that job."""
    fake = _Submissions(seconds=0.3, fail=1)
    monkeypatch.setattr(submissions, "submit", fake.submit)
    first, *others = asyncio.run(_race(live, fake, 3))
    assert first == "unavailable"
    assert sorted(status for status, _ in others) == [200, 202]
    assert len({job_id for _, job_id in others}) == 1 and fake.calls == 2


def test_a_request_still_under_way_past_the_wait_is_409(
    live: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~0.6 s (the wait shortened to 0.2 s). The waiting one gets 409 with Retry-After; the
    first one's job is there after, for whoever asks again."""
    fake = _Submissions(seconds=0.6)
    monkeypatch.setattr(submissions, "submit", fake.submit)
    monkeypatch.setattr(idempotency, "WAIT_S", 0.2)
    first, second = asyncio.run(_race(live, fake, 2))
    assert first[0] == 202 and second == "idempotency_key_in_use"
    assert fake.calls == 1

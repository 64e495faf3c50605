"""GET /jobs (pages, filters, owners), POST /jobs/cancel, and DELETE of a finished job.

A private stack (the session's Redis, its own key prefix, worker and keyed API): bulk cancel
needs every worker child busy, and listing by owner needs two keys. Each test still tags its
jobs with a unique value and filters by it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from api.owners import owner_id
from forklift import Client
from forklift.errors import InvalidRequest, NotFound
from shared.joblist import JobFilter, JobLister, trim_owner_indexes
from shared.jobstore import JobStore
from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.http_api import npy_bytes, upload, wait

KEY_A = f"ka-{uuid.uuid4().hex}"
KEY_B = f"kb-{uuid.uuid4().hex}"
FINAL = {"succeeded", "failed", "cancelled"}
FORKLIFT = Path(sys.executable).with_name("forklift")


@dataclass
class Priv:
    env: dict[str, str]
    url: str
    redis: redis.Redis

    @property
    def prefix(self) -> str:
        return self.env["FORKLIFT_KEY_PREFIX"]

    @property
    def shm_prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=30, headers={"authorization": f"Bearer {key}"}
        )

    def pins(self, array_id: str) -> int:
        return int(self.redis.hget(f"{self.prefix}:array:{array_id}", "pins") or 0)


@pytest.fixture(scope="module")
def priv(redis_url: str) -> Iterator[Priv]:
    env = stack.stack_env(
        redis_url, FORKLIFT_API_KEYS=f"{KEY_A},{KEY_B}", FORKLIFT_JANITOR_INTERVAL="2"
    )
    before = stack.segments(env["FORKLIFT_SHM_PREFIX"])
    procs: list[stack.Proc] = []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        procs.append(stack.start_worker(env, "joblist", concurrency=2))
        api, url = stack.start_api(env, proc_name="api-joblist")
        procs.append(api)
        yield Priv(env=env, url=url, redis=client)
    finally:
        for proc in reversed(procs):
            proc.stop()
        left = stack.segments(env["FORKLIFT_SHM_PREFIX"]) - before
        client.close()
        assert not left, f"leaked shared-memory segments: {sorted(left)}"


def _batch(http: httpx.Client, jobs: list[dict]) -> list[str]:
    response = http.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    return [j["id"] for j in response.json()["jobs"]]


def _fib(tags: dict[str, str], n: int = 3) -> dict:
    return {"task": "fib", "params": {"n": n}, "tags": tags}


def _upload(http: httpx.Client, arr: np.ndarray) -> str:
    response = http.post(
        "/arrays", content=npy_bytes(arr), headers={"content-type": "application/x-npy"}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _settle(http: httpx.Client, ids: list[str], within: float = 30) -> dict[str, dict]:
    """Every job's final view (long-polls POST /jobs/wait)."""
    deadline = time.monotonic() + within
    while True:
        body = {"ids": ids, "wait": 10}
        views = {v["id"]: v for v in http.post("/jobs/wait", json=body).json()["jobs"]}
        if all(v["status"] in FINAL for v in views.values()):
            return views
        assert time.monotonic() < deadline, {i: v["status"] for i, v in views.items()}


def _pages(http: httpx.Client, params: dict, between: object = None) -> list[list[dict]]:
    pages, cursor = [], None
    while True:
        response = http.get("/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["jobs"])
        cursor = body["next"]
        if cursor is None:
            return pages
        if callable(between):
            between()
        assert len(pages) < 50, "the pages never end"


def test_pages_list_every_job_once_while_jobs_are_submitted(priv: Priv) -> None:
    """250 jobs in pages of 100, 10 more submitted between pages: each of the 250 exactly
    once, newest first, none of the later ones, and none of another key's."""
    run = uuid.uuid4().hex
    with priv.client(KEY_A) as a, priv.client(KEY_B) as b:
        theirs = _batch(b, [_fib({"run": run}) for _ in range(5)])
        ours = _batch(a, [_fib({"run": run}) for _ in range(250)])
        later: list[str] = []
        pages = _pages(
            a,
            {"tag": f"run:{run}", "limit": 100},
            lambda: later.extend(_batch(a, [_fib({"run": run}) for _ in range(10)])),
        )
        listed = [j["id"] for page in pages for j in page]
        assert [len(p) for p in pages] == [100, 100, 50]
        assert len(listed) == len(set(listed)) == 250
        assert set(listed) == set(ours)
        assert not set(later) & set(listed) and len(later) == 20
        created = [j["created_at"] for page in pages for j in page]
        assert created == sorted(created, reverse=True)
        # B sees its five, never A's; A's full listing (no filter) never holds B's.
        seen_by_b = [j["id"] for p in _pages(b, {"tag": f"run:{run}"}) for j in p]
        assert sorted(seen_by_b) == sorted(theirs)
        everything = {j["id"] for p in _pages(a, {"limit": 1000}) for j in p}
        assert set(ours) | set(later) <= everything and not everything & set(theirs)
        _settle(a, ours + later, within=60)
        _settle(b, theirs)


def test_filters_by_status_task_tag_and_time(priv: Priv) -> None:
    run = uuid.uuid4().hex
    with priv.client(KEY_A) as a:
        x = _batch(a, [_fib({"run": run, "kind": "x"}) for _ in range(3)])
        y = _batch(a, [_fib({"run": run, "kind": "y"}) for _ in range(2)])
        (slept,) = _batch(
            a,
            [{"task": "sleep", "params": {"seconds": 0}, "tags": {"run": run, "kind": "x"}}],
        )
        (delayed,) = _batch(a, [{**_fib({"run": run}), "delay": 600}])
        _settle(a, x + y + [slept])
        assert a.delete(f"/jobs/{delayed}").json()["status"] == "cancelled"

        def ids(**params: object) -> set[str]:
            return {j["id"] for p in _pages(a, {"tag": f"run:{run}", **params}) for j in p}

        assert ids() == {*x, *y, slept, delayed}
        assert ids(status="succeeded") == {*x, *y, slept}
        assert ids(status="cancelled") == {delayed}
        assert ids(status="cancelled,succeeded") == ids(status=["cancelled", "succeeded"])
        assert ids(status=["cancelled", "succeeded"]) == {*x, *y, slept, delayed}
        assert ids(status="queued") == set()
        assert ids(task="sleep") == {slept}
        assert ids(task="fib", status="succeeded") == {*x, *y}
        assert ids(tag=[f"run:{run}", "kind:x"]) == {*x, slept}
        assert ids(tag=[f"run:{run}", "kind:x"], task="fib") == set(x)
        assert ids(tag=[f"run:{run}", "kind:nope"]) == set()
        views = {j["id"]: j for p in _pages(a, {"tag": f"run:{run}"}) for j in p}
        assert views[x[0]]["tags"] == {"run": run, "kind": "x"}
        # Batches one after the other: x, y, slept, delayed; a bound between two of them.
        after_x = (views[x[-1]]["created_at"] + views[y[0]]["created_at"]) / 2
        after_y = (views[y[-1]]["created_at"] + views[slept]["created_at"]) / 2
        assert ids(since=after_x) == {*y, slept, delayed}
        assert ids(until=after_y) == {*x, *y}
        assert ids(since=after_x, until=after_y) == set(y)
        assert ids(since=views[y[0]]["created_at"], until=views[y[0]]["created_at"]) == {y[0]}
        iso = datetime.fromtimestamp(after_x, UTC).isoformat()
        assert ids(since=iso) == {*y, slept, delayed}
        naive = datetime.fromtimestamp(after_y, UTC).replace(tzinfo=None).isoformat()
        assert ids(until=naive) == {*x, *y}
        assert ids(limit=2) == ids()  # pages of two, followed to the end


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "params, code",
    [
        ({"cursor": "not-a-cursor"}, "bad_cursor"),
        ({"cursor": _b64("[1, 2]")}, "bad_cursor"),  # base64 of JSON, not a position
        ({"cursor": _b64(f'[NaN, "{"0" * 32}"]')}, "bad_cursor"),
        ({"cursor": _b64(f'["1", "{"0" * 32}"]')}, "bad_cursor"),
        ({"limit": 1001}, None),
        ({"limit": 0}, None),
        ({"status": "finished"}, "bad_status"),
        ({"tag": "no-colon"}, "bad_tag"),
        ({"since": "yesterday"}, "bad_time"),
        ({"until": "nan"}, "bad_time"),
    ],
)
def test_bad_listing_queries_are_422_json(priv: Priv, params: dict, code: str | None) -> None:
    with priv.client(KEY_A) as a:
        response = a.get("/jobs", params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code


def test_bulk_cancel_by_tag_cancels_exactly_the_tagged_unfinished_jobs(priv: Priv) -> None:
    run = uuid.uuid4().hex
    before = stack.array_segments(priv.shm_prefix)
    with priv.client(KEY_A) as a, priv.client(KEY_B) as b:
        source = _upload(a, np.arange(1000.0))
        (done,) = _batch(a, [_fib({"cancel": run})])
        _settle(a, [done])

        def slow(tags: dict[str, str]) -> dict:
            inputs = {"a": {"array": source}}
            return {"task": "slow_copy", "params": {"seconds": 20}, "inputs": inputs, "tags": tags}

        # Two take both worker children; the rest queue behind them.
        tagged = _batch(a, [slow({"cancel": run, "n": str(i)}) for i in range(4)])
        other = _batch(a, [slow({"cancel": f"{run}-not"}), slow({"else": run})])
        b_source = _upload(b, np.arange(10.0))
        b_job = _batch(
            b,
            [
                {
                    "task": "slow_copy",
                    "params": {"seconds": 20},
                    "inputs": {"a": {"array": b_source}},
                    "tags": {"cancel": run},
                }
            ],
        )
        stack.wait_until(
            lambda: sum(a.get(f"/jobs/{i}").json()["status"] == "running" for i in tagged) == 2,
            15,
            what="two tagged jobs running",
        )
        assert priv.pins(source) == 6
        reply = a.post("/jobs/cancel", json={"tag": f"cancel:{run}"})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert sorted(body["cancelled"]) == sorted(tagged)
        assert body["skipped"] == [] and body["more"] is False
        assert a.get(f"/jobs/{done}").json()["status"] == "succeeded"
        assert {a.get(f"/jobs/{i}").json()["status"] for i in other} <= {"queued", "running"}
        assert b.get(f"/jobs/{b_job[0]}").json()["status"] in ("queued", "running")
        # By ids: the others; a finished one, an unknown one and B's are skipped, telling
        # nothing of B's job.
        unknown = uuid.uuid4().hex
        ids = [*other, done, unknown, b_job[0], "nonsense"]
        body = a.post("/jobs/cancel", json={"ids": ids}).json()
        assert sorted(body["cancelled"]) == sorted(other)
        assert body["skipped"] == [
            {"id": done, "status": "succeeded"},
            {"id": unknown, "status": "not_found"},
            {"id": b_job[0], "status": "not_found"},
            {"id": "nonsense", "status": "not_found"},
        ]
        assert b.post("/jobs/cancel", json={"ids": b_job}).json()["cancelled"] == b_job
        views = _settle(a, tagged + other)
        assert {v["status"] for v in views.values()} == {"cancelled"}
        _settle(b, b_job)
        stack.wait_until(lambda: priv.pins(source) == 0, 15, what="inputs released")
        assert priv.pins(b_source) == 0
        # Nothing left to cancel; a bad body is a 422 that cancels nothing.
        again = a.post("/jobs/cancel", json={"tag": f"cancel:{run}"}).json()
        assert again == {"cancelled": [], "skipped": [], "more": False}
        for bad in ({}, {"ids": [done], "tag": f"cancel:{run}"}, {"tag": "no-colon"}):
            response = a.post("/jobs/cancel", json=bad)
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["error"]["message"]
        assert a.delete(f"/arrays/{source}").status_code == 204
        assert b.delete(f"/arrays/{b_source}").status_code == 204
    stack.wait_arrays_freed(priv.shm_prefix, before)


def _segment_of(priv: Priv, array_id: str) -> bool:
    return f"{priv.shm_prefix}{array_id}" in stack.array_segments(priv.shm_prefix)


def test_delete_removes_a_finished_job_and_frees_its_unheld_result(priv: Priv) -> None:
    before = stack.array_segments(priv.shm_prefix)
    with priv.client(KEY_A) as a, priv.client(KEY_B) as b:
        source = _upload(a, np.arange(12.0).reshape(3, 4))
        summed = {"task": "sum", "params": {"axis": 0}, "inputs": {"a": {"array": source}}}
        first, second = _batch(a, [summed, summed])
        views = _settle(a, [first, second])
        kept = views[first]["result"]["array"]["id"]
        freed = views[second]["result"]["array"]["id"]
        assert _segment_of(priv, kept) and _segment_of(priv, freed)
        # `kept` is the input of a job still running when its own job's record is removed.
        (user,) = _batch(
            a,
            [{"task": "slow_copy", "params": {"seconds": 3}, "inputs": {"a": {"array": kept}}}],
        )
        stack.wait_until(
            lambda: a.get(f"/jobs/{user}").json()["status"] == "running", 15, what="running"
        )
        assert b.delete(f"/jobs/{second}").status_code == 404  # another key's: not found
        response = a.delete(f"/jobs/{second}")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == second and response.json()["status"] == "succeeded"
        assert a.get(f"/jobs/{second}").status_code == 404
        assert a.delete(f"/jobs/{second}").status_code == 404
        assert a.get(f"/arrays/{freed}/meta").status_code == 404
        assert not _segment_of(priv, freed)
        assert not priv.redis.exists(f"{priv.prefix}:job:{second}")
        for index in ("jobs", f"jobs:owner:{owner_id(KEY_A)}"):
            assert priv.redis.zscore(f"{priv.prefix}:{index}", second) is None
        listed = {j["id"] for j in a.get("/jobs", params={"limit": 1000}).json()["jobs"]}
        assert second not in listed and first in listed

        assert a.delete(f"/jobs/{first}").status_code == 200
        assert a.get(f"/jobs/{first}").status_code == 404
        assert _segment_of(priv, kept), "freed while another job's input"
        assert priv.pins(kept) == 1
        done = _settle(a, [user])[user]
        assert done["status"] == "succeeded"
        stack.wait_until(lambda: not _segment_of(priv, kept), 10, what="kept freed after use")
        # The source was an input, never a result: it stays until deleted.
        assert _segment_of(priv, source)
        assert a.delete(f"/jobs/{user}").status_code == 200
        assert a.delete(f"/arrays/{source}").status_code == 204
    stack.wait_arrays_freed(priv.shm_prefix, before)


def test_delete_of_an_unfinished_job_still_cancels(priv: Priv) -> None:
    with priv.client(KEY_A) as a:
        (job,) = _batch(a, [{**_fib({}), "delay": 600}])
        response = a.delete(f"/jobs/{job}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert a.get(f"/jobs/{job}").json()["status"] == "cancelled"  # cancelled, not removed
        assert a.delete(f"/jobs/{job}").status_code == 200  # now removed
        assert a.get(f"/jobs/{job}").status_code == 404


def test_janitor_trims_owner_indexes(redis_url: str) -> None:
    """Old ids leave each owner's index; an owner whose index empties leaves the set."""
    settings = Settings.from_env(stack.stack_env(redis_url))
    keys = settings.keys
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        now = time.time()
        client.zadd(keys.jobs_by_owner("old"), {"a" * 32: now - 100})
        client.zadd(keys.jobs_by_owner("mixed"), {"b" * 32: now - 100, "c" * 32: now})
        client.sadd(keys.jobs_owners, "old", "mixed")
        assert trim_owner_indexes(client, settings, now - 10) == 2
        assert client.smembers(keys.jobs_owners) == {"mixed"}
        assert client.zrange(keys.jobs_by_owner("mixed"), 0, -1) == ["c" * 32]
        assert not client.exists(keys.jobs_by_owner("old"))
    finally:
        client.delete(keys.jobs_by_owner("mixed"), keys.jobs_owners)
        client.close()


def test_client_and_cli_list_cancel_and_delete(priv: Priv) -> None:
    """`Client.jobs` pages through everything; `cancel_many` by tag; `Job.cancel` on a
    finished job answers False and removes nothing; `delete`; the CLI's three commands."""
    run = uuid.uuid4().hex
    with Client(priv.url, api_key=KEY_A) as client:
        jobs = [client.submit("fib", n=3, tags={"run": run}) for _ in range(5)]
        for job in jobs:
            assert job.result(30) == 2
        listed = [v.id for v in client.jobs(tag={"run": run}, page_size=2)]
        assert listed == [job.id for job in reversed(jobs)]
        assert [v.id for v in client.jobs(tag=f"run:{run}", limit=3)] == listed[:3]
        assert list(client.jobs(tag={"run": run}, status="failed")) == []
        assert jobs[0].cancel() is False
        assert jobs[0].status().status == "succeeded"  # cancel() never removes a record
        slow = client.submit("sleep", seconds=30, tags={"run": run, "slow": "1"}, delay=600)
        reply = client.cancel_many(tag={"run": run, "slow": "1"})
        assert (reply.cancelled, reply.skipped, reply.more) == ([slow.id], [], False)
        assert jobs[1].delete().id == jobs[1].id
        with pytest.raises(NotFound):
            jobs[1].status()
        queued = client.submit("fib", n=3, tags={"run": run}, delay=600)
        with pytest.raises(InvalidRequest):
            queued.delete()  # not finished: never cancelled by delete()
        assert queued.status().status == "queued"

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            command = [str(FORKLIFT), "--url", priv.url, "--api-key", KEY_A, *argv]
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        done = cli("jobs", "--tag", f"run={run}", "--status", "succeeded", "--json")
        assert done.returncode == 0, done.stderr
        kept = [jobs[4], jobs[3], jobs[2], jobs[0]]  # jobs[1] was deleted
        assert [v["id"] for v in json.loads(done.stdout)] == [j.id for j in kept]
        done = cli("jobs", "--tag", f"run:{run}", "--task", "sleep")
        assert done.returncode == 0 and slow.id in done.stdout and "cancelled" in done.stdout
        done = cli("cancel", "--tag", f"run={run}", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["cancelled"] == [queued.id]
        done = cli("delete-job", jobs[2].id)
        assert done.returncode == 0 and f"{jobs[2].id} deleted" in done.stdout, done.stderr
        assert cli("delete-job", jobs[2].id).returncode == 3  # not found
        assert cli("cancel").returncode == 2


def test_the_store_pages_by_position_through_ties_gaps_and_a_bounded_scan(redis_url: str) -> None:
    """JobLister on records of its own prefix: equal scores ordered by id, an id that left
    the index still a valid cursor, expired ids skipped and dropped, and a scan bound that
    answers an empty page with a cursor. (~0.1 s)"""
    settings = Settings.from_env(stack.stack_env(redis_url))

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = JobStore(client, settings)
        lister = JobLister(store)
        index = settings.keys.jobs_by_owner("o")
        try:
            ids = [uuid.uuid4().hex for _ in range(30)]
            for i, job_id in enumerate(ids):
                tags = json.dumps({"k": "old" if i < 3 else "new"})
                assert await store.create(job_id, "fib", {}, {}, "o", extra={"tags": tags}) is None
            # Five share one score (a tie broken by id); one record expires.
            await client.zadd(index, dict.fromkeys(ids[10:15], 1000.0))
            await client.delete(store.key(ids[20]))
            order = [i for i, _ in await client.zrevrange(index, 0, -1, withscores=True)]
            expected = [i for i in order if i != ids[20]]

            seen: list[str] = []
            after = None
            while True:
                page = await lister.page("o", JobFilter(), 4, after)
                seen += [r.id for r in page.records]
                if page.next is None:
                    break
                after = page.next
                if len(seen) in (8, 28):  # the cursor's id leaves the index (28: in the tie)
                    await client.zrem(index, after.id)
            assert seen == expected
            assert await client.zscore(index, ids[20]) is None  # dropped when met
            # Only the three oldest match: a scan of 10 finds none and says where it stopped.
            flt = JobFilter(tags={"k": "old"})
            first = await lister.page("o", flt, 10, scan=10)
            assert first.records == [] and first.next is not None
            found, after = [], None
            for _ in range(10):
                page = await lister.page("o", flt, 10, after, scan=10)
                found += [r.id for r in page.records]
                if page.next is None:
                    break
                after = page.next
            assert sorted(found) == sorted(ids[:3])
        finally:
            keys = [store.key(i) for i in ids]
            await client.delete(*keys, index, settings.keys.jobs, settings.keys.jobs_live)
            await client.delete(settings.keys.jobs_owners, settings.keys.metrics_submitted)
            await client.aclose()

    asyncio.run(scenario())


def test_the_dashboard_filters_by_owner_before_it_limits(priv: Priv) -> None:
    """Another key's burst of 30 newer jobs does not push one's own job off the dashboard's
    25 newest. (~1 s)"""
    with priv.client(KEY_A) as a, priv.client(KEY_B) as b:
        (mine,) = _batch(a, [_fib({})])
        theirs = _batch(b, [_fib({}) for _ in range(30)])
        shown_a = [j["id"] for j in a.get("/dashboard/state").json()["jobs"]]
        shown_b = [j["id"] for j in b.get("/dashboard/state").json()["jobs"]]
        assert mine in shown_a and not set(theirs) & set(shown_a)
        assert shown_b == list(reversed(theirs))[:25]
        _settle(a, [mine])
        _settle(b, theirs)


def test_an_unknown_filter_is_refused_not_ignored(http: httpx.Client) -> None:
    """`?state=running` (not a filter) would otherwise list every job."""
    response = http.get("/jobs", params={"state": "running"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_parameter" and "'state'" in error["message"]


def test_deleting_a_finished_parallel_job_removes_its_parts(
    http: httpx.Client, live: Stack
) -> None:
    before = stack.array_segments(live.shm_prefix)
    arr = np.arange(10_001, dtype=np.float64)
    a = upload(http, arr)["id"]
    body = {"task": "slow_double", "params": {"seconds": 0.1}, "inputs": {"a": {"array": a}}}
    job = http.post("/jobs", json={**body, "parallel": 2}).json()
    done = wait(http, job["id"], 30)
    assert done["status"] == "succeeded" and len(done["parts"]["ids"]) == 2, done
    result = done["result"]["array"]["id"]
    assert http.delete(f"/jobs/{job['id']}").status_code == 200
    assert http.get(f"/jobs/{job['id']}").status_code == 404
    for part_id in done["parts"]["ids"]:
        assert http.get(f"/jobs/{part_id}").status_code == 404
        assert not live.redis.exists(f"{live.key_prefix}:job:{part_id}")
    assert http.get(f"/arrays/{result}").status_code == 404  # its result went with it
    assert http.delete(f"/arrays/{a}").status_code == 204
    stack.wait_arrays_freed(live.shm_prefix, before)

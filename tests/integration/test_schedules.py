"""Periodic jobs: `POST/GET/DELETE /schedules` on the real stack, with two API processes.

A second API on the session's Redis and key prefix runs the scheduler pass too; only the
lock's holder fires, and each tick is claimed once. Checks: an `every: 2` schedule runs at that
rhythm, one job per tick, and stops when deleted; a tick is claimed once however many try;
missed ticks give one catch-up run; cron and job parts are validated as a submission is; a run
whose input array is gone is refused and recorded on the schedule; the client and CLI.
Owner scoping and the per-key bound on a keyed API. About 30 s in all (10 s of it the
rhythm test, 6 s the CLI's three commands).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from forklift import Client, InvalidRequest, NotFound
from shared.redis_io import async_redis
from shared.schedules import (
    Fire,
    Scheduler,
    ScheduleRecord,
    ScheduleStore,
    next_cron,
    parse_cron,
)
from shared.schemas import ScheduleSpec
from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.http_api import upload

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers

FORKLIFT = Path(sys.executable).with_name("forklift")


@pytest.fixture(scope="module")
def second_api(live: Stack) -> Iterator[str]:
    """Another API process on the same Redis and key prefix (its own port); stopped by pid."""
    api, url = stack.start_api(live.env, proc_name="api-second-scheduler")
    try:
        yield url
    finally:
        api.stop()


def _create(http: httpx.Client, **body: object) -> dict:
    response = http.post("/schedules", json=body)
    assert response.status_code == 201, response.text
    view = response.json()
    assert response.headers["Location"] == f"/schedules/{view['id']}"
    return view


def _delete(http: httpx.Client, schedule_id: str) -> None:
    response = http.delete(f"/schedules/{schedule_id}")
    assert response.status_code == 204, response.text


def _runs(live: Stack, schedule_id: str) -> list[tuple[float, str]]:
    """(created_at, id) of the jobs a schedule submitted, oldest first, from the owner index
    (the open API's owner is '')."""
    keys = Settings.from_env(live.env).keys
    ids = live.redis.zrange(keys.jobs_by_owner(""), 0, -1)
    runs = []
    for job_id in ids:
        created, tags = live.redis.hmget(keys.job(job_id), ["created_at", "tags"])
        if tags and json.loads(tags).get("schedule") == schedule_id:
            runs.append((float(created), job_id))
    return sorted(runs)


def test_every_two_seconds_one_run_per_tick_with_two_apis(
    live: Stack, http: httpx.Client, second_api: str
) -> None:
    with httpx.Client(base_url=second_api, timeout=30) as other:
        view = _create(other, task="fib", params={"n": 5}, every=2, name="rhythm")
    sid = view["id"]
    assert view["next_run"] == pytest.approx(view["created_at"] + 2, abs=0.01)
    assert view["runs"] == 0 and view["last_run"] is None
    try:
        time.sleep(7.3)  # ticks at +2, +4, +6
        runs = _runs(live, sid)
    finally:
        _delete(http, sid)
    deleted_at = time.time()
    times = [t for t, _ in runs]
    assert len(times) == 3, runs
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(g - 2) <= 0.5 for g in gaps), gaps  # the rhythm, never two in one tick
    assert times[0] - view["created_at"] == pytest.approx(2, abs=0.5)
    # each run is a normal job, tagged with the schedule, listed by the tag filter
    listed = http.get("/jobs", params={"tag": f"schedule:{sid}"})
    assert listed.status_code == 200, listed.text
    assert {j["id"] for j in listed.json()["jobs"]} == {i for _, i in runs}
    job = http.get(f"/jobs/{runs[0][1]}", params={"wait": 10}).json()
    assert job["status"] == "succeeded" and job["result"] == 5, job
    assert job["tags"] == {"schedule": sid}
    # one scheduler holds the lock
    lock = live.redis.get(Settings.from_env(live.env).keys.scheduler)
    assert lock is not None and len(lock) == 32
    # deleted: gone for both APIs, and no new run after a margin longer than a tick
    assert http.get(f"/schedules/{sid}").status_code == 404
    time.sleep(2.5)
    after = _runs(live, sid)
    assert after == runs, [t - deleted_at for t, _ in after]


def test_a_tick_is_claimed_once(live: Stack, http: httpx.Client) -> None:
    """Two schedulers that both saw a tick: only the first claim moves it (the script
    compares the score seen), so the second fires nothing."""
    view = _create(http, task="fib", params={"n": 3}, every=3600)
    sid = view["id"]
    try:
        store = ScheduleStore(live.redis, Settings.from_env(live.env))
        tick = view["next_run"]
        now = time.time()
        assert store.claim(sid, tick, tick + 3600, now) is True
        assert store.claim(sid, tick, tick + 3600, now) is False
        assert http.get(f"/schedules/{sid}").json()["next_run"] == pytest.approx(tick + 3600)
    finally:
        _delete(http, sid)


def test_missed_ticks_give_one_catch_up_run(live: Stack, http: httpx.Client) -> None:
    view = _create(http, task="fib", params={"n": 4}, every=60)
    sid = view["id"]
    keys = Settings.from_env(live.env).keys
    try:
        tick = time.time() - 3600  # as if no scheduler had run for an hour: 60 missed ticks
        live.redis.zadd(keys.schedules, {sid: tick})
        deadline = time.monotonic() + 5
        while http.get(f"/schedules/{sid}").json()["runs"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # more runs would come within a pass or two
        now = time.time()
        late = http.get(f"/schedules/{sid}").json()
        assert late["runs"] == 1, late
        assert len(_runs(live, sid)) == 1
        # then the regular times again: the first of the 60 s grid after now
        assert now < late["next_run"] <= now + 60
        assert (late["next_run"] - tick) / 60 == pytest.approx(
            round((late["next_run"] - tick) / 60)
        )
    finally:
        _delete(http, sid)


def test_cron_next_run_and_listing(http: httpx.Client) -> None:
    before = time.time()
    view = _create(http, task="fib", params={"n": 5}, cron="*/15 * * * *", name="quarterly")
    try:
        expected = next_cron(parse_cron("*/15 * * * *"), before)
        assert view["next_run"] == expected
        assert view["cron"] == "*/15 * * * *" and view["every"] is None
        mine = http.get("/schedules").json()["schedules"]
        assert view["id"] in [s["id"] for s in mine]
        got = http.get(f"/schedules/{view['id']}").json()
        assert got["name"] == "quarterly" and got["params"] == {"n": 5}
    finally:
        _delete(http, view["id"])
    assert http.delete(f"/schedules/{view['id']}").status_code == 404


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        ({"task": "fib", "params": {"n": 5}, "cron": "61 * * * *"}, "invalid_cron", "61 > 59"),
        ({"task": "fib", "params": {"n": 5}, "cron": "* * *"}, "invalid_cron", "5 fields"),
        ({"task": "fib", "params": {"n": 5}, "cron": "0 0 31 2 *"}, "invalid_cron", "never"),
        ({"task": "no_such_task", "every": 5}, "unknown_task", "unknown task"),
        ({"task": "fib", "params": {"n": 99}, "every": 5}, "invalid_params", "n"),
        ({"task": "fib", "params": {"n": 5}}, "validation_error", "exactly one"),
        ({"task": "fib", "params": {"n": 5}, "every": 5, "cron": "* * * * *"}, "", "exactly"),
        ({"task": "fib", "params": {"n": 5}, "every": 0.5}, "", "greater than or equal"),
        (
            {"task": "sum", "inputs": {"a": {"array": "0" * 32}}, "every": 5},
            "unknown_array",
            "no array",
        ),
    ],
)
def test_bad_schedules_are_refused(http: httpx.Client, body: dict, code: str, says: str) -> None:
    count = len(http.get("/schedules").json()["schedules"])
    response = http.post("/schedules", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    if code and code != "validation_error":
        assert error["code"] == code, error
    assert says in json.dumps(error), error
    assert len(http.get("/schedules").json()["schedules"]) == count  # nothing left behind


def test_a_run_whose_input_is_gone_is_refused_and_recorded(live: Stack, http: httpx.Client) -> None:
    before = stack.array_segments(live.shm_prefix)
    meta = upload(http, np.arange(6.0))
    view = _create(http, task="sum", inputs={"a": {"array": meta["id"]}}, every=1)
    sid = view["id"]
    try:
        deadline = time.monotonic() + 5
        while http.get(f"/schedules/{sid}").json()["runs"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        (_, first), *_ = _runs(live, sid)
        done = http.get(f"/jobs/{first}", params={"wait": 10}).json()
        assert done["status"] == "succeeded" and done["result"] == 15.0, done
        response = http.delete(f"/arrays/{meta['id']}")
        assert response.status_code in (202, 204), response.text
        deadline = time.monotonic() + 5
        while not http.get(f"/schedules/{sid}").json()["skipped"] and time.monotonic() < deadline:
            time.sleep(0.1)
        got = http.get(f"/schedules/{sid}").json()
        assert got["skipped"] >= 1 and "unknown_array" in (got["last_error"] or ""), got
    finally:
        _delete(http, sid)
    for _, job_id in _runs(live, sid):  # every run ended, so nothing stays pinned
        assert http.get(f"/jobs/{job_id}", params={"wait": 10}).json()["status"] == "succeeded"
    stack.wait_arrays_freed(live.shm_prefix, before)


def test_client_and_cli(live: Stack, http: httpx.Client) -> None:
    """`Client.schedule/schedules/get_schedule/unschedule` and `forklift schedule(s)` /
    `forklift unschedule`, on the same API."""
    with Client(live.url) as fl:
        view = fl.schedule("fib", n=6, cron="0 9 * * 1-5", name="weekdays", tags={"team": "a"})
        try:
            assert view.cron == "0 9 * * 1-5" and view.params == {"n": 6}
            assert view.tags == {"team": "a"} and view.next_run is not None
            assert view.id in [s.id for s in fl.schedules()]
            assert fl.get_schedule(view.id).name == "weekdays"
            with pytest.raises(InvalidRequest, match="5 fields"):
                fl.schedule("fib", n=6, cron="0 9 *")
        finally:
            fl.unschedule(view)
        with pytest.raises(NotFound):
            fl.get_schedule(view.id)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(FORKLIFT), "--url", live.url, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = run("--json", "schedule", "fib", "n=7", "--every", "3600", "--tag", "k=v")
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert data["every"] == 3600 and data["params"] == {"n": 7} and data["tags"] == {"k": "v"}
    listed = run("schedules")
    assert listed.returncode == 0 and data["id"] in listed.stdout, listed
    assert "every 3600 s" in listed.stdout
    gone = run("unschedule", data["id"])
    assert gone.returncode == 0, gone.stderr
    assert http.get(f"/schedules/{data['id']}").status_code == 404


def test_schedules_belong_to_their_key_and_are_bounded(live: Stack) -> None:
    """With FORKLIFT_API_KEYS (a third API on the same prefix): another key's schedule is
    an unknown one (404, never listed), a run is a job of the schedule's owner, no key is
    401, and a key may have MAX_SCHEDULES."""
    key_a, key_b = f"ka-{uuid.uuid4().hex}", f"kb-{uuid.uuid4().hex}"
    api, url = stack.start_api(
        dict(live.env, FORKLIFT_API_KEYS=f"{key_a}, {key_b}"), proc_name="api-keyed-schedules"
    )
    try:
        a = httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {key_a}"})
        b = httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {key_b}"})
        with a, b, httpx.Client(base_url=url, timeout=30) as nobody:
            assert nobody.get("/schedules").status_code == 401
            assert nobody.post("/schedules", json={"task": "fib", "every": 5}).status_code == 401
            view = _create(a, task="fib", params={"n": 5}, every=1)
            sid = view["id"]
            try:
                for method in ("GET", "DELETE"):
                    theirs = b.request(method, f"/schedules/{sid}")
                    never = b.request(method, f"/schedules/{uuid.uuid4().hex}")
                    assert theirs.status_code == never.status_code == 404, theirs.text
                    assert theirs.json()["error"]["code"] == "schedule_not_found"
                assert b.get("/schedules").json()["schedules"] == []
                deadline = time.monotonic() + 5
                while not a.get(f"/schedules/{sid}").json()["last_job"]:
                    assert time.monotonic() < deadline, "no run within 5 s"
                    time.sleep(0.1)
                run_id = a.get(f"/schedules/{sid}").json()["last_job"]
                assert a.get(f"/jobs/{run_id}", params={"wait": 10}).json()["result"] == 5
                assert b.get(f"/jobs/{run_id}").status_code == 404
            finally:
                _delete(a, sid)
            made = [_create(b, task="fib", params={"n": 1}, every=3600)["id"] for _ in range(100)]
            try:
                refused = b.post("/schedules", json={"task": "fib", "params": {"n": 1}, "every": 5})
                assert refused.status_code == 409, refused.text
                assert refused.json()["error"]["code"] == "too_many_schedules"
                assert len(b.get("/schedules").json()["schedules"]) == 100
                mine = a.post("/schedules", json={"task": "fib", "every": 9, "params": {"n": 1}})
                assert mine.status_code == 201, mine.text  # the bound is per key
            finally:
                for ident in made:
                    _delete(b, ident)
            for view in a.get("/schedules").json()["schedules"]:
                _delete(a, view["id"])
    finally:
        api.stop()


def test_only_the_lock_holder_fires_and_another_takes_over(live: Stack) -> None:
    """Two `Scheduler`s in this process on a private key prefix, with a `fire` that only
    counts: passes of both, side by side, fire each tick once; the holder's `close` hands the
    lock to the other at its next pass. Under 1 s."""
    prefix = f"{live.key_prefix}-sched-{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(dict(live.env, FORKLIFT_KEY_PREFIX=prefix))
    fired: list[tuple[str, str]] = []

    async def scenario() -> None:
        client = async_redis(settings)
        try:
            store = ScheduleStore(client, settings)
            schedulers = [Scheduler(store, counter(me)) for me in range(2)]
            spec = ScheduleSpec(task="fib", params={"n": 1}, every=3600)
            now = time.time()
            for n in range(3):  # three schedules, all due
                made = ScheduleRecord(id=f"{n:032x}", owner="", spec=spec, created_at=now)
                assert await store.create(made, now - 10 * (n + 1), 100)
            first, second = schedulers
            counts = await asyncio.gather(first.tick(), second.tick(), first.tick())
            assert sum(counts) == 3 and len(fired) == 3, (counts, fired)
            holder = {who for _, who in fired}
            assert len(holder) == 1, fired  # one scheduler fired them all
            assert await asyncio.gather(first.tick(), second.tick()) == [0, 0]  # not due
            (leader,) = holder
            await schedulers[int(leader)].close()
            other = schedulers[1 - int(leader)]
            assert await store.hold(other.token), "the lock was not free after close"
            for n in range(3):
                assert await store.delete(f"{n:032x}", "")
        finally:
            await client.delete(settings.keys.scheduler)
            await client.aclose()

    def counter(me: int) -> Fire:
        async def fire(schedule: ScheduleRecord) -> str:
            fired.append((schedule.id, str(me)))
            return uuid.uuid4().hex

        return fire

    asyncio.run(scenario())
    assert not list(live.redis.scan_iter(match=f"{prefix}:*")), "keys left behind"

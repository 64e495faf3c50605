"""Jobs that feed jobs on the server: inputs `{"job": id}` and, in a batch, `{"job": "#i"}`.

Real stack: a pipeline sent as one batch must equal its steps run one after another; an
upstream that fails or is cancelled ends what waits on it (and what waits on that); bad
references are refused before anything is written; another key's job is unknown; nothing
stays pinned afterwards.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from forklift import testing
from shared.dependencies import CLAIM_LEASE_S
from shared.jobs_reaper import reap
from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.http_api import download, upload, wait

# Delivery, acks, priorities and cancel depend on the transport: every test runs on both.
pytestmark = pytest.mark.both_brokers


def _arrays(live: Stack) -> set[str]:
    return set(live.redis.scan_iter(match=f"{live.key_prefix}:array:*", count=1000))


@pytest.fixture(autouse=True)
def _nothing_left_pinned(live: Stack, http: httpx.Client) -> Iterator[None]:
    """After each test every array it made (uploads, results) is unpinned, and is deleted
    (a 204: a pinned array would answer 202), so the session leaves no segment behind."""
    before = _arrays(live)
    yield
    for key in sorted(_arrays(live) - before):
        record = live.redis.hgetall(key)
        if record.get("state") != "ready" or record.get("owner"):
            continue  # gone meanwhile, or another key's (that test deletes its own)
        assert record.get("pins") == "0", (key, record)
        response = http.delete(f"/arrays/{record['id']}")
        assert response.status_code == 204, (key, response.text)


def _batch(http: httpx.Client, *jobs: dict) -> list[dict]:
    response = http.post("/jobs/batch", json={"jobs": list(jobs)})
    assert response.status_code == 202, response.text
    return response.json()["jobs"]


def _post(http: httpx.Client, job: dict) -> dict:
    response = http.post("/jobs", json=job)
    assert response.status_code == 202, response.text
    return response.json()


def _job(task: str, inputs: dict | None = None, **params: object) -> dict:
    return {"task": task, "params": params, "inputs": inputs or {}}


def _pins(live: Stack, array_id: str) -> int:
    return int(live.redis.hget(f"{live.key_prefix}:array:{array_id}", "pins") or 0)


def _job_keys(live: Stack) -> set[str]:
    return set(live.redis.scan_iter(match=f"{live.key_prefix}:job:*", count=1000))


def _live_ids(live: Stack) -> set[str]:
    return set(live.redis.zrange(f"{live.key_prefix}:jobs:live", 0, -1))


def _settled(live: Stack, ids: list[str]) -> None:
    """Every job left the live index and has no dependents set (released exactly once)."""
    stack.wait_until(lambda: not (set(ids) & _live_ids(live)), 10, what="jobs left the live index")
    for job_id in ids:
        assert not live.redis.exists(f"{live.key_prefix}:job:{job_id}:dependents")


STEPS = (
    ("normalize", {"method": "zscore"}),
    ("fft", {"mode": "magnitude"}),
    ("histogram", {"bins": 32}),
)


def test_a_pipeline_as_one_batch_equals_its_steps_one_after_another(
    http: httpx.Client, live: Stack
) -> None:
    rng = np.random.default_rng(16)
    x = upload(http, rng.standard_normal(10_001) * 3 + 1)["id"]

    # One after another: each step's array result is the next step's array input.
    sequential, source = [], x
    for task, params in STEPS:
        done = wait(http, _post(http, _job(task, {"a": {"array": source}}, **params))["id"])
        assert done["status"] == "succeeded", done
        sequential.append(done["result"])
        source = done["result"].get("array", {}).get("id", "")

    # One request: each entry names the one before; a fourth takes one array of a dict result.
    (task0, p0), (task1, p1), (task2, p2) = STEPS
    views = _batch(
        http,
        _job(task0, {"a": {"array": x}}, **p0),
        _job(task1, {"a": {"job": "#0"}}, **p1),
        _job(task2, {"a": {"job": "#1"}}, **p2),
        _job("sum", {"a": {"job": "#2", "key": "counts"}}),
    )
    ids = [v["id"] for v in views]
    assert [v["status"] for v in views] == ["queued", "waiting", "waiting", "waiting"]
    assert views[1]["upstream"] == {"a": {"job": ids[0], "key": None}}
    assert views[3]["upstream"] == {"a": {"job": ids[2], "key": "counts"}}
    ends = [wait(http, job_id, 60) for job_id in ids]
    assert [e["status"] for e in ends] == ["succeeded"] * 4, ends
    # Each waiting entry took its upstream's result array as its input.
    assert ends[1]["inputs"] == {"a": ends[0]["result"]["array"]["id"]}
    assert ends[2]["inputs"] == {"a": ends[1]["result"]["array"]["id"]}
    assert ends[3]["inputs"] == {"a": ends[2]["result"]["counts"]["array"]["id"]}
    assert ends[1]["created_at"] < ends[0]["finished_at"] <= ends[1]["started_at"]

    pairs = [(ends[i]["result"]["array"], sequential[i]["array"]) for i in (0, 1)]
    pairs += [
        (ends[2]["result"][n]["array"], sequential[2][n]["array"]) for n in ("counts", "edges")
    ]
    for batch_meta, step_meta in pairs:
        assert batch_meta["id"] != step_meta["id"]
        np.testing.assert_array_equal(
            download(http, batch_meta["id"]), download(http, step_meta["id"])
        )
    assert ends[3]["result"] == 10_001  # every value counted once

    # Nothing left pinned: the inputs and the intermediate results are back to 0 pins.
    _settled(live, ids)
    arrays = [x, *(e["inputs"]["a"] for e in ends[1:])]
    assert [_pins(live, a) for a in arrays] == [0] * len(arrays)


def test_a_job_input_of_a_finished_job_resolves_at_once(http: httpx.Client, live: Stack) -> None:
    x = upload(http, np.arange(8.0))["id"]
    first = wait(http, _post(http, _job("normalize", {"a": {"array": x}}))["id"])
    view = _post(http, _job("sum", {"a": {"job": first["id"]}}))
    assert view["status"] == "queued"
    assert view["inputs"] == {"a": first["result"]["array"]["id"]}
    assert wait(http, view["id"])["result"] == pytest.approx(4.0)
    # A dict result needs a key; a key that is not there is refused, saying so.
    hist = wait(http, _post(http, _job("histogram", {"a": {"array": x}}, bins=4))["id"])
    for ref, text in (
        ({"job": hist["id"]}, "has no array"),
        ({"job": hist["id"], "key": "nope"}, "has no array under key 'nope'"),
    ):
        response = http.post("/jobs", json=_job("sum", {"a": ref}))
        assert response.status_code == 422, response.text
        assert text in response.json()["error"]["message"]


def test_an_upstream_failure_ends_every_job_downstream_failed(
    http: httpx.Client, live: Stack
) -> None:
    views = _batch(
        http,
        _job("boom", message="upstream broke"),
        _job("normalize", {"a": {"job": "#0"}}),
        _job("fft", {"a": {"job": "#1"}}, mode="magnitude"),
    )
    ids = [v["id"] for v in views]
    ends = [wait(http, job_id, 30) for job_id in ids]
    assert [e["status"] for e in ends] == ["failed"] * 3
    assert ends[1]["upstream_failed"] == ids[0]
    assert ends[2]["upstream_failed"] == ids[1]
    assert f"upstream job {ids[0]} failed" in ends[1]["error"]
    assert "upstream broke" in ends[1]["error"]
    assert ends[2]["started_at"] is None and ends[2]["attempts"] == []
    # An upstream that has already failed refuses the submission outright.
    response = http.post("/jobs", json=_job("normalize", {"a": {"job": ids[0]}}))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "upstream_failed"
    _settled(live, ids)


def test_an_upstream_that_succeeds_without_an_array_fails_its_dependent(
    http: httpx.Client, live: Stack
) -> None:
    views = _batch(http, _job("sleep", seconds=0.3), _job("normalize", {"a": {"job": "#0"}}))
    end = wait(http, views[1]["id"], 30)
    assert end["status"] == "failed"
    assert end["upstream_failed"] is None
    assert f"the result of job {views[0]['id']} has no array" in end["error"]
    _settled(live, [v["id"] for v in views])


def test_cancelling_an_upstream_cancels_what_waits_on_it(http: httpx.Client, live: Stack) -> None:
    x = upload(http, np.ones((4, 4)))["id"]
    upstream = _post(http, _job("sleep", seconds=30))
    # b is resolved (and pinned) now; a waits on the sleeping job; c waits on the waiting one.
    middle = _post(http, _job("matmul", {"a": {"job": upstream["id"]}, "b": {"array": x}}))
    last = _post(http, _job("sum", {"a": {"job": middle["id"]}}))
    assert (middle["status"], last["status"]) == ("waiting", "waiting")
    assert _pins(live, x) == 1
    stack.wait_until(
        lambda: http.get(f"/jobs/{upstream['id']}").json()["status"] == "running",
        15,
        what="running",
    )
    assert http.delete(f"/jobs/{upstream['id']}").status_code == 200
    ends = [wait(http, job_id, 30) for job_id in (upstream["id"], middle["id"], last["id"])]
    assert [e["status"] for e in ends] == ["cancelled"] * 3
    assert (ends[1]["upstream_failed"], ends[2]["upstream_failed"]) == (
        upstream["id"],
        middle["id"],
    )
    _settled(live, [e["id"] for e in ends])
    assert _pins(live, x) == 0


def test_deleting_a_waiting_job_cancels_it_and_its_dependents(
    http: httpx.Client, live: Stack
) -> None:
    x = upload(http, np.ones((3, 3)))["id"]
    upstream = _post(http, _job("sleep", seconds=2))
    waiting = _post(http, _job("matmul", {"a": {"array": x}, "b": {"job": upstream["id"]}}))
    after = _post(http, _job("sum", {"a": {"job": waiting["id"]}}))
    assert _pins(live, x) == 1
    response = http.delete(f"/jobs/{waiting['id']}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert _pins(live, x) == 0
    end = wait(http, after["id"], 10)
    assert (end["status"], end["upstream_failed"]) == ("cancelled", waiting["id"])
    assert wait(http, upstream["id"], 30)["status"] == "succeeded"  # the upstream runs on
    # Its end finds the cancelled dependent and leaves it as it is.
    assert http.get(f"/jobs/{waiting['id']}").json()["status"] == "cancelled"
    assert http.delete(f"/jobs/{waiting['id']}").status_code == 200  # finished: removed
    assert http.get(f"/jobs/{waiting['id']}").status_code == 404
    _settled(live, [upstream["id"], waiting["id"], after["id"]])


@pytest.mark.parametrize(
    ("jobs", "code", "text"),
    [
        (
            [_job("normalize", {"a": {"job": "#1"}}), _job("normalize", {"a": {"job": "#0"}})],
            "invalid_reference",
            "names no earlier entry; a job may only take the result of an earlier entry",
        ),
        ([_job("normalize", {"a": {"job": "#0"}})], "invalid_reference", "names this entry itself"),
        (
            [_job("normalize", {"a": {"job": "#1"}}), _job("fib", n=3)],
            "invalid_reference",
            "names no earlier entry",
        ),
        (
            [_job("fib", n=3), _job("normalize", {"a": {"job": "#7"}})],
            "invalid_reference",
            "names no earlier entry",
        ),
        (
            [_job("fib", n=3), _job("normalize", {"a": {"job": uuid.uuid4().hex}})],
            "unknown_job",
            "no job with id",
        ),
        ([_job("fib", n=3), _job("normalize", {"a": {"job": "x"}})], "unknown_job", "no job"),
    ],
    ids=["cycle", "self", "forward", "out-of-range", "unknown-id", "not-an-id"],
)
def test_bad_references_are_refused_before_anything_is_written(
    http: httpx.Client, live: Stack, jobs: list[dict], code: str, text: str
) -> None:
    x = upload(http, np.arange(5.0))["id"]
    # A valid entry first: none is queued. A copy: the parameters are shared by every run of
    # the test (one per broker), and the references are shifted below.
    jobs = [_job("sum", {"a": {"array": x}}), *copy.deepcopy(jobs)]
    for job in jobs[1:]:  # indexes shift by one with the entry put first
        for ref in job["inputs"].values():
            if ref["job"].startswith("#") and ref["job"][1:].isdigit():
                ref["job"] = f"#{int(ref['job'][1:]) + 1}"
    before_keys, before_shm = _job_keys(live), testing.segments(live.shm_prefix)
    before_queue = live.queue_lengths()
    response = http.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert text in error["message"], error
    assert error["message"].startswith(f"jobs[{error['detail']['index']}]: ")
    assert _job_keys(live) <= before_keys, "a record was created"
    assert testing.segments(live.shm_prefix) <= before_shm
    assert live.queue_lengths() == before_queue
    assert _pins(live, x) == 0


def test_a_batch_ref_outside_a_batch_is_refused(http: httpx.Client) -> None:
    response = http.post("/jobs", json=_job("normalize", {"a": {"job": "#0"}}))
    assert response.status_code == 422, response.text
    assert "only POST /jobs/batch takes it" in response.json()["error"]["message"]


KEY_A = f"ka-{uuid.uuid4().hex}"
KEY_B = f"kb-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def keyed_url(live: Stack) -> Iterator[str]:
    env = dict(live.env, FORKLIFT_API_KEYS=f"{KEY_A},{KEY_B}")
    api, url = stack.start_api(env, proc_name="api-keyed-pipelines")
    try:
        yield url
    finally:
        api.stop()


def test_another_keys_job_is_an_unknown_job(keyed_url: str, live: Stack) -> None:
    def client(key: str) -> httpx.Client:
        return httpx.Client(
            base_url=keyed_url, timeout=30, headers={"authorization": f"Bearer {key}"}
        )

    with client(KEY_A) as a, client(KEY_B) as b:
        x = upload(a, np.arange(6.0))["id"]
        mine = _post(a, _job("normalize", {"a": {"array": x}}))
        pending = _post(a, _job("sleep", seconds=1))
        unknown = uuid.uuid4().hex
        answers = {}
        for label, job_id in (("done", mine["id"]), ("pending", pending["id"]), ("none", unknown)):
            response = b.post("/jobs", json=_job("sum", {"a": {"job": job_id}}))
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            answers[label] = (error["code"], error["message"].replace(job_id, "<id>"))
        assert answers["done"] == answers["pending"] == answers["none"]
        assert answers["none"][0] == "unknown_job"
        # The owner may: it waits on its own job and then runs.
        own = _post(a, _job("sum", {"a": {"job": mine["id"]}}))
        done = wait(a, own["id"])
        assert done["status"] == "succeeded"
        assert wait(a, pending["id"])["status"] == "succeeded"
        for array_id in (x, done["inputs"]["a"]):
            assert a.delete(f"/arrays/{array_id}").status_code == 204


def test_a_waiting_job_launches_in_parts(http: httpx.Client, live: Stack) -> None:
    """`parallel` is kept while the job waits; its launch plans the parts on the array it got."""
    rng = np.random.default_rng(3)
    x = upload(http, rng.standard_normal((37, 256)))["id"]
    views = _batch(
        http,
        {**_job("normalize", {"a": {"array": x}}), "parallel": 2},
        {**_job("fft", {"a": {"job": "#0"}}, mode="magnitude"), "parallel": 2},
    )
    assert views[0]["parts"]["total"] == 2 and views[1]["parts"] is None  # planned at launch
    end = wait(http, views[1]["id"], 60)
    assert end["status"] == "succeeded", end
    assert end["parts"]["total"] == 2 and end["parts"]["done"] == 2
    first = wait(http, views[0]["id"])
    assert end["inputs"] == {"a": first["result"]["array"]["id"]}  # the parallel job's output
    alone = wait(
        http, _post(http, _job("fft", {"a": {"array": end["inputs"]["a"]}}, mode="magnitude"))["id"]
    )
    np.testing.assert_array_equal(
        download(http, end["result"]["array"]["id"]), download(http, alone["result"]["array"]["id"])
    )
    _settled(live, [v["id"] for v in views])


def test_a_ready_job_whose_announcement_went_unheard_is_launched_by_the_reaper(
    http: httpx.Client, live: Stack
) -> None:
    """An API claimed the job and died (its claim is older than the lease, but not by much):
    the ready event is refused, the job stays waiting; a reaper pass announces it again."""
    x = upload(http, np.arange(4.0))["id"]
    upstream = _post(http, _job("slow_copy", {"a": {"array": x}}, seconds=1.0))
    waiting = _post(http, _job("sum", {"a": {"job": upstream["id"]}}))
    key = f"{live.key_prefix}:job:{waiting['id']}"
    lapses_in = 6.0
    live.redis.hset(key, "claimed_at", repr(time.time() - CLAIM_LEASE_S + lapses_in))
    assert wait(http, upstream["id"])["status"] == "succeeded"
    stack.wait_until(lambda: live.redis.hget(key, "ready") == "1", 10, what="resolved")
    time.sleep(0.5)
    assert http.get(f"/jobs/{waiting['id']}").json()["status"] == "waiting"  # nobody launched it
    stack.wait_until(
        lambda: float(live.redis.hget(key, "claimed_at")) < time.time() - CLAIM_LEASE_S,
        10,
        what="lapsed",
    )
    settings = Settings.from_env({**live.env, "FORKLIFT_WORKER_LOST_AFTER": "3"})
    stack.wait_until(lambda: time.time() - waiting["created_at"] > 3.5, 10, what="old enough")
    report = reap(live.redis, settings, force=True)
    assert report is not None and waiting["id"] in report.announced
    end = wait(http, waiting["id"])
    assert (end["status"], end["result"]) == ("succeeded", 6.0)
    _settled(live, [upstream["id"], waiting["id"]])

"""Access: with FORKLIFT_API_KEYS set, jobs and arrays belong to the key that made them.

A second API process on the session's stack (same Redis, key prefix and worker) runs with
two keys. Another key gets exactly what an unknown id gets (404), never 403; keys are never
written to a log, a record or a repr.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from api.owners import owner_id
from forklift.same_host import discard_segment
from shared.arrays.segments import create_segment, segment_path
from shared.settings import Settings
from tests import stack
from tests.conftest import Stack
from tests.http_api import load_npy, npy_bytes

KEY_A = f"ka-{uuid.uuid4().hex}"
KEY_B = f"kb-{uuid.uuid4().hex}"


@dataclass
class Keyed:
    url: str
    api: stack.Proc

    def client(self, key: str | None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)


@pytest.fixture(scope="module")
def keyed(live: Stack) -> Iterator[Keyed]:
    env = dict(live.env, FORKLIFT_API_KEYS=f"{KEY_A}, {KEY_B}")
    # Logging at debug level: the most a log could ever show.
    api, url = stack.start_api(env, log_level="debug", proc_name="api-keyed")
    try:
        yield Keyed(url, api)
    finally:
        api.stop()


def _owned_job_and_array(keyed: Keyed) -> tuple[str, str, str]:
    """Key A uploads an array and runs a job with an array result: (job, input, result)."""
    with keyed.client(KEY_A) as a:
        response = a.post(
            "/arrays",
            content=npy_bytes(np.arange(12.0).reshape(3, 4)),
            headers={"content-type": "application/x-npy"},
        )
        assert response.status_code == 201, response.text
        array_id = response.json()["id"]
        body = {"task": "sum", "params": {"axis": 0}, "inputs": {"a": {"array": array_id}}}
        response = a.post("/jobs", json=body)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        done = a.get(f"/jobs/{job_id}", params={"wait": 30}).json()
        assert done["status"] == "succeeded", done
        return job_id, array_id, done["result"]["array"]["id"]


PROTECTED = [
    ("POST", "/jobs"),
    ("POST", "/jobs/batch"),
    ("POST", "/jobs/wait"),
    ("GET", "/jobs"),
    ("POST", "/jobs/cancel"),
    ("GET", "/jobs/{job}"),
    ("GET", "/jobs/{job}/result"),
    ("GET", "/jobs/{job}/events"),
    ("DELETE", "/jobs/{job}"),
    ("POST", "/arrays"),
    ("GET", "/arrays/{array}"),
    ("HEAD", "/arrays/{array}"),
    ("GET", "/arrays/{array}/meta"),
    ("DELETE", "/arrays/{array}"),
    ("GET", "/arrays/register/info"),
    ("POST", "/arrays/register"),
    ("POST", "/arrays/register/{array}/commit"),
    ("DELETE", "/arrays/register/{array}"),
    ("GET", "/cluster"),
]
BAD_CREDENTIALS = {
    "none": {},
    "unknown-key": {"authorization": f"Bearer {uuid.uuid4().hex}"},
    "empty-bearer": {"authorization": "Bearer"},
    "key-as-basic": {"authorization": f"Basic {KEY_A}"},
    "key-prefix": {"authorization": f"Bearer {KEY_A[:-1]}"},
    "key-plus-one": {"authorization": f"Bearer {KEY_A}0"},
    "key-without-scheme": {"authorization": KEY_A},
}


def test_missing_or_unknown_key_is_401_json(keyed: Keyed) -> None:
    ids = {"job": uuid.uuid4().hex, "array": uuid.uuid4().hex}
    with httpx.Client(base_url=keyed.url, timeout=10) as http:
        paths = http.get("/openapi.json").json()["paths"]
        for method, template in PROTECTED:
            path = template.format(**ids)
            route = template.replace("{job}", "{job_id}").replace("{array}", "{array_id}")
            assert method.lower() in paths.get(route, {}) or method == "HEAD", (method, route)
            for name, headers in BAD_CREDENTIALS.items():
                response = http.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, name, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert response.json()["error"]["code"] == "unauthorized"
        # Public on purpose: liveness and the job catalogue carry no one's data.
        for path in ("/healthz", "/tasks", "/openapi.json"):
            assert http.get(path).status_code == 200


def test_another_key_gets_404_exactly_like_an_unknown_id(keyed: Keyed, live: Stack) -> None:
    job_id, array_id, result_id = _owned_job_and_array(keyed)
    unknown_job, unknown_array = uuid.uuid4().hex, uuid.uuid4().hex
    probes = [
        ("GET", "/jobs/{}", job_id, unknown_job),
        ("GET", "/jobs/{}/result", job_id, unknown_job),
        ("GET", "/jobs/{}/events", job_id, unknown_job),
        ("DELETE", "/jobs/{}", job_id, unknown_job),
        ("GET", "/arrays/{}", array_id, unknown_array),
        ("GET", "/arrays/{}/meta", array_id, unknown_array),
        ("HEAD", "/arrays/{}", array_id, unknown_array),
        ("DELETE", "/arrays/{}", array_id, unknown_array),
        ("GET", "/arrays/{}", result_id, unknown_array),
        ("DELETE", "/arrays/{}", result_id, unknown_array),
    ]
    with keyed.client(KEY_B) as b, httpx.Client(base_url=live.url, timeout=10) as open_api:
        for client in (b, open_api):  # another key, and the open API (owner "")
            for method, template, owned, unknown in probes:
                theirs = client.request(method, template.format(owned))
                never = client.request(method, template.format(unknown))
                assert theirs.status_code == never.status_code == 404, (method, template)
                if method != "HEAD":
                    assert theirs.json()["error"]["code"] == never.json()["error"]["code"]
                    assert theirs.text.replace(owned, unknown) == never.text
    with keyed.client(KEY_A) as a:  # nothing B tried took effect
        assert a.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
        assert a.get(f"/jobs/{job_id}/result").status_code == 200
        assert a.head(f"/arrays/{array_id}").status_code == 200
        for ident in (array_id, result_id):
            assert a.delete(f"/arrays/{ident}").status_code == 204


def test_a_job_may_only_use_arrays_its_key_owns(keyed: Keyed, live: Stack) -> None:
    with keyed.client(KEY_A) as a, keyed.client(KEY_B) as b:
        response = a.post(
            "/arrays", content=npy_bytes(np.ones(8)), headers={"content-type": "application/x-npy"}
        )
        array_id = response.json()["id"]
        queued, jobs = live.queue_lengths(), live.redis.zcard(f"{live.key_prefix}:jobs")
        body = {"task": "sum", "inputs": {"a": {"array": array_id}}}
        stolen = b.post("/jobs", json=body)
        assert stolen.status_code == 422, stolen.text
        assert stolen.json()["error"]["code"] == "unknown_array"
        never = b.post("/jobs", json={"task": "sum", "inputs": {"a": {"array": "e" * 32}}})
        assert stolen.text.replace(array_id, "e" * 32) == never.text
        assert live.queue_lengths() == queued
        assert live.redis.zcard(f"{live.key_prefix}:jobs") == jobs
        assert live.redis.hget(f"{live.key_prefix}:array:{array_id}", "pins") == "0"
        mine = a.post("/jobs", json=body).json()["id"]
        assert a.get(f"/jobs/{mine}", params={"wait": 30}).json()["result"] == 8.0
        assert a.delete(f"/arrays/{array_id}").status_code == 204


def test_batches_are_checked_per_key_like_single_jobs(keyed: Keyed, live: Stack) -> None:
    """`POST /jobs/batch` with another key's array: the same 422 as for an unknown array,
    and none of the batch is queued."""
    with keyed.client(KEY_A) as a, keyed.client(KEY_B) as b:
        response = a.post(
            "/arrays", content=npy_bytes(np.ones(8)), headers={"content-type": "application/x-npy"}
        )
        assert response.status_code == 201, response.text
        array_id = response.json()["id"]
        queued, jobs = live.queue_lengths(), live.redis.zcard(f"{live.key_prefix}:jobs")

        def batch(client: httpx.Client, ident: str) -> httpx.Response:
            fine = {"task": "fib", "params": {"n": 3}}
            return client.post(
                "/jobs/batch",
                json={"jobs": [fine, {"task": "sum", "inputs": {"a": {"array": ident}}}]},
            )

        stolen, never = batch(b, array_id), batch(b, "e" * 32)
        assert stolen.status_code == never.status_code == 422, stolen.text
        assert stolen.json()["error"]["code"] == "unknown_array"
        assert stolen.json()["error"]["detail"]["index"] == 1
        assert stolen.text.replace(array_id, "e" * 32) == never.text
        assert live.queue_lengths() == queued
        assert live.redis.zcard(f"{live.key_prefix}:jobs") == jobs
        assert live.redis.hget(f"{live.key_prefix}:array:{array_id}", "pins") == "0"
        mine = batch(a, array_id)
        assert mine.status_code == 202, mine.text
        ids = [job["id"] for job in mine.json()["jobs"]]
        done = a.post("/jobs/wait", json={"ids": ids, "wait": 30}, timeout=40).json()["jobs"]
        assert [job["result"] for job in done] == [2, 8.0]
        assert a.delete(f"/arrays/{array_id}").status_code == 204


def test_waiting_on_another_keys_job_is_404_like_an_unknown_id(keyed: Keyed) -> None:
    with keyed.client(KEY_A) as a, keyed.client(KEY_B) as b:
        theirs = a.post("/jobs", json={"task": "fib", "params": {"n": 5}}).json()["id"]
        own = b.post("/jobs", json={"task": "fib", "params": {"n": 6}}).json()["id"]
        unknown = uuid.uuid4().hex
        for ids in ([theirs], [own, theirs]):
            stolen = b.post("/jobs/wait", json={"ids": ids, "wait": 0.5})
            never = b.post("/jobs/wait", json={"ids": [unknown if i == theirs else i for i in ids]})
            assert stolen.status_code == never.status_code == 404, stolen.text
            assert stolen.json()["error"]["code"] == "job_not_found"
            assert stolen.text.replace(theirs, unknown) == never.text
        mine = b.post("/jobs/wait", json={"ids": [own], "wait": 20}).json()["jobs"]
        assert [job["result"] for job in mine] == [8]
        seen = a.post("/jobs/wait", json={"ids": [theirs], "wait": 20}).json()["jobs"]
        assert [job["result"] for job in seen] == [5]


def test_another_key_cannot_commit_or_abandon_a_registration(keyed: Keyed, live: Stack) -> None:
    """Only the key that reserved a segment name can commit or abandon it; any other gets
    the 404 of an unknown registration, and the reservation and its segment stay as they are."""
    with (
        keyed.client(KEY_A) as a,
        keyed.client(KEY_B) as b,
        httpx.Client(base_url=live.url, timeout=10) as open_api,
    ):
        info = a.get("/arrays/register/info").json()
        ident = uuid.uuid4().hex
        name = f"{info['shm_prefix']}{ident}"
        body = {"segment": name, "dtype": "float64", "shape": [100], "domain": info["shm_domain"]}
        reserved = a.post("/arrays/register", json=body)
        assert reserved.status_code == 201, reserved.text
        data = np.arange(100.0)
        segment = create_segment(name, data.nbytes)
        try:
            segment.buffer[:] = data.tobytes()
        finally:
            segment.close()
        try:
            unknown = uuid.uuid4().hex
            for client in (b, open_api):  # another key, and the open API (owner "")
                for method, template in (
                    ("POST", "/arrays/register/{}/commit"),
                    ("DELETE", "/arrays/register/{}"),
                ):
                    theirs = client.request(method, template.format(ident))
                    never = client.request(method, template.format(unknown))
                    assert theirs.status_code == never.status_code == 404, (method, theirs.text)
                    assert theirs.json()["error"]["code"] == "registration_not_found"
                    assert theirs.text.replace(ident, unknown) == never.text
            assert segment_path(name).exists(), "another key's call removed the segment"
            record = live.redis.hgetall(f"{live.key_prefix}:array:{ident}")
            assert record["state"] == "uploading"
            committed = a.post(f"/arrays/register/{ident}/commit")
            assert committed.status_code == 201, committed.text
            assert load_npy(a.get(f"/arrays/{ident}").content).tobytes() == data.tobytes()
            assert a.delete(f"/arrays/{ident}").status_code == 204
        finally:
            discard_segment(name)
        assert not live.redis.exists(f"{live.key_prefix}:array:{ident}")


def test_open_api_warns_at_start_and_keyed_one_does_not(keyed: Keyed, live: Stack) -> None:
    assert "FORKLIFT_API_KEYS is not set" in live.api.log()
    assert "FORKLIFT_API_KEYS is not set" not in keyed.api.log()


def test_keys_never_appear_in_logs_records_or_reprs(keyed: Keyed, live: Stack) -> None:
    _, array_id, result_id = _owned_job_and_array(keyed)  # something to log
    with keyed.client(KEY_A) as a:
        for ident in (array_id, result_id):
            assert a.delete(f"/arrays/{ident}").status_code == 204
    with keyed.client(KEY_B) as b:
        b.get(f"/jobs/{uuid.uuid4().hex}")
    with httpx.Client(base_url=keyed.url, timeout=10) as anonymous:
        anonymous.get("/jobs/" + KEY_A)  # a key in a path is just an unknown id
    time.sleep(0.5)
    keyed_log, worker_log = keyed.api.log(), live.worker.log()
    assert "GET /jobs/" in keyed_log, "the debug-level API log shows requests"
    for key in (KEY_A, KEY_B):
        for name, text in (("keyed api", keyed_log), ("worker", worker_log)):
            # The path probe above is the only way a key may show up: as a requested URL.
            lines = [line for line in text.splitlines() if key in line and "/jobs/" not in line]
            assert not lines, f"{name} log shows a key: {lines[:3]}"
        for redis_key in live.redis.scan_iter(f"{live.key_prefix}:*"):
            kind = live.redis.type(redis_key)
            if kind == "hash":
                values = " ".join(live.redis.hgetall(redis_key).values())
            elif kind == "string":
                values = live.redis.get(redis_key) or ""
            else:
                continue
            assert key not in values, f"{redis_key} holds a key"
    settings = Settings.from_env({"FORKLIFT_API_KEYS": f"{KEY_A},{KEY_B}"})
    assert len(settings.api_keys) == 2
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert KEY_A not in text and KEY_B not in text
    with keyed.client(KEY_A) as a:  # the dashboard's state shows no params, results or owners
        dashboard = a.get("/dashboard/state")
    assert dashboard.status_code == 200, dashboard.text
    assert dashboard.json()["jobs"], "the state lists none of A's jobs: nothing was checked"
    for secret in (KEY_A, KEY_B, owner_id(KEY_A), owner_id(KEY_B)):
        assert secret not in dashboard.text
    assert '"owner"' not in dashboard.text and '"params"' not in dashboard.text


def test_dashboard_state_tells_each_key_only_its_own_jobs(keyed: Keyed) -> None:
    anonymous = httpx.get(f"{keyed.url}/dashboard/state", timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    with keyed.client(KEY_A) as a, keyed.client(KEY_B) as b:
        job_id = a.post("/jobs", json={"task": "fib", "params": {"n": 5}}).json()["id"]
        assert a.get(f"/jobs/{job_id}", params={"wait": 20}).json()["status"] == "succeeded"
        seen_by_a = {j["id"] for j in a.get("/dashboard/state").json()["jobs"]}
        seen_by_b = {j["id"] for j in b.get("/dashboard/state").json()["jobs"]}
    assert job_id in seen_by_a
    assert job_id not in seen_by_b

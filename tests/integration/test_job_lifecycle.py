"""A job's inputs are released exactly once, and no job is left queued or running for good.

Each test builds its own stack (redis-server with an append-only file, so a restart keeps the
records as a production Redis does; a prefork worker; uvicorn), because the tests stop
workers, kill them, purge their queues and restart Redis. The visibility timeout keeps its
default (over an hour): what brings a lost job back here is the job reaper, within
`FORKLIFT_WORKER_LOST_AFTER` (3 s here) plus its confirmation, never the broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis

from shared.jobstore import JobStore
from shared.keys import queue_keys
from shared.settings import Settings
from tests import stack
from tests.http_api import FINAL, submit, upload, wait
from tests.redis_proxy import RedisProxy

LOST_AFTER = 3.0
# Upper bounds for waits (not timing assertions): lost-after + confirmation + a pass, twice.
RECOVERY_S = 60.0


@dataclass
class Lifecycle:
    env: dict[str, str]
    port: int
    data_dir: Path
    redis_proc: stack.Proc
    api: stack.Proc | None = None
    url: str = ""
    workers: list[stack.Proc] = field(default_factory=list)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["REDIS_URL"], decode_responses=True)

    @property
    def prefix(self) -> str:
        return self.env["FORKLIFT_KEY_PREFIX"]

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def start_worker(self, concurrency: int = 2, name: str = "") -> stack.Proc:
        name = name or f"lc{uuid.uuid4().hex[:6]}"
        worker = stack.start_worker(self.env, name, concurrency)
        self.workers.append(worker)
        return worker

    def restart_redis(self, down_for: float) -> None:
        self.redis_proc.stop()
        time.sleep(down_for)  # the outage itself
        self.redis_proc = start_persistent_redis(self.port, self.data_dir)

    def celery(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real `celery` command line, against this stack's broker."""
        argv = [sys.executable, "-m", "celery", "-A", "worker.app", *args]
        return subprocess.run(
            argv, env=self.env, cwd=stack.REPO, capture_output=True, text=True, timeout=60
        )

    def queues(self) -> list[str]:
        settings = self.settings
        return [settings.queue, settings.domain_queue()]

    def queued_messages(self) -> int:
        return sum(self.redis.llen(k) for q in self.queues() for k in queue_keys(q))

    def find_message(self, job_id: str) -> tuple[str, str]:
        """The queue list holding a job's message, and the message."""
        for key in (k for q in self.queues() for k in queue_keys(q)):
            for raw in self.redis.lrange(key, 0, -1):
                if json.loads(raw)["headers"]["id"] == job_id:
                    return key, raw
        raise AssertionError(f"no message for job {job_id}")

    def record(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(f"{self.prefix}:job:{job_id}")

    def pins(self, array_id: str) -> int:
        return int(self.redis.hget(f"{self.prefix}:array:{array_id}", "pins") or 0)

    def live_jobs(self) -> list[str]:
        return self.redis.zrange(f"{self.prefix}:jobs:live", 0, -1)

    def unacked_jobs(self) -> list[str]:
        return [json.loads(v)[0]["headers"]["id"] for v in self.redis.hvals("unacked")]

    def running_entries(self) -> list[str]:
        return self.redis.hkeys(f"{self.prefix}:metrics:running")


def start_persistent_redis(port: int, data_dir: Path) -> stack.Proc:
    """redis-server that keeps its data across a restart (append-only file, fsync always)."""
    proc, _ = stack.start_redis(port, data_dir=data_dir, timeout=20)
    return proc


@contextlib.contextmanager
def lifecycle_stack(workers: int = 1, concurrency: int = 2, **extra: str) -> Iterator[Lifecycle]:
    port = stack.free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="forklift-lifecycle-"))
    redis_proc = start_persistent_redis(port, data_dir)
    env = stack.stack_env(
        f"redis://127.0.0.1:{port}/0",
        FORKLIFT_WORKER_LOST_AFTER=str(LOST_AFTER),
        FORKLIFT_JANITOR_INTERVAL="1",
        **extra,
    )
    lc = Lifecycle(env=env, port=port, data_dir=data_dir, redis_proc=redis_proc)
    try:
        for _ in range(workers):
            lc.start_worker(concurrency)
        lc.api, lc.url = stack.start_api(env)
        yield lc
    finally:
        for proc in [*lc.workers, *([lc.api] if lc.api else []), lc.redis_proc]:
            proc.stop()
        for name in stack.segments(env["FORKLIFT_SHM_PREFIX"]):
            (Path("/dev/shm") / name).unlink(missing_ok=True)
        for path in data_dir.rglob("*"):
            if path.is_file():
                path.unlink()
        for path in sorted(data_dir.rglob("*"), reverse=True):
            path.rmdir()
        data_dir.rmdir()


def wait_status(lc: Lifecycle, job_id: str, status: str, within: float = 30) -> dict[str, str]:
    return stack.wait_until(
        lambda: (r := lc.record(job_id)).get("status") == status and r,
        within,
        interval=0.05,
        what=f"job {job_id} {status}",
    )


def assert_nothing_left(lc: Lifecycle, arrays: list[str]) -> None:
    """No live job, no pin, no message, no unacked delivery, no running entry; every record
    has its TTL; every input deletes at once (204: pinned by nobody)."""
    stack.wait_until(lambda: not lc.unacked_jobs(), RECOVERY_S, what="no unacked message")
    assert lc.live_jobs() == []
    assert lc.queued_messages() == 0
    assert lc.running_entries() == []
    for array_id in arrays:
        assert lc.pins(array_id) == 0, array_id
    ttl_keys = list(lc.redis.scan_iter(f"{lc.prefix}:job:*"))
    ttls = [lc.redis.ttl(k) for k in ttl_keys]
    assert all(0 < t <= lc.settings.job_ttl for t in ttls), "a job record without a TTL"
    with lc.client() as http:
        for array_id in arrays:
            assert http.delete(f"/arrays/{array_id}").status_code == 204, array_id


# --- 9: a record cannot expire under a job that has not run -----------------------------------


def test_queued_job_outlives_its_ttl_and_its_inputs_are_released_once() -> None:
    job_ttl = 2
    with lifecycle_stack(workers=0, FORKLIFT_JOB_TTL=str(job_ttl)) as lc, lc.client() as http:
        a = upload(http, np.arange(10.0))["id"]
        first = submit(http, "sum", inputs={"a": a})
        assert lc.redis.ttl(f"{lc.prefix}:job:{first}") == -1  # live: no TTL
        assert lc.pins(a) == 1
        time.sleep(job_ttl + 1)  # longer than the TTL a finished record gets
        assert lc.record(first)["status"] == "queued"

        # A record removed by hand while queued, and its message delivered twice: the
        # inputs it pinned are released once, from the message, and no record reappears.
        second = submit(http, "sum", inputs={"a": a})
        keep = submit(http, "sum", inputs={"a": a})
        assert lc.pins(a) == 3
        lc.redis.delete(f"{lc.prefix}:job:{second}")
        queue, copy = lc.find_message(second)
        lc.redis.rpush(queue, copy)

        lc.start_worker()
        assert wait(http, first)["result"] == 45.0
        assert wait(http, keep)["result"] == 45.0
        stack.wait_until(lambda: lc.queued_messages() == 0, 20, what="queues drained")
        stack.wait_until(lambda: not lc.unacked_jobs(), 20, what="every delivery acked")
        assert lc.pins(a) == 0  # 3 pins, released once each (2 would leave -1)
        assert not lc.redis.exists(f"{lc.prefix}:job:{second}")  # no TTL-less hash written
        tombstone = f"{lc.prefix}:released:{second}"
        assert 0 < lc.redis.ttl(tombstone) <= job_ttl
        assert 0 < lc.redis.ttl(f"{lc.prefix}:job:{first}") <= job_ttl
        assert lc.live_jobs() == []
        assert http.delete(f"/arrays/{a}").status_code == 204


# --- 11: a duplicate delivery's losing attempt leaves the inputs pinned ---------------------


def test_duplicate_delivery_losing_attempt_does_not_unpin() -> None:
    with lifecycle_stack(concurrency=2) as lc, lc.client() as http:
        a = upload(http, np.ones(1000))["id"]
        job_id = submit(http, "inspect_input", inputs={"a": a}, hold=4.0)
        first = wait_status(lc, job_id, "running")
        # Half-way through (so the second attempt outlives the first by seconds), the same
        # message delivered again while the first attempt runs (what a visibility timeout
        # shorter than the job, or a restore, does): a copy of the unacked entry.
        time.sleep(2.0)
        entry = next(json.loads(v) for v in lc.redis.hvals("unacked") if job_id in v)
        payload, _, routing_key = entry
        lc.redis.rpush(routing_key, json.dumps(payload))
        stack.wait_until(
            lambda: lc.record(job_id).get("attempts") == "2", 20, what="second attempt started"
        )
        worker = lc.workers[0]
        stack.wait_until(
            lambda: f"job {job_id} ended moved" in worker.log(), 20, what="first attempt ended"
        )
        record = lc.record(job_id)
        assert record["status"] == "running" and record["attempts"] == "2", record
        assert record["pid"] != first["pid"]
        assert lc.pins(a) == 1, "the losing attempt unpinned inputs the other one reads"
        assert "released" not in record
        done = wait(http, job_id)
        assert done["status"] == "succeeded" and len(done["attempts"]) == 2
        assert done["result"]["sum"] == 1000.0
        assert done["worker"]["pid"] == int(record["pid"])
        assert_nothing_left(lc, [a])


# --- 14: purged and revoked messages -------------------------------------------------------


def test_purged_queue_cancels_its_jobs_and_releases_their_inputs() -> None:
    with lifecycle_stack(workers=0) as lc, lc.client() as http:
        a = upload(http, np.ones(100))["id"]
        jobs = [submit(http, "sum", inputs={"a": a}) for _ in range(3)]
        assert lc.pins(a) == 3
        purged = lc.celery("purge", "-f", "-Q", ",".join(lc.queues()))
        assert purged.returncode == 0, purged.stderr
        assert lc.queued_messages() == 0
        purged_at = time.monotonic()
        ended = [wait(http, j, RECOVERY_S) for j in jobs]
        took = time.monotonic() - purged_at
        for record in ended:
            assert record["status"] == "cancelled", record
            assert record["error"].startswith("message lost"), record
            assert record["started_at"] is None
        assert_nothing_left(lc, [a])
        print(f"purged jobs cancelled {took:.1f} s after the purge")


def test_revoked_jobs_end_cancelled_and_release_their_inputs() -> None:
    with lifecycle_stack(concurrency=1) as lc, lc.client() as http:
        a = upload(http, np.ones(100))["id"]
        blocker = submit(http, "sleep", seconds=30.0)
        wait_status(lc, blocker, "running")
        revoked = submit(http, "sum", inputs={"a": a})  # waits in the queue behind it
        assert lc.record(revoked)["status"] == "queued"
        out = lc.celery("control", "revoke", revoked)
        assert out.returncode == 0 and "OK" in out.stdout, (out.stdout, out.stderr)
        assert lc.record(revoked)["status"] == "queued"  # revoked, not yet delivered
        assert http.delete(f"/jobs/{blocker}").status_code == 200  # let the worker go on
        done = wait(http, revoked, RECOVERY_S)
        assert done["status"] == "cancelled", done
        assert done["error"].startswith("revoked") and "before it ran" in done["error"]
        assert done["started_at"] is None
        assert wait(http, blocker)["status"] == "cancelled"

        # Revoked with terminate while running: the child is killed, the record ends.
        from shared.celery_app import create_app

        running = submit(http, "inspect_input", inputs={"a": a}, hold=30.0)
        wait_status(lc, running, "running")
        app = create_app(lc.settings)
        try:
            app.control.revoke(running, terminate=True, signal="SIGKILL")
        finally:
            app.close()
        killed = wait(http, running, RECOVERY_S)
        assert killed["status"] == "cancelled", killed
        assert "killed while running" in killed["error"]
        assert wait(http, submit(http, "fib", n=10))["result"] == 55  # the pool refilled
        assert_nothing_left(lc, [a])


# --- 10: Redis errors at finish are retried, the message is not acked meanwhile ---------------


def test_redis_outage_during_a_job_is_retried_not_acked() -> None:
    with lifecycle_stack(concurrency=1) as lc:
        with lc.client() as http:
            a = upload(http, np.ones(100))["id"]
            job_id = submit(http, "inspect_input", inputs={"a": a}, hold=1.5)
        wait_status(lc, job_id, "running")
        lc.restart_redis(down_for=4.0)  # the job ends while Redis is down
        with lc.client() as http:
            stack.wait_until(lambda: http.get("/healthz").status_code == 200, 30, what="API back")
            done = wait(http, job_id, RECOVERY_S)
        assert done["status"] == "succeeded", done
        assert len(done["attempts"]) == 1  # finished by its first attempt, not run again
        assert done["result"]["sum"] == 100.0
        log = lc.workers[0].log()
        assert f"job {job_id} finish: Redis error" in log
        assert f"job {job_id} ended succeeded" in log
        assert_nothing_left(lc, [a])


def test_after_a_redis_restart_stale_connections_cost_one_retryable_burst() -> None:
    """The API's pool grows under a burst; after a restart its idle connections are stale
    and a command on one fails ("Connection closed by server"). Such a request is a 503 with
    Retry-After (what clients retry), and the first one drops every idle connection
    (api/errors.py:drop_stale_connections): the next burst gets 200s only."""

    def burst(url: str, path: str, n: int = 16) -> list[httpx.Response]:
        answers: list[httpx.Response] = []
        gate = threading.Barrier(n)

        def one() -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                gate.wait()
                answers.append(client.get(path))

        threads = [threading.Thread(target=one) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    with lifecycle_stack(concurrency=1) as lc:
        with lc.client() as http:
            job_id = submit(http, "fib", n=10)
            assert wait(http, job_id)["result"] == 55
        assert [r.status_code for r in burst(lc.url, f"/jobs/{job_id}")] == [200] * 16
        lc.restart_redis(down_for=1.0)
        with lc.client() as http:
            stack.wait_until(lambda: http.get("/healthz").status_code == 200, 30, what="API back")
        second = burst(lc.url, f"/jobs/{job_id}")
        for answer in second:
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] and answer.json()["error"]["code"] == (
                    "unavailable"
                )
        third = burst(lc.url, f"/jobs/{job_id}")
        assert [r.status_code for r in third] == [200] * 16
        print(f"after the restart: {sum(r.status_code == 503 for r in second)} of 16 were 503")


class ReplyCutter(RedisProxy):
    """A proxy from a worker to Redis that lets chosen scripts run, then loses their reply.

    For each sha in `targets`, the first EVALSHA of it that Redis really runs (not answered
    NOSCRIPT) reaches Redis, and its connection is cut before the reply comes back: the
    worker sees a connection error for a change that was made, what a Redis failover or a
    network cut does.
    """

    def __init__(self, redis_url: str, targets: set[str]) -> None:
        self.targets = {t.encode() for t in targets}
        self.cut: list[bytes] = []
        self.lock = threading.Lock()
        super().__init__(redis_url)

    def request(self, chunk: bytes, connection: dict[str, object]) -> None:
        with self.lock:
            hit = [t for t in self.targets if t in chunk]
        if hit:
            connection["pending"] = hit[0]  # the target sent on this connection

    def reply(self, chunk: bytes, connection: dict[str, object]) -> bool:
        target = connection.pop("pending", None)
        if target is None or chunk.startswith(b"-NOSCRIPT"):
            return True
        with self.lock:
            if target in self.targets:
                self.targets.discard(target)
                self.cut.append(target)  # type: ignore[arg-type]
                return False
        return True


def test_lost_replies_at_start_and_finish_are_retried_without_a_second_attempt() -> None:
    with lifecycle_stack(workers=0) as lc:
        scripts = JobStore(redis.Redis(), lc.settings)  # only for the scripts' sha1s
        cutter = ReplyCutter(lc.env["REDIS_URL"], {scripts._start.sha, scripts._finish.sha})
        try:
            lc.workers.append(stack.start_worker(dict(lc.env, REDIS_URL=cutter.url()), "cut", 1))
            with lc.client() as http:
                a = upload(http, np.ones(10))["id"]
                done = wait(http, submit(http, "inspect_input", inputs={"a": a}), RECOVERY_S)
            assert sorted(cutter.cut) == sorted(
                s.encode() for s in (scripts._start.sha, scripts._finish.sha)
            )
            assert done["status"] == "succeeded", done
            assert len(done["attempts"]) == 1  # the start that ran before its reply was lost
            assert done["result"]["sum"] == 10.0
            worker = lc.workers[-1]
            ended = f"job {done['id']} ended succeeded"
            stack.wait_until(lambda: ended in worker.log(), 10, what="the job's end logged")
            for step in ("start", "finish"):
                assert f"job {done['id']} {step}: Redis error" in worker.log()
            assert_nothing_left(lc, [a])
        finally:
            for worker in lc.workers:
                worker.stop()
            cutter.close()


# --- 16: a worker that dies whole, within seconds, whatever the visibility timeout ------------


def test_killed_worker_job_is_delivered_again_within_seconds() -> None:
    with lifecycle_stack(concurrency=1) as lc, lc.client() as http:
        assert lc.settings.redelivery_margin == 600  # the default: visibility over an hour
        a = upload(http, np.ones(100))["id"]
        job_id = submit(http, "inspect_input", inputs={"a": a}, hold=2.0)
        wait_status(lc, job_id, "running")
        lc.workers[0].stop(signal.SIGKILL)  # main process and child at once
        killed_at = time.monotonic()
        assert lc.record(job_id)["status"] == "running"
        assert lc.unacked_jobs() == [job_id]
        lc.start_worker(concurrency=1)
        done = wait(http, job_id, RECOVERY_S)
        took = time.monotonic() - killed_at
        assert done["status"] == "succeeded" and len(done["attempts"]) == 2, done
        assert done["result"]["sum"] == 100.0
        assert "requeued_at" in lc.record(job_id)  # the reaper put it back, not the broker
        assert_nothing_left(lc, [a])
        print(f"job of a SIGKILLed worker succeeded again {took:.1f} s after the kill")


def test_worker_restarted_under_the_same_name_does_not_hold_the_old_job() -> None:
    """A worker back at once under its old name (systemd, compose `restart:`) beats again,
    so it looks alive: its held-list, which lacks the job, says the job is lost."""
    with lifecycle_stack(workers=0) as lc, lc.client() as http:
        lc.start_worker(concurrency=1, name="same")
        a = upload(http, np.ones(10))["id"]
        job_id = submit(http, "inspect_input", inputs={"a": a}, hold=2.0)
        first = wait_status(lc, job_id, "running")
        lc.workers[0].stop(signal.SIGKILL)
        lc.start_worker(concurrency=1, name="same")
        done = wait(http, job_id, RECOVERY_S)
        assert done["status"] == "succeeded" and len(done["attempts"]) == 2, done
        assert done["worker"]["pid"] != int(first["pid"])
        assert lc.record(job_id)["node"] == first["node"]  # the same worker name both times
        assert "requeued_at" in lc.record(job_id)
        assert_nothing_left(lc, [a])


def test_lost_job_whose_message_the_broker_lost_is_published_again() -> None:
    with lifecycle_stack(concurrency=1) as lc, lc.client() as http:
        a = upload(http, np.ones(10))["id"]
        job_id = submit(http, "inspect_input", inputs={"a": a}, hold=2.0)
        wait_status(lc, job_id, "running")
        lc.workers[0].stop(signal.SIGKILL)
        # The broker no longer has the message either (a Redis restored from an older
        # snapshot, or a duplicate delivery's ack that removed the shared delivery tag).
        (tag,) = lc.redis.hkeys("unacked")
        lc.redis.hdel("unacked", tag)
        lc.redis.zrem("unacked_index", tag)
        lc.start_worker(concurrency=1)
        done = wait(http, job_id, RECOVERY_S)
        assert done["status"] == "succeeded" and len(done["attempts"]) == 2, done
        assert done["result"]["sum"] == 10.0
        api_log = lc.api.log() if lc.api else ""
        assert "republished 1" in api_log, api_log[-2000:]
        assert_nothing_left(lc, [a])


def test_job_whose_worker_keeps_dying_fails_once_attempts_are_spent() -> None:
    with lifecycle_stack(concurrency=1, FORKLIFT_JOB_MAX_ATTEMPTS="2") as lc:
        with lc.client() as http:
            a = upload(http, np.ones(10))["id"]
            job_id = submit(http, "inspect_input", inputs={"a": a}, hold=30.0)
        for attempt in (1, 2):
            stack.wait_until(
                lambda n=attempt: (
                    lc.record(job_id).get("attempts") == str(n)
                    and lc.record(job_id)["status"] == "running"
                ),
                RECOVERY_S,
                what=f"attempt {attempt} running",
            )
            lc.workers[-1].stop(signal.SIGKILL)
            if attempt == 1:
                lc.start_worker(concurrency=1)
        with lc.client() as http:
            done = wait(http, job_id, RECOVERY_S)
        assert done["status"] == "failed", done
        assert done["error"].startswith("worker lost") and "2 attempt(s)" in done["error"]
        lc.start_worker(concurrency=1)
        assert_nothing_left(lc, [a])


# --- faults under load ---------------------------------------------------------------------


def test_faults_under_load_end_with_every_job_done_and_nothing_leaked() -> None:
    rng = random.Random(7)
    with lifecycle_stack(concurrency=2, FORKLIFT_JOB_MAX_ATTEMPTS="6") as lc:
        with lc.client() as http:
            arrays = [upload(http, np.full(1000, float(i)))["id"] for i in range(4)]
            jobs: dict[str, float] = {}
            for _ in range(48):
                k = rng.randrange(len(arrays))
                job_id = submit(
                    http, "inspect_input", inputs={"a": arrays[k]}, hold=rng.uniform(0.2, 0.8)
                )
                jobs[job_id] = 1000.0 * k
            fibs = [submit(http, "fib", n=15) for _ in range(8)]  # jobs without inputs

        def some_running() -> list[str]:
            return [j for j in lc.running_entries() if j in jobs]

        # 1. a child killed mid-job
        stack.wait_until(some_running, 30, what="a job running")
        worker = lc.workers[-1]
        children = stack.children_of(worker.pid)
        os.kill(children[0], signal.SIGKILL)
        # 2. the whole worker killed, a new one started
        stack.wait_until(some_running, 30, what="a job running")
        worker.stop(signal.SIGKILL)
        lc.start_worker(concurrency=2)
        # 3. Redis restarted under running jobs
        stack.wait_until(some_running, 30, what="a job running")
        lc.restart_redis(down_for=2.0)
        # 4. another child killed
        with contextlib.suppress(TimeoutError, IndexError, ProcessLookupError):
            stack.wait_until(some_running, 30, what="a job running")
            os.kill(stack.children_of(lc.workers[-1].pid)[0], signal.SIGKILL)

        with lc.client() as http:
            stack.wait_until(lambda: http.get("/healthz").status_code == 200, 30, what="API back")
            done = {j: wait(http, j, 120) for j in [*jobs, *fibs]}
        statuses = {d["status"] for d in done.values()}
        assert statuses == {"succeeded"}, {
            j: d for j, d in done.items() if d["status"] != "succeeded"
        }
        for job_id, expected in jobs.items():
            assert done[job_id]["result"]["sum"] == expected
        assert all(done[j]["result"] == 610 for j in fibs)
        assert all(d["status"] in FINAL for d in done.values())
        assert_nothing_left(lc, arrays)
        assert stack.array_segments(lc.env["FORKLIFT_SHM_PREFIX"]) == set()
        again = sum(1 for d in done.values() if len(d["attempts"]) > 1)
        print(f"{len(done)} jobs, {again} delivered more than once, all succeeded")

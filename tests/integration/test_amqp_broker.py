"""RabbitMQ as the broker (issue 18, item 2), on a private stack of its own.

The stack keeps job records, arrays and events in the session's Redis (its own key prefix)
and its Celery messages in a RabbitMQ vhost made for this module (`rabbitmqctl add_vhost
forklift-test-<hex>`, deleted afterwards): nothing here touches another stack's queues. The
API reaches the broker through a TCP relay this module runs, so "the broker is down" is the
relay closed, for this API only. Short limits make what takes minutes in production take
seconds: reaper every second, two attempts per job.

Skipped when RabbitMQ (127.0.0.1:5672) or `rabbitmqctl` is not there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from shared.settings import Settings
from tests import stack
from tests.http_api import FINAL, submit, upload, wait

RABBIT = stack.RABBITMQ
LOST_AFTER = 3.0  # FORKLIFT_WORKER_LOST_AFTER: the reaper runs every second
MAX_ATTEMPTS = 3

pytestmark = pytest.mark.skipif(
    not stack.rabbitmq_available(), reason="needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl"
)


class Relay:
    """A TCP relay to RabbitMQ on a port of its own: `stop()` is the broker gone for whoever
    connects through it (listener and every relayed connection closed), `start()` it back."""

    def __init__(self) -> None:
        self.port = stack.free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(RABBIT, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@dataclass
class Amqp:
    env: dict[str, str]  # the workers' (direct to RabbitMQ)
    api_env: dict[str, str]  # the API's (through the relay)
    vhost: str
    relay: Relay
    api: stack.Proc
    url: str
    worker: stack.Proc
    redis: redis.Redis

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def start_worker(self, concurrency: int = 2) -> stack.Proc:
        self.worker = stack.start_worker(self.env, f"amqp{uuid.uuid4().hex[:6]}", concurrency)
        return self.worker

    def depths(self) -> dict[str, int]:
        """Ready messages in the stack's common and domain queues, asked of RabbitMQ."""
        settings = self.settings
        return stack.amqp_depths(settings.broker, (settings.queue, settings.domain_queue()))


@pytest.fixture(scope="module")
def amqp(redis_url: str) -> Iterator[Amqp]:
    with stack.amqp_vhost() as (vhost, broker_url):
        relay = Relay()
        relay.start()
        env = stack.stack_env(
            redis_url,
            FORKLIFT_BROKER_URL=broker_url,
            FORKLIFT_WORKER_LOST_AFTER=str(LOST_AFTER),
            FORKLIFT_JOB_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            FORKLIFT_JANITOR_INTERVAL="1",
        )
        relayed = f"amqp://guest:guest@127.0.0.1:{relay.port}/{vhost}"
        api_env = {**env, "FORKLIFT_BROKER_URL": relayed}
        before = stack.segments(env["FORKLIFT_SHM_PREFIX"])
        procs: list[stack.Proc] = []
        a: Amqp | None = None
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            worker = stack.start_worker(env, "amqp", 2)
            procs.append(worker)
            api, url = stack.start_api(api_env)
            procs.append(api)
            a = Amqp(env, api_env, vhost, relay, api, url, worker, client)
            yield a
        finally:
            for proc in (a.worker, a.api) if a else reversed(procs):
                proc.stop()
            relay.stop()
            client.close()
            left = stack.segments(env["FORKLIFT_SHM_PREFIX"]) - before
            for name in left:
                (Path("/dev/shm") / name).unlink(missing_ok=True)
            assert not left, f"segments left behind: {sorted(left)}"


def _view(http: httpx.Client, job_id: str) -> dict:
    response = http.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    view: dict = response.json()
    return view


def _running(http: httpx.Client, job_id: str, within: float = 20) -> dict:
    return stack.wait_until(
        lambda: (v := _view(http, job_id))["status"] == "running" and v,
        within,
        what=f"job {job_id} running",
    )


def _batch(http: httpx.Client, bodies: list[dict]) -> list[str]:
    response = http.post("/jobs/batch", json={"jobs": bodies})
    assert response.status_code == 202, response.text
    return [job["id"] for job in response.json()["jobs"]]


def _cancel_unfinished(http: httpx.Client, ids: list[str]) -> None:
    for job_id in ids:
        if _view(http, job_id)["status"] not in FINAL:
            http.delete(f"/jobs/{job_id}")


@contextlib.contextmanager
def _array(http: httpx.Client, a: Amqp, values: np.ndarray) -> Iterator[str]:
    """An uploaded array, deleted after the block, its segment checked gone."""
    before = stack.array_segments(a.settings.shm_prefix)
    array_id = upload(http, values)["id"]
    try:
        yield array_id
    finally:
        assert http.delete(f"/arrays/{array_id}").status_code in (204, 404)
        stack.wait_arrays_freed(a.settings.shm_prefix, before)


def _queue_gauges(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("forklift_queue_depth{"):
            labels, _, value = line.rpartition(" ")
            out[labels.split('queue="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def test_queues_are_priority_queues_and_an_array_job_runs_on_its_domain_queue(
    amqp: Amqp,
) -> None:
    """Both children busy: a job whose input lives here waits in the domain queue, 3 plain
    ones in the common queue; RabbitMQ's counts, /metrics and the dashboard say so; then each
    runs, the array job with its right result. Both queues carry x-max-priority. (~3 s)"""
    settings = amqp.settings
    common, domain = settings.queue, settings.domain_queue()
    with amqp.client() as http, _array(http, amqp, np.arange(5.0)) as x:
        busy = [submit(http, "sleep", seconds=s) for s in (1.5, 1.5)]
        ids = list(busy)
        try:
            for job_id in busy:
                _running(http, job_id)
            ids += _batch(http, [{"task": "sleep", "params": {"seconds": 0}}] * 3)
            ids.append(submit(http, "sum", inputs={"a": x}))
            assert amqp.depths() == {common: 3, domain: 1}
            assert _queue_gauges(http) == {common: 3.0, domain: 1.0}
            shown = {q["name"]: q["depth"] for q in http.get("/dashboard/state").json()["queues"]}
            assert shown == {common: 3, domain: 1}
            assert _view(http, busy[1])["status"] == "running", "submitting took too long"
            views = [wait(http, job_id, 20) for job_id in ids]
            assert [v["status"] for v in views] == ["succeeded"] * 6
            assert views[-1]["result"] == 10.0
            assert amqp.depths() == {common: 0, domain: 0}
        finally:
            _cancel_unfinished(http, ids)
    out = stack.rabbitmqctl("list_queues", "-p", amqp.vhost, "name", "arguments")
    for queue in (common, domain):
        line = next(ln for ln in out.splitlines() if ln.split("\t")[0] == queue)
        assert '"x-max-priority",9' in line.replace(" ", ""), line


def test_priority_9_overtakes_twenty_priority_0_jobs(amqp: Amqp) -> None:
    """Both children busy (1.5 s and 3 s), 20 priority-0 jobs, then one priority-9: the child
    freed first takes the 9 (RabbitMQ's priority queue, identity mapping). (~3.5 s)"""
    with amqp.client() as http:
        slow = [submit(http, "sleep", seconds=s) for s in (1.5, 3.0)]
        ids = list(slow)
        try:
            for job_id in slow:
                _running(http, job_id)
            low = _batch(http, [{"task": "sleep", "params": {"seconds": 0}}] * 20)
            high = http.post(
                "/jobs", json={"task": "sleep", "params": {"seconds": 0}, "priority": 9}
            ).json()["id"]
            ids += [*low, high]
            assert amqp.depths()[amqp.settings.queue] == 21
            assert _view(http, slow[0])["status"] == "running", "submitting took too long"
            views = {job_id: wait(http, job_id, 30) for job_id in ids}
            assert {v["status"] for v in views.values()} == {"succeeded"}
            first_low = min(views[j]["started_at"] for j in low)
            assert views[high]["started_at"] >= views[slow[0]]["finished_at"]
            assert views[high]["started_at"] < first_low, (views[high]["started_at"], first_low)
        finally:
            _cancel_unfinished(http, ids)


def test_a_killed_child_job_is_redelivered_and_succeeds(amqp: Amqp) -> None:
    """SIGKILL the child running a job: Celery rejects its message back to RabbitMQ, which
    delivers it again at once; the second attempt succeeds. (~3 s)"""
    with amqp.client() as http:
        job_id = submit(http, "sleep", seconds=1.0)
        victim = _running(http, job_id)["worker"]["pid"]
        assert victim in stack.children_of(amqp.worker.pid)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        done = wait(http, job_id, 20)
        took = time.monotonic() - killed_at
    assert done["status"] == "succeeded", done
    assert len(done["attempts"]) == 2 and done["worker"]["pid"] != victim
    assert took < 8, f"redelivery after a child's death took {took:.1f} s"
    stack.wait_until(lambda: len(stack.children_of(amqp.worker.pid)) == 2, 10, what="pool")


def test_a_worker_killed_whole_has_its_job_requeued_and_redelivered(amqp: Amqp) -> None:
    """SIGKILL the worker (main process and children) mid-job: RabbitMQ puts the unacked
    message back in the queue as its connection closes, the reaper puts the record back to
    `queued` (no message republished: it would run twice), and a new worker runs it once,
    within seconds, not after any visibility timeout. (~10 s)"""
    with amqp.client() as http:
        log = Path("/tmp") / f"forklift-amqp-runs-{uuid.uuid4().hex}"
        try:
            job_id = submit(http, "record_run", log=str(log), tag="lost", seconds=1.0)
            _running(http, job_id)
            amqp.worker.stop(signal.SIGKILL)
            stack.wait_until(
                lambda: amqp.depths()[amqp.settings.queue] == 1, 10, what="message requeued"
            )
            queued = stack.wait_until(
                lambda: (v := _view(http, job_id))["status"] == "queued" and v,
                LOST_AFTER * 4 + 10,
                what="record requeued by the reaper",
            )
            assert queued["started_at"] is None or queued["status"] == "queued"
            time.sleep(2)  # more reaper passes: nothing republished meanwhile
            assert amqp.depths()[amqp.settings.queue] == 1
            amqp.start_worker()  # returns once the worker has reported in
            up = time.time()
            done = wait(http, job_id, 30)
            assert done["status"] == "succeeded", done
            assert len(done["attempts"]) == 2, done["attempts"]
            print(f"redelivered {done['started_at'] - up:.2f} s after the new worker was up")
            assert done["started_at"] - up < 5
            assert log.read_text().count("done lost") == 1
            assert amqp.depths()[amqp.settings.queue] == 0
        finally:
            log.unlink(missing_ok=True)


def test_delayed_jobs_and_retries_go_through_the_due_index(amqp: Amqp) -> None:
    """A delayed job starts after its time; a flaky job fails twice and succeeds on its third
    attempt (both wait in forklift's due index, then are published to RabbitMQ). (~3 s)"""
    runs = Path("/tmp") / f"forklift-amqp-flaky-{uuid.uuid4().hex}"
    with amqp.client() as http, _array(http, amqp, np.ones(3)) as x:
        try:
            delayed = http.post(
                "/jobs", json={"task": "sleep", "params": {"seconds": 0}, "delay": 1.0}
            ).json()
            flaky = submit(http, "flaky", inputs={"a": x}, runs=str(runs))
            assert _view(http, delayed["id"])["status"] == "queued"
            done = wait(http, delayed["id"], 20)
            assert done["status"] == "succeeded"
            assert done["started_at"] >= delayed["not_before"]
            assert done["started_at"] - delayed["not_before"] < 1.5
            retried = wait(http, flaky, 30)
            assert retried["status"] == "succeeded", retried
            assert retried["result"] == 3.0 and len(retried["attempts"]) == 3
            assert len(runs.read_text().splitlines()) == 3
        finally:
            runs.unlink(missing_ok=True)


def _assert_unavailable(response: httpx.Response, elapsed: float) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["code"] == "unavailable"
    assert elapsed < 8, f"answered after {elapsed:.1f} s"


def test_broker_down_on_submit_is_503_and_leaves_nothing_then_reconnects(amqp: Amqp) -> None:
    """The API's broker gone (its relay closed): a submit, a batch and a job with an array
    input answer 503 with Retry-After, leaving no record, no live entry, no pin and no
    message; with the broker back the same API submits again and the job runs. (~3 s)"""
    settings = amqp.settings
    keys = settings.keys
    with amqp.client() as http, _array(http, amqp, np.arange(4.0)) as x:
        assert wait(http, submit(http, "fib", n=5))["result"] == 5  # the relay works
        records = set(amqp.redis.scan_iter(f"{keys.job_prefix}*", count=1000))
        live = amqp.redis.zcard(keys.jobs_live)
        amqp.relay.stop()
        try:
            bodies = [
                {"task": "fib", "params": {"n": 5}},
                {"task": "sum", "inputs": {"a": {"array": x}}},
            ]
            for body in bodies:
                start = time.monotonic()
                _assert_unavailable(http.post("/jobs", json=body), time.monotonic() - start)
            start = time.monotonic()
            response = http.post("/jobs/batch", json={"jobs": bodies})
            _assert_unavailable(response, time.monotonic() - start)
        finally:
            amqp.relay.start()
        assert set(amqp.redis.scan_iter(f"{keys.job_prefix}*", count=1000)) == records
        assert amqp.redis.zcard(keys.jobs_live) == live
        assert int(amqp.redis.hget(keys.array(x), "pins") or 0) == 0
        assert amqp.depths() == {settings.queue: 0, settings.domain_queue(): 0}
        again = submit(http, "sum", inputs={"a": x})
        assert wait(http, again)["result"] == 6.0


def test_a_worker_that_loses_the_broker_mid_job_runs_it_once(amqp: Amqp) -> None:
    """A worker (through a relay of its own) loses its broker connection while a job runs:
    RabbitMQ requeues the message at once, so Celery terminates the running job
    (`worker_cancel_long_running_tasks_on_connection_loss`) rather than let it run twice at
    the same time; once the worker is back the job runs again and completes once. (~8 s)"""
    relay = Relay()
    relay.start()
    log = Path("/tmp") / f"forklift-amqp-loss-{uuid.uuid4().hex}"
    vhost_url = amqp.settings.broker
    env = {**amqp.env, "FORKLIFT_BROKER_URL": vhost_url.replace(":5672/", f":{relay.port}/")}
    amqp.worker.stop()
    worker = stack.start_worker(env, f"loss{uuid.uuid4().hex[:6]}", 2)
    try:
        with amqp.client() as http:
            job_id = submit(http, "record_run", log=str(log), tag="once", seconds=2.0)
            _running(http, job_id)
            relay.stop()
            time.sleep(1.0)
            relay.start()
            done = wait(http, job_id, 40)
            assert done["status"] == "succeeded", done
            assert len(done["attempts"]) == 2, done["attempts"]
            time.sleep(2.5)  # a first run left going would have written by now
            assert log.read_text().count("done once") == 1, log.read_text()
            assert amqp.depths()[amqp.settings.queue] == 0
    finally:
        worker.stop()
        relay.stop()
        log.unlink(missing_ok=True)
        amqp.start_worker()


def test_forklift_up_broker_runs_jobs_through_rabbitmq(redis_url: str) -> None:
    """`forklift up --broker amqp://...` (on the session's Redis): the API and the worker
    both take the broker, a job runs through the vhost's queue, and SIGINT stops all. (~10 s)"""
    from tests.integration import test_deploy as deploy

    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    env = deploy._launcher_env(FORKLIFT_QUEUE=f"forklift-up-{uuid.uuid4().hex[:8]}")
    with stack.amqp_vhost() as (vhost, broker_url):
        proc, url = deploy._start_launcher(env, redis_port, up_options=("--broker", broker_url))
        try:
            assert "broker: amqp://guest:***@127.0.0.1:5672/" in proc.log()
            deploy._run_fib(url)
            queues = stack.rabbitmqctl("list_queues", "-p", vhost, "name", "messages")
            assert env["FORKLIFT_QUEUE"] in {line.split("\t")[0] for line in queues.splitlines()}
            code, started = deploy._interrupt(proc)
            assert code == 0, proc.log()[-3000:]
            assert deploy._all_gone(started | {proc.pid}) == set()
        finally:
            proc.stop()

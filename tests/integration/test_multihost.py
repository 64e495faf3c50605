"""Two shm domains for real: data-locality routing, replicas pulled once, freed with the original.

Domain A is this machine's /dev/shm: an API and a worker started the usual way. Domain B is a
second "host": its own API and worker run inside `unshare --ipc --mount` with a fresh tmpfs on
/dev/shm, so they cannot see A's segments (nor A theirs), and reach the test's Redis and A's API
over loopback. Both derive their shm domain themselves (boot id + IPC namespace). Tests run in
order on one module-scoped cluster and count pulls with the replica counters in Redis.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import redis

from shared.arrays.replicas import TOKEN_HEADER, ReplicaStore, read_stats
from shared.arrays.store import ArrayStore
from shared.schemas import ArrayRef
from shared.settings import Settings
from shared.workers import WorkerStore
from tests import stack
from tests.http_api import load_npy, submit, upload, wait

pytestmark = pytest.mark.slow

TOKEN = uuid.uuid4().hex


def _unshare_argv(script: str) -> list[str]:
    return ["unshare", "--ipc", "--mount", "--propagation", "private", "sh", "-c", script]


def _namespaces_work() -> str | None:
    """None when a private IPC + mount namespace with its own /dev/shm can be made here."""
    probe = "mount -t tmpfs -o size=1m tmpfs /dev/shm && ls -A /dev/shm | wc -l"
    try:
        out = subprocess.run(_unshare_argv(probe), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare cannot run: {exc}"
    if out.returncode != 0 or out.stdout.strip() != "0":
        return f"unshare --ipc --mount + tmpfs on /dev/shm failed: {out.stderr.strip()[:300]}"
    return None


@dataclass
class Domain:
    name: str
    url: str
    env: dict[str, str]
    procs: list[stack.Proc] = field(default_factory=list)
    shm_domain: str = ""
    ns_pid: int = 0  # a process inside the domain's namespaces (B only)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def segments(self, prefix: str) -> set[str]:
        if not self.ns_pid:
            return stack.segments(prefix)
        out = subprocess.run(
            ["nsenter", "-t", str(self.ns_pid), "-m", "ls", "-A", "/dev/shm"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return {n for n in out.stdout.split() if n.startswith(prefix)}


@dataclass
class Cluster:
    a: Domain
    b: Domain
    worker_a: stack.Proc
    redis: redis.Redis
    settings: Settings
    arrays: dict[str, str] = field(default_factory=dict)  # name -> id, for the delete test

    @property
    def prefix(self) -> str:
        return self.settings.shm_prefix

    def stats(self) -> dict[str, int]:
        return read_stats(self.redis, self.settings)

    def pulls(self, domain: Domain) -> int:
        return self.stats().get(f"pulls:{domain.shm_domain}", 0)


def run(http: httpx.Client, task: str, params: dict | None = None, **inputs: str) -> dict:
    return wait(http, submit(http, task, inputs=inputs, **(params or {})), 60)


def _start_b(env: dict[str, str], port: int, name: str) -> stack.Proc:
    api = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
           str(port), "--log-level", "warning"]  # fmt: skip
    worker = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=prefork",
              "--concurrency=2", "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
              "--loglevel=INFO"]  # fmt: skip
    script = (
        "mount -t tmpfs -o size=256m tmpfs /dev/shm && "
        f"{{ {shlex.join(api)} & {shlex.join(worker)} & wait; }}"
    )
    return stack.spawn("domain-b", _unshare_argv(script), env)


def _worker_info(client: redis.Redis, settings: Settings, name: str) -> dict | None:
    for member in client.zrange(settings.keys.workers, 0, -1):
        if member.startswith(f"{name}@"):
            raw = client.get(settings.keys.worker(member))
            return json.loads(raw) if raw else None
    return None


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[Cluster]:
    reason = _namespaces_work()
    if reason:
        pytest.skip(f"cannot simulate a second host: {reason}")
    tag = uuid.uuid4().hex[:8]
    base = stack.stack_env(
        redis_url,
        FORKLIFT_QUEUE=f"forklift-mh-{tag}",  # not the queue of the session's other stacks
        FORKLIFT_JANITOR_INTERVAL="1",
        FORKLIFT_INTERNAL_TOKEN=TOKEN,
    )
    port_a, port_b = stack.free_port(), stack.free_port()
    # Each domain reads arrays from the configured peers only (shared/trust.py).
    base["FORKLIFT_PEER_URLS"] = f"http://127.0.0.1:{port_a},http://127.0.0.1:{port_b}"
    env_a = {**base, "FORKLIFT_API_INTERNAL_URL": f"http://127.0.0.1:{port_a}"}
    env_b = {**base, "FORKLIFT_API_INTERNAL_URL": f"http://127.0.0.1:{port_b}"}
    settings = Settings.from_env(env_a)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    a = Domain("A", f"http://127.0.0.1:{port_a}", env_a)
    b = Domain("B", f"http://127.0.0.1:{port_b}", env_b)
    procs: list[stack.Proc] = []
    try:
        worker_a = stack.start_worker(env_a, "a", concurrency=1)
        procs.append(worker_a)
        api_a, _ = stack.start_api(env_a, port_a)
        procs.append(api_a)
        proc_b = _start_b(env_b, port_b, "b")
        procs.append(proc_b)
        b.ns_pid = proc_b.pid

        def b_up() -> bool:
            if proc_b.popen.poll() is not None:
                raise RuntimeError(f"domain B exited:\n{proc_b.log()[-3000:]}")
            try:
                up = httpx.get(f"{b.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
            return up and _worker_info(client, settings, "b") is not None

        stack.wait_until(b_up, 60, interval=0.2, what="domain B's api and worker")
        a.shm_domain = httpx.get(f"{a.url}/healthz").json()["shm_domain"]
        b.shm_domain = httpx.get(f"{b.url}/healthz").json()["shm_domain"]
        assert a.shm_domain != b.shm_domain, "the namespaces did not make two shm domains"
        assert _worker_info(client, settings, "a")["domain"] == a.shm_domain
        assert _worker_info(client, settings, "b")["domain"] == b.shm_domain
        yield Cluster(a=a, b=b, worker_a=worker_a, redis=client, settings=settings)
    finally:
        for proc in reversed(procs):
            proc.stop()
        left = stack.segments(settings.shm_prefix)
        for name in left:
            (stack.Path("/dev/shm") / name).unlink(missing_ok=True)
        client.close()
        assert not left, f"domain A leaked segments: {sorted(left)}"


def test_array_job_runs_in_the_arrays_domain_and_no_byte_moves(cluster: Cluster) -> None:
    x = np.random.default_rng(1).standard_normal(1 << 18)  # 2 MiB
    with cluster.a.http() as http_a, cluster.b.http() as http_b:
        meta = upload(http_a, x)
        assert meta["domain"] == cluster.a.shm_domain
        cluster.arrays["x"] = meta["id"]
        a_children = set(stack.children_of(cluster.worker_a.pid))
        # Submitted through either API, the job goes to A's queue: A holds the array.
        for http in (http_a, http_b, http_a, http_b):
            view = run(http, "inspect_input", a=meta["id"])
            assert view["status"] == "succeeded", view
            assert view["worker"]["domain"] == cluster.a.shm_domain
            assert view["worker"]["pid"] == view["result"]["pid"]
            assert view["worker"]["pid"] in a_children
            assert view["result"]["sum"] == pytest.approx(float(x.sum()))
    stats = cluster.stats()
    assert stats.get(f"pulls:{cluster.b.shm_domain}", 0) == 0
    assert stats.get(f"served:{cluster.a.shm_domain}", 0) == 0, "an array byte crossed HTTP"
    assert cluster.b.segments(cluster.prefix) == set(), "B holds a copy it never needed"
    # Nothing in Redis is anywhere near the array's size: refs travel, never bytes.
    biggest = max(cluster.redis.memory_usage(k) or 0 for k in cluster.redis.scan_iter())
    assert biggest < x.nbytes // 8, f"a Redis key of {biggest} bytes"


def test_any_api_streams_an_array_held_in_another_domain(cluster: Cluster) -> None:
    x_id = cluster.arrays["x"]
    with cluster.a.http() as http_a, cluster.b.http() as http_b:
        expected = http_a.get(f"/arrays/{x_id}")
        assert expected.status_code == 200
        served = cluster.stats().get(f"served:{cluster.a.shm_domain}", 0)
        got = http_b.get(f"/arrays/{x_id}")
        assert got.status_code == 200, got.text
        assert got.content == expected.content
        assert got.headers["content-length"] == str(len(expected.content))
        assert http_b.head(f"/arrays/{x_id}").headers["content-length"] == str(len(got.content))
        assert cluster.stats()[f"served:{cluster.a.shm_domain}"] == served + 1
        # The internal endpoint wants the shared secret.
        path = f"/internal/arrays/{x_id}"
        assert http_a.get(path).status_code == 403
        assert http_a.get(path, headers={TOKEN_HEADER: "wrong"}).status_code == 403
        assert http_a.get(path, headers={TOKEN_HEADER: TOKEN}).content == raw_data(got)
    assert cluster.b.segments(cluster.prefix) == set(), "a download must not leave a replica"


def raw_data(response: httpx.Response) -> bytes:
    """The raw data bytes of a `.npy` response (what the internal endpoint sends)."""
    arr = load_npy(response.content)
    return arr.tobytes(order="A")


def test_job_with_inputs_in_two_domains(cluster: Cluster) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((96, 64)), rng.standard_normal((64, 80))
    with cluster.a.http() as http_a, cluster.b.http() as http_b:
        meta_a, meta_b = upload(http_a, a), upload(http_b, b)
        assert meta_b["domain"] == cluster.b.shm_domain
        cluster.arrays.update(a2=meta_a["id"], b2=meta_b["id"])
        view = run(http_a, "matmul", a=meta_a["id"], b=meta_b["id"])
        assert view["status"] == "succeeded", view
        ran_in = view["worker"]["domain"]
        result = view["result"]["array"]
        assert result["domain"] == ran_in, "an array result stays where it was made"
        cluster.arrays["ab"] = result["id"]
        for http in (http_a, http_b):  # one of them streams it from the other
            got = http.get(f"/jobs/{view['id']}/result")
            assert got.status_code == 200, got.text
            np.testing.assert_allclose(load_npy(got.content), a @ b, rtol=1e-12)
    # The domain that ran it pulled exactly the input it lacked.
    assert cluster.stats()[f"pulls:{ran_in}"] == 1


def test_jobs_without_arrays_spread_over_both_domains(cluster: Cluster) -> None:
    with cluster.a.http() as http:
        ids = []
        for _ in range(20):
            r = http.post("/jobs", json={"task": "sleep", "params": {"seconds": 0.15}})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        views = [wait(http, job_id) for job_id in ids]
    assert all(v["status"] == "succeeded" for v in views), views
    ran = [v["worker"]["domain"] for v in views]
    assert set(ran) == {cluster.a.shm_domain, cluster.b.shm_domain}, ran


def test_cluster_lists_domains_workers_and_holdings(cluster: Cluster) -> None:
    with cluster.b.http() as http:
        body = http.get("/cluster").json()
    assert body["domain"] == cluster.b.shm_domain
    domains = {d["domain"]: d for d in body["domains"]}
    a, b = domains[cluster.a.shm_domain], domains[cluster.b.shm_domain]
    assert [w["name"].split("@")[0] for w in a["workers"]] == ["a"]
    assert a["workers"][0]["concurrency"] == 1 and a["workers"][0]["pid"] > 0
    assert [w["name"].split("@")[0] for w in b["workers"]] == ["b"]
    assert b["workers"][0]["concurrency"] == 2
    assert a["api_url"] == cluster.a.url and b["api_url"] == cluster.b.url
    assert a["arrays"] >= 2 and a["bytes"] >= 1 << 21
    assert b["arrays"] >= 1
    assert a["segments"] + b["segments"] >= 4  # x, a2, b2, ab, and one replica


def test_without_a_workers_b_pulls_once_and_reuses_its_copy(cluster: Cluster) -> None:
    x_id = cluster.arrays["x"]
    cluster.worker_a.stop()
    stack.wait_until(
        lambda: (
            cluster.a.shm_domain not in WorkerStore(cluster.redis, cluster.settings).live_domains()
        ),
        15,
        interval=0.2,
        what="A's worker to leave the heartbeats",
    )
    pulls = cluster.pulls(cluster.b)
    stats = cluster.stats()
    hits = stats.get(f"hits:{cluster.b.shm_domain}", 0)
    with cluster.a.http() as http_a, cluster.b.http() as http_b:
        first = run(http_a, "inspect_input", a=x_id)
        assert first["status"] == "succeeded", first
        assert first["worker"]["domain"] == cluster.b.shm_domain
        assert first["result"]["writeable"] is False
        assert cluster.pulls(cluster.b) == pulls + 1
        replica = f"{cluster.prefix}{x_id}_r"
        assert replica in cluster.b.segments(cluster.prefix)
        # Again, from both APIs and two at a time (both of B's children): no new pull.
        with ThreadPoolExecutor(2) as pool:
            views = list(pool.map(lambda h: run(h, "inspect_input", a=x_id), [http_a, http_b]))
        for view in [first, *views]:
            assert view["status"] == "succeeded", view
            assert view["worker"]["domain"] == cluster.b.shm_domain
            assert view["result"]["sum"] == pytest.approx(first["result"]["sum"])
            assert view["result"]["anon_growth_kib"] < 512  # the replica is attached, not copied
        assert cluster.pulls(cluster.b) == pulls + 1
        assert cluster.stats()[f"hits:{cluster.b.shm_domain}"] >= hits + 2
        x = load_npy(http_a.get(f"/arrays/{x_id}").content)
        assert first["result"]["sum"] == pytest.approx(float(x.sum()))

        # A fresh array wanted by two children at once is still pulled once (the lock).
        y = np.arange(1 << 17, dtype=np.int64)
        y_id = upload(http_a, y)["id"]
        cluster.arrays["y"] = y_id
        before = cluster.pulls(cluster.b)
        with ThreadPoolExecutor(2) as pool:
            views = list(pool.map(lambda _: run(http_a, "sum", a=y_id), range(2)))
        assert [v["result"] for v in views] == [int(y.sum())] * 2, views
        assert cluster.pulls(cluster.b) == before + 1
    # Replicas count against B's cap (the janitor's recount keeps them).
    store = ArrayStore(cluster.redis, cluster.settings)
    time.sleep(1.5)
    assert store.bytes_in_use(cluster.b.shm_domain) >= x.nbytes + y.nbytes


def test_deleting_frees_the_array_in_both_domains(cluster: Cluster) -> None:
    x_id = cluster.arrays["x"]
    b_store = ReplicaStore(cluster.redis, cluster.settings, cluster.b.shm_domain)
    assert cluster.redis.exists(b_store.key(x_id))
    with cluster.a.http() as http_a, cluster.b.http() as http_b:
        # x through its own API, the rest through B's (whichever domain holds them).
        assert http_a.delete(f"/arrays/{x_id}").status_code == 204
        assert f"{cluster.prefix}{x_id}" not in stack.segments(cluster.prefix)
        stack.wait_until(
            lambda: f"{cluster.prefix}{x_id}_r" not in cluster.b.segments(cluster.prefix),
            10,
            interval=0.2,
            what="B's janitor to unlink the replica of the deleted array",
        )
        assert not cluster.redis.exists(b_store.key(x_id))
        assert http_b.get(f"/arrays/{x_id}").status_code == 404
        for name, array_id in cluster.arrays.items():
            if name != "x":
                assert http_b.delete(f"/arrays/{array_id}").status_code == 204, name

    def all_gone() -> bool:
        return not cluster.b.segments(cluster.prefix) and not stack.segments(cluster.prefix)

    stack.wait_until(all_gone, 10, interval=0.2, what="no segment left in either domain")
    assert cluster.redis.scard(b_store.index_key) == 0
    store = ArrayStore(cluster.redis, cluster.settings)
    stack.wait_until(
        lambda: (
            store.bytes_in_use(cluster.a.shm_domain) == 0
            and store.bytes_in_use(cluster.b.shm_domain) == 0
        ),
        5,
        interval=0.2,
        what="both domains' byte counters back to 0",
    )


def test_pull_without_the_internal_token_fails_clearly_and_leaves_nothing(
    redis_url: str,
) -> None:
    """In process, no namespaces needed: an original 'elsewhere', a worker without the token."""
    from shared.arrays import replicas

    env = stack.stack_env(redis_url)
    there = Settings.from_env({**env, "FORKLIFT_SHM_DOMAIN": "there"})
    here = Settings.from_env({**env, "FORKLIFT_SHM_DOMAIN": "here"})
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    owner = ArrayStore(client, there)
    array_id = uuid.uuid4().hex
    assert owner.reserve(array_id, (4,), "<f8", "C", 32, "") is None
    owner.commit(array_id)
    record = owner.get(array_id)
    ref = ArrayRef(**record.ref().model_dump())
    with pytest.raises(replicas.PullError, match="FORKLIFT_INTERNAL_TOKEN"):
        replicas.local_ref(ref, client, here)
    replicas = ReplicaStore(client, here)
    assert not client.exists(replicas.key(array_id))
    assert client.scard(replicas.index_key) == 0
    assert int(client.get(here.keys.shm_bytes("here")) or 0) == 0
    assert replicas.segment_name(array_id) not in stack.segments(here.shm_prefix)
    owner.drop(array_id)
    client.close()


def test_worker_host_compose_file_joins_the_first_hosts_redis() -> None:
    """`docker-compose.worker-host.yml`: a worker pool and its api sharing one IPC namespace,
    on the first host's Redis, in a domain of their own, passing only real settings."""
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((stack.REPO / "docker-compose.worker-host.yml").read_text())
    api, worker = doc["services"]["api"], doc["services"]["worker"]
    assert api["ipc"] == "shareable" and "shm_size" in api
    assert worker["ipc"] == "service:api"
    assert "redis" not in doc["services"], "a worker host uses the first host's Redis"
    env = worker["environment"]
    assert env == api["environment"]
    assert "${FORKLIFT_MAIN_HOST" in env["REDIS_URL"]
    assert "${FORKLIFT_HOST_ADDR" in env["FORKLIFT_API_INTERNAL_URL"]
    assert "host2" in env["FORKLIFT_SHM_DOMAIN"]
    assert "FORKLIFT_INTERNAL_TOKEN" in env
    # Its Redis is another host's, reached over the network: it must have a password, and
    # arrays are read from the listed peers only; without them compose refuses to start.
    assert env["FORKLIFT_REDIS_PASSWORD"].startswith("${FORKLIFT_REDIS_PASSWORD:?")
    assert env["FORKLIFT_PEER_URLS"].startswith("${FORKLIFT_PEER_URLS:?")
    # Published beyond loopback: it must not run open (the API would refuse to start anyway).
    assert env["FORKLIFT_API_KEYS"].startswith("${FORKLIFT_API_KEYS:?")
    assert "FORKLIFT_ALLOW_OPEN" not in env
    fields = {f"FORKLIFT_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
    assert set(env) <= fields, set(env) - fields


def test_internal_endpoints_are_off_without_the_token(redis_url: str) -> None:
    env = stack.stack_env(redis_url)
    assert Settings.from_env(env).internal_token is None
    api, url = stack.start_api(env)
    with stack.stopping(api):
        r = httpx.get(f"{url}/internal/arrays/{uuid.uuid4().hex}", headers={TOKEN_HEADER: "x"})
    assert r.status_code == 404
    assert "FORKLIFT_INTERNAL_TOKEN" in r.json()["error"]["message"]

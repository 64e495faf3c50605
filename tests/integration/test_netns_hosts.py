"""Two hosts in their own network namespaces: array bytes cross a real network interface, once.

Where tests/integration/test_multihost.py makes its second "host" with IPC and mount namespaces
only (both share one network stack and talk over loopback), here each host is an `ip netns`
namespace with its own IPC and mount namespace and /dev/shm, its own API and worker, a direct
veth to the other host and one to the root namespace, where the test's private Redis listens
on the root-side veth addresses only (forklift/netns.py builds it all). Pulls are counted in
bytes on the hosts' link, read from the kernel's interface counters.

The tests run in order on one module-scoped topology (about 35 s in all, start-up included):
locality, one pull over the veth, deletion on every host, then host b taken down (last: it
does not come back).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis

from forklift import netns
from shared.arrays.replicas import ReplicaStore, read_stats
from shared.arrays.store import ArrayStore
from shared.workers import WorkerStore
from tests import stack
from tests.http_api import submit, upload, wait

pytestmark = pytest.mark.slow

# The reaper (in every API) declares a silent worker's jobs lost after this, plus its
# confirmation (two heartbeats): the take-down test waits for that, not for the broker.
LOST_AFTER = 3
# One pull's framing beyond the array's bytes: Ethernet, IP and TCP headers (under 5% at MTU
# 1500, far less with the veth's segmentation offloads), HTTP headers, the handshake.
PULL_OVERHEAD = 64 << 10
# What may cross a link that carries no array: an ARP probe or a late TCP close, never a chunk.
STRAY = 2 << 10


@dataclass
class Hosts:
    topo: netns.Topology
    redis: redis.Redis
    arrays: dict[str, str] = field(default_factory=dict)  # name -> id, for the delete test

    @property
    def a(self) -> netns.Host:
        return self.topo["a"]

    @property
    def b(self) -> netns.Host:
        return self.topo["b"]

    @property
    def prefix(self) -> str:
        return self.topo.shm_prefix

    def stats(self) -> dict[str, int]:
        return read_stats(self.redis, self.topo.settings)

    def link(self) -> tuple[int, int]:
        """(bytes into b, bytes out of b) on b's end of its link to a."""
        return self.b.link_bytes(self.a)

    def live_domains(self) -> set[str]:
        return WorkerStore(self.redis, self.topo.settings).live_domains()


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    reason = netns.netns_unavailable()
    if reason:
        pytest.skip(f"cannot make hosts in network namespaces: {reason}")
    settings = {"FORKLIFT_WORKER_LOST_AFTER": str(LOST_AFTER)}
    with netns.topology(
        ("a", "b"), settings=settings, base=stack.SUPERVISOR, job_modules=stack.JOB_MODULES
    ) as topo:
        client = redis.Redis.from_url(topo.settings.redis_url, decode_responses=True)
        try:
            assert topo["a"].shm_domain != topo["b"].shm_domain
            yield Hosts(topo=topo, redis=client)
        finally:
            client.close()
    assert not topo.leftovers, f"the hosts left things behind: {topo.leftovers}"


def namespace(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def run(
    host: netns.Host, task: str, params: dict[str, Any] | None = None, **inputs: str
) -> dict[str, Any]:
    with host.http() as http:
        return wait(http, submit(http, task, inputs=inputs, **(params or {})), 60)


def test_hosts_are_apart_and_reach_redis_over_their_veths_only(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    # Each host has a network stack of its own: its own address, no root loopback Redis.
    assert a.api is not None and b.api is not None
    for kind in ("net", "ipc", "mnt"):
        spaces = {"a": namespace(a.api.pid, kind), "b": namespace(b.api.pid, kind)}
        assert len({*spaces.values(), namespace(os.getpid(), kind)}) == 3, (kind, spaces)
    for host in (a, b):
        assert host.env["REDIS_URL"].startswith(f"redis://{host.redis_addr}:")
        assert not host.array_shm(hosts.prefix)
    with a.http() as http:
        cluster = http.get("/cluster").json()
    domains = {d["domain"]: d for d in cluster["domains"]}
    assert domains[a.shm_domain]["api_url"] == a.url
    assert domains[b.shm_domain]["api_url"] == b.url


def test_job_runs_on_the_host_that_holds_its_array_and_nothing_crosses(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    x = np.random.default_rng(1).standard_normal(1 << 19)  # 4 MiB
    y = np.arange(1 << 16, dtype=np.int64)
    with a.http() as http_a, b.http() as http_b:
        x_id = upload(http_a, x)["id"]
        meta_y = upload(http_b, y)
    assert meta_y["domain"] == b.shm_domain
    hosts.arrays.update(x=x_id, y=meta_y["id"])
    assert f"{hosts.prefix}{x_id}" in a.shm(hosts.prefix)
    assert f"{hosts.prefix}{x_id}" not in b.shm(hosts.prefix)
    assert a.worker is not None and b.worker is not None
    a_children, b_children = stack.children_of(a.worker.pid), stack.children_of(b.worker.pid)
    before = hosts.link()
    # Submitted through either host's API, each job goes to the host holding its input.
    for via in (a, b, a, b):
        view = run(via, "inspect_input", a=x_id)
        assert view["status"] == "succeeded", view
        assert view["worker"]["domain"] == a.shm_domain
        assert view["worker"]["pid"] in a_children
        assert view["result"]["sum"] == pytest.approx(float(x.sum()))
        view = run(via, "sum", a=meta_y["id"])
        assert view["result"] == int(y.sum()), view
        assert view["worker"]["domain"] == b.shm_domain
        assert view["worker"]["pid"] in b_children
    rx, tx = hosts.link()
    # Nothing between the hosts (submits and results go over the root links): 0 bytes here,
    # STRAY allows for an ARP probe of the kernel's own.
    assert rx - before[0] < STRAY and tx - before[1] < STRAY, (rx - before[0], tx - before[1])
    assert hosts.stats().get(f"pulls:{b.shm_domain}", 0) == 0
    assert hosts.stats().get(f"pulls:{a.shm_domain}", 0) == 0


def test_job_on_b_pulls_as_array_once_over_the_veth(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    assert a.worker is not None
    x = np.random.default_rng(2).standard_normal(1 << 21)  # 16 MiB
    with a.http() as http_a:
        x_id = upload(http_a, x)["id"]
    hosts.arrays["big"] = x_id
    # Without a's worker the job must run on b, which then needs a's array.
    a.worker.stop()
    stack.wait_until(
        lambda: a.shm_domain not in hosts.live_domains(),
        15,
        interval=0.2,
        what="a's worker to leave the heartbeats",
    )
    try:
        rx0, tx0 = hosts.link()
        a_rx0, a_tx0 = a.link_bytes(b)
        first = run(a, "inspect_input", a=x_id)
        assert first["status"] == "succeeded", first
        assert first["worker"]["domain"] == b.shm_domain
        assert first["result"]["sum"] == pytest.approx(float(x.sum()))
        rx1, tx1 = hosts.link()
        pulled = rx1 - rx0
        assert x.nbytes <= pulled <= x.nbytes * 1.05 + PULL_OVERHEAD, pulled
        assert tx1 - tx0 < PULL_OVERHEAD  # b's requests and TCP acks only
        assert a.link_bytes(b)[1] - a_tx0 == pulled  # the same bytes, left a on that link
        assert a.link_bytes(b)[0] - a_rx0 == tx1 - tx0
        assert f"{hosts.prefix}{x_id}_r" in b.shm(hosts.prefix), "no replica on b"
        assert hosts.stats()[f"pulls:{b.shm_domain}"] == 1
        # Again, from both APIs: b attaches its replica, nothing crosses.
        for via in (a, b):
            again = run(via, "inspect_input", a=x_id)
            assert again["worker"]["domain"] == b.shm_domain
            assert again["result"]["sum"] == pytest.approx(first["result"]["sum"])
        rx2, tx2 = hosts.link()
        assert rx2 - rx1 < STRAY and tx2 - tx1 < STRAY, (rx2 - rx1, tx2 - tx1)  # 0 B measured
        assert hosts.stats()[f"pulls:{b.shm_domain}"] == 1
    finally:
        a.start_worker()  # for the tests after this one
    # b's replica counts against b's share of shared memory.
    time.sleep(1.2)  # one janitor recount
    assert ArrayStore(hosts.redis, hosts.topo.settings).bytes_in_use(b.shm_domain) >= x.nbytes


def test_deleting_frees_the_array_on_every_host(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    big = hosts.arrays["big"]
    b_replicas = ReplicaStore(hosts.redis, hosts.topo.settings, b.shm_domain)
    assert hosts.redis.exists(b_replicas.key(big))
    with b.http() as http_b, a.http() as http_a:
        # Through b's API, which holds only the replica: the record goes at once, each
        # host's janitor unlinks its own segment (no host reaches into another's /dev/shm).
        assert http_b.delete(f"/arrays/{big}").status_code == 204
        stack.wait_until(
            lambda: (
                f"{hosts.prefix}{big}" not in a.shm(hosts.prefix)
                and f"{hosts.prefix}{big}_r" not in b.shm(hosts.prefix)
            ),
            10,
            interval=0.2,
            what="the original on a and the replica on b unlinked",
        )
        assert not hosts.redis.exists(b_replicas.key(big))
        for http in (http_a, http_b):
            assert http.get(f"/arrays/{big}").status_code == 404
        for name, array_id in hosts.arrays.items():
            if name != "big":
                assert http_a.delete(f"/arrays/{array_id}").status_code == 204, name
    stack.wait_until(
        lambda: not a.array_shm(hosts.prefix) and not b.array_shm(hosts.prefix),
        10,
        interval=0.2,
        what="no array segment left on either host",
    )
    assert stack.segments(hosts.prefix) == set(), "a host wrote into the root /dev/shm"
    assert hosts.redis.scard(b_replicas.index_key) == 0
    store = ArrayStore(hosts.redis, hosts.topo.settings)
    stack.wait_until(
        lambda: store.bytes_in_use(a.shm_domain) == 0 and store.bytes_in_use(b.shm_domain) == 0,
        5,
        interval=0.2,
        what="both hosts' byte counters back to 0",
    )
    hosts.arrays.clear()


def test_host_taken_down_has_its_jobs_redelivered_elsewhere(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    with a.http() as http:
        ids = [submit(http, "sleep", seconds=2.0) for _ in range(6)]

        def running_on_b() -> list[str]:
            views = [http.get(f"/jobs/{i}").json() for i in ids]
            return [
                v["id"]
                for v in views
                if v["status"] == "running"
                and (v.get("worker") or {}).get("domain") == b.shm_domain
            ]

        on_b = stack.wait_until(running_on_b, 20, interval=0.1, what="a job running on b")
        assert b.holder is not None
        pids = set().union(*(p.pids for p in [*b.procs, b.holder]))
        b.take_down()
        assert not any(stack.pid_alive(pid) for pid in pids)
        assert b.pids_inside() == []
        views = [wait(http, job_id, 45) for job_id in ids]
    assert [v["status"] for v in views] == ["succeeded"] * len(ids), views
    for view in views:
        assert view["worker"]["domain"] == a.shm_domain or view["id"] not in on_b, view
        if view["id"] in on_b:  # started on b, lost with it, run again on a
            assert len(view["attempts"]) >= 2, view
            assert view["attempts"][0]["error"], view
    assert b.shm_domain not in hosts.live_domains()

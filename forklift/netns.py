"""Test hosts in their own network namespaces: two or three "machines" on one Linux box
(root only: `ip netns`, veths, `nsenter`). Part of the harness, like `forklift.supervisor`:
the test suite (tests/integration/test_netns_hosts.py) and the bench (bench/netns_pull.py)
both build their hosts here.

Each host is an `ip netns` network namespace with its own IPC and mount namespace and a
private tmpfs on /dev/shm, held open by one `sleep` (its *holder*, started by
`ip netns exec NS unshare --ipc --mount ... sh -c 'mount ... && exec sleep infinity'`: every
step execs, so the holder's pid is the supervisor's child). The host's API and worker are
started by `forklift.supervisor` under `nsenter --target=<holder> --net --ipc --mount --`,
which execs too: each is a child of this process, in its own session, stopped by pid.

Wiring, all on one private /24 (10.231.X.0/24, X picked free at random), /30 per link:

    root ──veth── host a          each host: its own address on `lo` (10.231.X.200+i/32), which
    root ──veth── host b          its API binds to and its peers and the root reach it at; a
    host a ──veth── host b        direct veth to every other host carries their traffic (so a
                                  pull is counted on that link alone), routed by /32 routes

The root namespace only ever holds the root-side ends (with the private redis-server bound
to their addresses) and /32 routes to the host addresses over them; nothing is forwarded
through it (its iptables are left alone) and no traffic leaves the machine. IPv6 is off on
every link, so the counters see no neighbour discovery chatter. `Topology.close` stops every
process by pid, deletes the namespaces and root-side veths, and says what was left.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from forklift import supervisor, testing
from forklift.supervisor import Proc, Supervisor
from shared.arrays.pool import POOL_MARK
from shared.settings import Settings

SUBNET = "10.231"  # 10.231.X.0/24, X free on this machine
API_PORT = 8000  # each host has its own port space
HOST_ADDR_BASE = 200  # host i's own address: 10.231.X.(200 + i)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=15)


def netns_unavailable() -> str | None:
    """None when this process may make network namespaces and veths, else why not."""
    probe = f"flprobe{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` cannot run: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()[:300]}"
    try:
        veth = _ip(
            "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False
        )
        if veth.returncode != 0:
            return f"veth pairs cannot be made: {veth.stderr.strip()[:300]}"
        probe_shm = "mount -t tmpfs -o size=1m tmpfs /dev/shm && ls -A /dev/shm | wc -l"
        argv = ["ip", "netns", "exec", probe, *_unshare(probe_shm)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        if out.returncode != 0 or out.stdout.strip() != "0":
            return f"no private IPC + mount namespace with its /dev/shm: {out.stderr.strip()[:300]}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _unshare(script: str) -> list[str]:
    return ["unshare", "--ipc", "--mount", "--propagation", "private", "sh", "-c", script]


def _free_octet() -> int:
    """A third octet X with nothing on 10.231.X.0/24 here (no address, no route)."""
    used = _ip("-o", "addr").stdout + _ip("route").stdout + _ip("-o", "link").stdout
    for _ in range(100):
        octet = random.randrange(1, 255)
        if f"{SUBNET}.{octet}." not in used:
            return octet
    raise RuntimeError(f"no free {SUBNET}.X.0/24 subnet")


@dataclass(eq=False)
class Host:
    """One test host: its namespaces, addresses, processes and settings."""

    name: str  # "a", "b", "c"
    index: int
    netns: str
    addr: str  # its own address: its API's, what peers and the root reach it at
    redis_addr: str  # the root-side address of its root link (where it reaches Redis)
    root_veth: str  # that link's end in the root namespace
    holder: Proc | None = None
    supervisor: Supervisor | None = None
    env: dict[str, str] = field(default_factory=dict)
    api: Proc | None = None
    worker: Proc | None = None
    shm_domain: str = ""
    peer_ifaces: dict[str, str] = field(default_factory=dict)  # other host -> iface here

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{API_PORT}"

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    @property
    def procs(self) -> list[Proc]:
        return [p for p in (self.api, self.worker) if p is not None]

    def shm(self, prefix: str) -> set[str]:
        """Names under `prefix` in this host's /dev/shm (its mount namespace, via the holder)."""
        assert self.holder is not None and self.holder.running(), f"host {self.name} is down"
        names = os.listdir(f"/proc/{self.holder.pid}/root/dev/shm")
        return {n for n in names if n.startswith(prefix)}

    def array_shm(self, prefix: str) -> set[str]:
        """Its segments that hold arrays or replicas (not the pool's freed ones)."""
        return {n for n in self.shm(prefix) if not n.startswith(prefix + POOL_MARK)}

    def link_bytes(self, other: Host) -> tuple[int, int]:
        """(rx, tx) bytes of this host's end of its direct link to `other`."""
        out = _ip("-j", "-s", "-n", self.netns, "link", "show", "dev", self.peer_ifaces[other.name])
        stats = json.loads(out.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def start_worker(self, concurrency: int = 2) -> Proc:
        assert self.supervisor is not None
        self.worker = self.supervisor.start_worker(
            self.env, self.name, concurrency, proc_name=f"netns-{self.name}-worker"
        )
        return self.worker

    def start_api(self) -> Proc:
        assert self.supervisor is not None
        self.api, url = self.supervisor.start_api(
            self.env, API_PORT, host=self.addr, proc_name=f"netns-{self.name}-api"
        )
        assert url == self.url, (url, self.url)
        return self.api

    def start(self, concurrency: int = 2) -> None:
        """Its worker, then its API; its shm domain as the API reports it."""
        self.start_worker(concurrency)
        self.start_api()
        self.shm_domain = httpx.get(f"{self.url}/healthz", timeout=5).json()["shm_domain"]

    def pids_inside(self) -> list[int]:
        """Every process in this host's network namespace (`ip netns pids`)."""
        return [int(pid) for pid in _ip("netns", "pids", self.netns, check=False).stdout.split()]

    def take_down(self) -> None:
        """The host dies at once: SIGKILL to every process in its namespaces, by pid."""
        procs = [*self.procs, *([self.holder] if self.holder else [])]
        for proc in procs:
            proc.remember_pids()
            proc.kill()
        for proc in procs:
            proc.wait_gone(10)


@dataclass(eq=False)
class Topology:
    """Hosts, their links and a private Redis reachable over the root-side veths only."""

    tag: str
    octet: int
    hosts: dict[str, Host]
    redis: Proc | None = None
    redis_port: int = 0
    rabbitmq: Proc | None = None  # the private broker, with `broker="amqp"`
    rabbitmq_url: str = ""  # from the root namespace (its first address)
    env: dict[str, str] = field(default_factory=dict)  # what every host shares
    links: list[str] = field(default_factory=list)  # root-side veth ends
    leftovers: list[str] = field(default_factory=list)  # what close() had to clean

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def shm_prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]

    @property
    def redis_url(self) -> str:
        """Redis from the root namespace (its first address; the password is in `env`)."""
        return f"redis://{self.hosts[min(self.hosts)].redis_addr}:{self.redis_port}/0"

    def close(self) -> None:
        """Stop every process by pid, delete namespaces and veths; what had to be forced goes
        to `leftovers` (a test asserts it empty)."""
        procs = [p for h in self.hosts.values() for p in h.procs]
        supervisor.stop_all(procs, report=self.leftovers.append)
        for host in self.hosts.values():
            if host.holder is not None:
                if host.holder.running() and self.env:
                    with contextlib.suppress(OSError):  # its tmpfs goes with the holder
                        if left := sorted(host.shm(self.shm_prefix)):
                            self.leftovers.append(f"host {host.name}'s /dev/shm: {left}")
                host.holder.stop(timeout=5)
            pids = host.pids_inside()
            if pids:
                self.leftovers.append(f"{host.netns}: processes {pids} (killed)")
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", host.netns, check=False)
        for server in (self.redis, self.rabbitmq):
            if server is not None:
                server.stop()
        for veth in self.links:
            _ip("link", "del", veth, check=False)  # gone with its peer's namespace, normally
        netns_list = _ip("netns", "list", check=False).stdout.split()
        left = [ns for ns in netns_list if self.tag in ns]
        links = _ip("-o", "link", check=False).stdout.splitlines()
        left += [line for line in links if f"fl{self.tag}" in line]
        if left:
            self.leftovers.append(f"left in the root namespace: {left}")
        if self.env:
            stray = supervisor.processes_with_env(
                "FORKLIFT_KEY_PREFIX", self.env["FORKLIFT_KEY_PREFIX"]
            )
            if stray:
                self.leftovers.append(f"processes of the run still alive: {sorted(stray)}")
                for pid in stray:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            root_shm = testing.segments(self.shm_prefix)
            if root_shm:
                self.leftovers.append(f"segments in the root /dev/shm: {sorted(root_shm)}")
                supervisor.sweep_segments(self.shm_prefix)


def _link(tag: str, ns_a: str | None, end_a: str, ns_b: str, end_b: str) -> None:
    """A veth pair with one end in `ns_a` (None: the root namespace) and one in `ns_b`."""
    _ip("link", "add", end_a, "type", "veth", "peer", "name", end_b, "netns", ns_b)
    if ns_a is not None:
        _ip("link", "set", end_a, "netns", ns_a)


def _in(ns: str | None, *args: str) -> None:
    _ip(*(["-n", ns] if ns else []), *args)


def _no_ipv6(ns: str | None, iface: str) -> None:
    path = f"net.ipv6.conf.{iface}.disable_ipv6=1"
    argv = ["sysctl", "-q", "-w", path]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    subprocess.run(argv, capture_output=True, check=False, timeout=10)


def _build(topo: Topology, shm_size: str, base: Supervisor) -> None:
    prefix = f"{SUBNET}.{topo.octet}"
    link = 0

    def pair() -> tuple[str, str]:
        nonlocal link
        base = 4 * link
        link += 1
        return f"{prefix}.{base + 1}", f"{prefix}.{base + 2}"

    hosts = list(topo.hosts.values())
    for host in hosts:
        _ip("netns", "add", host.netns)
        _in(host.netns, "link", "set", "lo", "up")
        _in(host.netns, "addr", "add", f"{host.addr}/32", "dev", "lo")
        subprocess.run(
            ["ip", "netns", "exec", host.netns, "sysctl", "-q", "-w",
             "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
            capture_output=True, check=False, timeout=10,
        )  # fmt: skip
        # Its root link: Redis's address on the root side, the host's own on the other.
        root_end, host_end = f"fl{topo.tag}r{host.name}", f"fl{topo.tag}{host.name}r"
        _link(topo.tag, None, root_end, host.netns, host_end)
        topo.links.append(root_end)
        root_addr, host_link_addr = pair()
        host.redis_addr = root_addr
        _no_ipv6(None, root_end)
        _in(None, "addr", "add", f"{root_addr}/30", "dev", root_end)
        _in(None, "link", "set", root_end, "up")
        _in(host.netns, "addr", "add", f"{host_link_addr}/30", "dev", host_end)
        _in(host.netns, "link", "set", host_end, "up")
        _in(None, "route", "add", f"{host.addr}/32", "via", host_link_addr, "dev", root_end)
        _in(host.netns, "route", "add", f"{root_addr}/32", "dev", host_end, "src", host.addr)
    for i, one in enumerate(hosts):
        for other in hosts[i + 1 :]:
            end_one, end_other = (
                f"fl{topo.tag}{one.name}{other.name}",
                f"fl{topo.tag}{other.name}{one.name}",
            )
            _link(topo.tag, one.netns, end_one, other.netns, end_other)
            one.peer_ifaces[other.name], other.peer_ifaces[one.name] = end_one, end_other
            addr_one, addr_other = pair()
            for host, end, mine, theirs, peer in (
                (one, end_one, addr_one, addr_other, other),
                (other, end_other, addr_other, addr_one, one),
            ):
                _in(host.netns, "addr", "add", f"{mine}/30", "dev", end)
                _in(host.netns, "link", "set", end, "up")
                _in(host.netns, "route", "add", f"{peer.addr}/32", "via", theirs, "dev", end,
                    "src", host.addr)  # fmt: skip
    for host in hosts:
        script = f"mount -t tmpfs -o size={shm_size} tmpfs /dev/shm && exec sleep infinity"
        argv = ["ip", "netns", "exec", host.netns, *_unshare(script)]
        host.holder = base.spawn(f"netns-{host.name}-holder", argv, os.environ)
        holder = host.holder

        def mounted(proc: Proc = holder) -> bool:
            if not proc.running():
                raise RuntimeError(f"host holder exited:\n{proc.log()[-2000:]}")
            try:
                return Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep"
            except OSError:
                return False

        supervisor.wait_until(mounted, 10, what=f"host {host.name}'s namespaces")
        host.supervisor = Supervisor(
            cwd=base.cwd,
            log_dir=base.log_dir,
            worker_options=supervisor.QUIET_WORKER_OPTIONS,
            wrap=(
                "nsenter",
                f"--target={holder.pid}",
                "--net",
                "--ipc",
                "--mount",
                f"--wd={base.cwd or Path.cwd()}",
                "--",
            ),
        )


@contextlib.contextmanager
def topology(
    names: Sequence[str] = ("a", "b"),
    *,
    settings: dict[str, str] | None = None,
    shm_size: str = "2g",
    concurrency: int = 2,
    start: bool = True,
    base: Supervisor | None = None,
    job_modules: str | Sequence[str] = (),
    broker: str = "redis",
) -> Iterator[Topology]:
    """Hosts `names`, linked, with a private Redis and (with `start`) each host's API and
    worker running; everything stopped and deleted when the block ends, however it ends.
    `broker="amqp"`: Celery's messages go to a private RabbitMQ node instead (records and
    arrays stay in Redis), listening on the same root-side addresses as Redis.

    `base` says where the processes run and log (its `cwd`, `log_dir`; the hosts' own
    supervisors copy them and wrap each command in `nsenter`); `job_modules` are loaded
    besides the built-in jobs (the test suite passes its test jobs)."""
    base = base or Supervisor(worker_options=supervisor.QUIET_WORKER_OPTIONS)
    tag = secrets.token_hex(3)
    octet = _free_octet()
    hosts = {
        name: Host(
            name=name,
            index=i,
            netns=f"fl-{tag}-{name}",
            addr=f"{SUBNET}.{octet}.{HOST_ADDR_BASE + i}",
            redis_addr="",
            root_veth=f"fl{tag}r{name}",
        )
        for i, name in enumerate(names)
    }
    topo = Topology(tag=tag, octet=octet, hosts=hosts)
    try:
        _build(topo, shm_size, base)
        addrs = [h.redis_addr for h in hosts.values()]
        # Bound off loopback, Redis wants a password (protected mode): as a real one would.
        password = secrets.token_hex(16)
        topo.redis, url = base.start_redis(bind=addrs, name=f"netns-redis-{tag}", password=password)
        topo.redis_port = urlsplit(url).port or 0
        if broker == "amqp":
            topo.rabbitmq, topo.rabbitmq_url = base.start_rabbitmq(bind=addrs, password=password)
        elif broker != "redis":
            raise ValueError(f"broker must be redis or amqp, not {broker!r}")
        topo.env = testing.isolated_env(
            topo.redis_url,
            dict(
                FORKLIFT_QUEUE=f"forklift-netns-{tag}",
                FORKLIFT_INTERNAL_TOKEN=uuid.uuid4().hex,
                # Each host reads arrays from the other hosts' APIs only, at their own addresses.
                FORKLIFT_PEER_URLS=",".join(h.url for h in hosts.values()),
                # The APIs listen on a host address (not loopback) with no keys: reachable only
                # from this machine's namespaces, so open on purpose.
                FORKLIFT_ALLOW_OPEN="1",
                FORKLIFT_JANITOR_INTERVAL="1",
                FORKLIFT_REDIS_PASSWORD=password,
                **(settings or {}),
            ),
            job_modules=job_modules,
        )
        for host in hosts.values():
            host.env = {
                **topo.env,
                "REDIS_URL": f"redis://{host.redis_addr}:{topo.redis_port}/0",
                "FORKLIFT_API_INTERNAL_URL": host.url,
            }
            if topo.rabbitmq_url:
                amqp = urlsplit(topo.rabbitmq_url)
                host.env["FORKLIFT_BROKER_URL"] = amqp._replace(
                    netloc=f"{amqp.username}:{amqp.password}@{host.redis_addr}:{amqp.port}"
                ).geturl()
        if start:
            with ThreadPoolExecutor(len(hosts)) as pool:  # the hosts boot side by side
                list(pool.map(lambda h: h.start(concurrency), hosts.values()))
        yield topo
    finally:
        topo.close()

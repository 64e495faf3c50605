"""Cross-host array pull over a veth: two hosts in their own network namespaces (issue 18).

Builds the test topology of forklift/netns.py (hosts a and b, each its own network, IPC and mount
namespace, /dev/shm, API and worker; a direct veth between them; a private Redis on the root
side), stops a's worker so every job runs on b, and per round uploads a fresh array to a, then:

- **pull**: one `sum` job on b, which pulls the array into a replica in b's /dev/shm
  (`shared/arrays/replicas.py`); the pull's own time is the worker's log line
  (`pulled array ... in X s`: segment created, bytes streamed in, replica marked ready);
- **warm**: the same job again (b attaches its replica: no byte crosses);
- **bytes on the veth**: b's receive counter on its link to a, around each job;
- **socket floor**: one plain TCP connection moving the same bytes a → b over the veth and
  a → a over loopback (Python `sendall` / `recv_into`: no HTTP, no copies);
- **raw streams**: the same internal GET from inside b's network namespace by a bare httpx
  client that drops the bytes (the pull's client, without the segment writes), and by
  http.client reading straight into a buffer (`readinto`: what a copy-free client gets).

    python -m bench.netns_pull                 # 1 GiB, 3 rounds (~1 min); needs root
    python -m bench.netns_pull --mib 256 --repeat 1 --quick
    python -m bench.netns_pull --mtu 65535     # veths at loopback's MTU (default: 1500)

Writes bench/results/netns_pull.md (or results/quick/).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import numpy as np
import redis

from bench.common import (
    SUPERVISOR,
    Forklift,
    fmt_bytes,
    fmt_s,
    machine_info,
    md_table,
    tree,
    wait_quiet,
    write_results,
)
from forklift import netns, supervisor
from shared.workers import WorkerStore

GB = 1e9
TARGET_GBPS = 1.0

RAW_CLIENT = """
import sys, time, httpx
url, token = sys.argv[1], sys.argv[2]
n = 0
began = time.perf_counter()
with httpx.Client(timeout=600) as http:
    with http.stream("GET", url, headers={"X-Forklift-Internal-Token": token}) as r:
        assert r.status_code == 200, r.status_code
        for chunk in r.iter_raw(1 << 20):
            n += len(chunk)
print(n, time.perf_counter() - began)
"""

# The same GET read by http.client straight into a buffer (no per-chunk bytes objects): what
# the pull could reach with `readinto` into the replica segment instead of httpx's iter_raw.
READINTO_CLIENT = """
import sys, time, http.client, mmap
from urllib.parse import urlsplit
url, token = sys.argv[1], sys.argv[2]
parts = urlsplit(url)
began = time.perf_counter()
conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
conn.request("GET", parts.path, headers={"X-Forklift-Internal-Token": token})
r = conn.getresponse()
assert r.status == 200, r.status
total = int(r.getheader("content-length"))
view = memoryview(mmap.mmap(-1, total))
n = 0
while n < total:
    got = r.readinto(view[n : n + (16 << 20)])
    if not got:
        break
    n += got
print(n, time.perf_counter() - began)
"""

# The floor under any HTTP: one TCP connection, sendall of a buffer, recv_into another.
SOCKET_SERVER = """
import socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = memoryview(bytearray(b"\\1") * n)  # touched: no page faults while sending
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    c.sendall(data)
    c.close()
"""
SOCKET_CLIENT = """
import mmap, socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
view = memoryview(mmap.mmap(-1, n))
view[::4096] = b"\\0" * len(range(0, n, 4096))  # touched: no page faults while receiving
began = time.perf_counter()
got = 0
with socket.create_connection((addr, port)) as c:
    while got < n:
        k = c.recv_into(view[got : got + (16 << 20)])
        if not k:
            break
        got += k
print(got, time.perf_counter() - began)
"""
SOCKET_PORT = 9000


def in_netns(host: netns.Host, *argv: str) -> list[str]:
    assert host.holder is not None
    return ["nsenter", f"--target={host.holder.pid}", "--net", "--", sys.executable, *argv]


def socket_floor(server: netns.Host, client: netns.Host, nbytes: int) -> float:
    """Seconds to move `nbytes` over one plain TCP connection from `server` to `client`."""
    argv = in_netns(server, "-c", SOCKET_SERVER, server.addr, str(SOCKET_PORT), str(nbytes))
    srv = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = subprocess.run(
            in_netns(client, "-c", SOCKET_CLIENT, server.addr, str(SOCKET_PORT), str(nbytes)),
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        srv.wait(30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(10)
    got, seconds = out.stdout.split()
    assert int(got) == nbytes, got
    return float(seconds)


def pull_seconds(log: str, array_id: str) -> float:
    found = re.search(rf"pulled array {array_id} \(\d+ bytes\).* in ([0-9.]+) s", log)
    if found is None:
        raise RuntimeError(f"no pull of {array_id} in b's worker log")
    return float(found.group(1))


def raw_stream(
    host: netns.Host, url: str, token: str, client: str = RAW_CLIENT
) -> tuple[int, float]:
    """GET `url` from inside `host`'s network namespace with `client`; (bytes, seconds)."""
    out = subprocess.run(
        in_netns(host, "-c", client, url, token),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    n, seconds = out.stdout.split()
    return int(n), float(seconds)


def set_mtu(topo: netns.Topology, mtu: int) -> None:
    a, b = topo["a"], topo["b"]
    for host, other in ((a, b), (b, a)):
        iface = host.peer_ifaces[other.name]
        subprocess.run(["ip", "-n", host.netns, "link", "set", iface, "mtu", str(mtu)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="array size in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mtu", type=int, default=1500, help="MTU of the hosts' link")
    parser.add_argument("--quick", action="store_true", help="write to results/quick/")
    args = parser.parse_args()
    reason = netns.netns_unavailable()
    if reason:
        sys.exit(f"cannot make hosts in network namespaces: {reason}")
    nbytes = args.mib << 20
    shm = f"{max(2, 2 * args.mib // 1024 + 2)}g"  # the array (a) or its replica (b), and room
    rows: list[list[object]] = []
    pulls: list[float] = []
    with netns.topology(("a", "b"), shm_size=shm, concurrency=1, base=SUPERVISOR) as topo:
        a, b = topo["a"], topo["b"]
        set_mtu(topo, args.mtu)
        settings = topo.settings
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        assert a.worker is not None and b.worker is not None
        a.worker.stop()  # every job runs on b, which must pull a's arrays
        supervisor.wait_until(
            lambda: a.shm_domain not in WorkerStore(client, settings).live_domains(),
            15,
            what="a's worker gone from the heartbeats",
        )
        token = topo.env["FORKLIFT_INTERNAL_TOKEN"]
        fl = Forklift(a.url)
        try:
            ours = [p for h in topo.hosts.values() for p in (*h.procs, h.holder) if p]
            if topo.redis is not None:
                ours.append(topo.redis)
            for round_ in range(1, args.repeat + 1):
                arr = np.arange(nbytes // 8, dtype=np.float64)
                array_id = fl.upload(arr)["id"]
                busy = wait_quiet(ignore=[pid for p in ours for pid in tree(p.pid)])
                rx0 = b.link_bytes(a)[0]
                began = time.perf_counter()
                first = fl.wait(fl.submit("sum", inputs={"a": array_id}))
                first_s = time.perf_counter() - began
                rx1 = b.link_bytes(a)[0]
                assert first["status"] == "succeeded", first
                assert first["worker"]["domain"] == b.shm_domain, first
                assert first["result"] == float(arr.sum())
                began = time.perf_counter()
                warm = fl.wait(fl.submit("sum", inputs={"a": array_id}))
                warm_s = time.perf_counter() - began
                rx2 = b.link_bytes(a)[0]
                assert warm["worker"]["domain"] == b.shm_domain, warm
                pull_s = pull_seconds(b.worker.log(), array_id)
                pulls.append(nbytes / pull_s / GB)
                raw_n, raw_s = raw_stream(b, f"{a.url}/internal/arrays/{array_id}", token)
                assert raw_n == nbytes, raw_n
                url = f"{a.url}/internal/arrays/{array_id}"
                into_n, into_s = raw_stream(b, url, token, READINTO_CLIENT)
                assert into_n == nbytes, into_n
                lo_n, lo_s = raw_stream(a, url, token, READINTO_CLIENT)  # a to a: over its lo
                assert lo_n == nbytes, lo_n
                floor_veth, floor_lo = socket_floor(a, b, nbytes), socket_floor(a, a, nbytes)
                fl.delete_array(array_id)
                supervisor.wait_until(
                    lambda: not a.array_shm(topo.shm_prefix) and not b.array_shm(topo.shm_prefix),
                    30,
                    what="the array and its replica freed on both hosts",
                )
                rows.append(
                    [
                        round_,
                        fmt_bytes(nbytes),
                        f"{fmt_s(pull_s)} (**{nbytes / pull_s / GB:.2f} GB/s**)",
                        fmt_s(first_s),
                        fmt_s(warm_s),
                        f"{(rx1 - rx0) / nbytes:.4f} × ({rx1 - rx0 - nbytes:+,} B)",
                        f"{rx2 - rx1:,} B",
                        f"{fmt_s(raw_s)} ({raw_n / raw_s / GB:.2f} GB/s)",
                        f"{fmt_s(into_s)} ({into_n / into_s / GB:.2f} GB/s)",
                        f"{fmt_s(lo_s)} ({lo_n / lo_s / GB:.2f} GB/s)",
                        f"{nbytes / floor_veth / GB:.2f} GB/s",
                        f"{nbytes / floor_lo / GB:.2f} GB/s",
                        f"{busy:.2f}",
                    ]
                )
                print(rows[-1], flush=True)
        finally:
            fl.close()
            client.close()
    if topo.leftovers:
        sys.exit(f"left behind: {topo.leftovers}")
    best, median = max(pulls), float(np.median(pulls))
    verdict = "meets" if median >= TARGET_GBPS else "misses"
    table = md_table(
        [
            "round",
            "array",
            "pull on b (worker log)",
            "first job, submit → result",
            "warm job (replica)",
            "bytes into b on the veth, first job",
            "… second job",
            "httpx stream in b's netns",
            "http.client readinto in b's netns",
            "… the same inside a (over a's lo)",
            "plain TCP socket a → b (veth)",
            "… a → a (lo)",
            "foreign load (cores)",
        ],
        [[*row] for row in rows],
    )
    text = f"""# bench/netns_pull.py: one array pulled across hosts over a veth

{machine_info()}

Two hosts in their own network namespaces (forklift/netns.py), a direct veth between them
(MTU {args.mtu}), a's worker stopped so b runs every job; float64 array uploaded to a each
round, then a `sum` job on b (pulls it into b's /dev/shm), the same job again (uses the
replica), then the same internal GET from inside b's network namespace by a bare httpx
client (chunks dropped) and by http.client `readinto` one buffer, and that last one again
from inside a itself (over a's loopback: no veth); last, the floor under any HTTP: one plain
TCP connection, Python `sendall` of a buffer in a, `recv_into` one (both faulted in first)
in b (over the veth) or in a (over its loopback). Foreign load: cores kept busy by other
processes on this shared machine just before the round (`bench.common.wait_quiet`, ≤ 2 min).
Bytes are b's receive counter on its link to a (`ip -s link`); the ratio is to the array's size.

{table}

Pull throughput: median **{median:.2f} GB/s**, best {best:.2f} GB/s over {len(pulls)} round(s):
{verdict} the target of ≥ {TARGET_GBPS:.0f} GB/s for a 1 GiB array (1 GB = 10⁹ bytes).
"""
    print(text)
    path = write_results(
        "netns_pull" if args.mtu == 1500 else f"netns_pull_mtu{args.mtu}", text, args.quick
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""What the bench scripts share: the stacks they start, /proc meters, a small HTTP client.

Every process is started through forklift's own supervisor (`forklift.supervisor`: own session,
stopped by process group and pid), the stack by `forklift.testing.running_stack` on a private
redis-server; every array the benches create is deleted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import httpx
import numpy as np

from forklift import supervisor, testing
from forklift.supervisor import Proc

REPO = Path(__file__).resolve().parent.parent
LOG_DIR = REPO / "test-artifacts" / "logs"
# From the repository root (bench.jobs and bench.celery_plain import), logs beside the tests'.
SUPERVISOR = supervisor.Supervisor(
    cwd=REPO, log_dir=LOG_DIR, worker_options=supervisor.QUIET_WORKER_OPTIONS
)
RESULTS = REPO / "bench" / "results"
MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CORES = len(os.sched_getaffinity(0))


def fib(n: int) -> int:
    """The seed's naive recursion (the same code as worker/jobs/cpu.py's `_fib`)."""
    if n == 1 or n == 2:
        return 1
    return fib(n - 1) + fib(n - 2)


# --- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def _redis_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        for part in out.stdout.split():
            if part.startswith("v="):
                return part[2:]
    return "?"


def machine_info() -> str:
    """One markdown line saying where the numbers were taken."""
    import celery

    return (
        f"Machine: `nproc` {os.cpu_count()} (affinity {CORES}), CPU {_cpu_model()},"
        f" {_mem_total_gib():.0f} GiB RAM, Linux {platform.release()};"
        f" Python {platform.python_version()}, NumPy {np.__version__},"
        f" Celery {celery.__version__}, redis-server {_redis_version()}."
        f" Taken {time.strftime('%Y-%m-%d %H:%M %Z')}."
    )


# --- /proc meters ----------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if supervisor.pid_alive(p):
            out.append(p)
            todo.extend(supervisor.children_of(p))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, plus what its reaped children used (cutime + cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the ')' field 0 is state (field 3 of stat); utime is field 14 -> index 11
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


class CpuMeter:
    """CPU seconds used by groups of processes between start() and stop(), per group."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[int, float] = {}
        self._t0 = 0.0
        self.seconds: dict[str, float] = {}
        self.wall = 0.0
        self.others = 0.0
        self._sys0 = 0.0

    def _snapshot(self) -> dict[str, dict[int, float]]:
        return {g: {p: cpu_seconds(p) for p in pids()} for g, pids in self.groups.items()}

    def start(self) -> None:
        self._start = {p: s for snap in self._snapshot().values() for p, s in snap.items()}
        self._sys0 = system_busy_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        self.wall = time.perf_counter() - self._t0
        system = system_busy_seconds() - self._sys0
        end = self._snapshot()
        self.seconds = {
            g: sum(s - self._start.get(p, 0.0) for p, s in snap.items()) for g, snap in end.items()
        }
        # everything else the machine did meanwhile (other users' processes, the kernel)
        self.others = max(0.0, system - sum(self.seconds.values()))
        return self.seconds

    def others_cores(self) -> float:
        return self.others / self.wall if self.wall else 0.0

    def cores(self, group: str | None = None) -> float:
        used = self.seconds[group] if group else sum(self.seconds.values())
        return used / self.wall if self.wall else 0.0


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: total minus idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def others_busy(seconds: float = 1.0, ignore: list[int] | None = None) -> float:
    """Cores kept busy over `seconds` by processes other than `ignore` (and this one)."""
    mine = [os.getpid(), *(ignore or [])]
    before_sys, before_mine = system_busy_seconds(), sum(cpu_seconds(p) for p in mine)
    time.sleep(seconds)
    used = system_busy_seconds() - before_sys - (sum(cpu_seconds(p) for p in mine) - before_mine)
    return max(0.0, used / seconds)


def wait_quiet(
    max_busy: float = 0.25, timeout: float = 120, ignore: list[int] | None = None
) -> float:
    """Wait (up to `timeout` s) until other processes keep < `max_busy` cores busy.

    This machine may be shared (other test suites running); a bench run under foreign load
    measures that load. Returns the last reading.
    """
    deadline = time.monotonic() + timeout
    while True:
        busy = others_busy(1.0, ignore)
        if busy < max_busy or time.monotonic() > deadline:
            return busy
        print(f"  (waiting: other processes keep {busy:.2f} cores busy)", flush=True)


def proc_memory(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssShmem) in bytes; zeros once the process is gone."""
    rss = anon = shmem = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssShmem:"):
                    shmem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return rss, anon, shmem


def shm_bytes(prefixes: tuple[str, ...]) -> int:
    """Bytes allocated in /dev/shm by segments whose name starts with one of `prefixes`."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/dev/shm"):
            if entry.name.startswith(prefixes):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_blocks * 512
    return total


@dataclass
class Sample:
    t: float
    mem: dict[str, tuple[int, int, int]]  # group -> summed (rss, anon, shmem)
    shm: int


class MemSampler:
    """Samples VmRSS/RssAnon/RssShmem of process groups and our /dev/shm bytes every ~20 ms.

    `groups` map a label to a callable returning the pids (re-read every 0.5 s, so recycled
    children are followed). `peak(...)` answers for any time window afterwards.
    """

    def __init__(
        self,
        groups: dict[str, Callable[[], list[int]]],
        shm_prefixes: tuple[str, ...] = (),
        interval: float = 0.02,
    ) -> None:
        self.groups = groups
        self.shm_prefixes = shm_prefixes
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def __enter__(self) -> MemSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pids: dict[str, list[int]] = {}
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.perf_counter()
            if now - refreshed > 0.5:
                pids = {g: f() for g, f in self.groups.items()}
                refreshed = now
            mem = {}
            for group, plist in pids.items():
                parts = [proc_memory(p) for p in plist]
                mem[group] = tuple(sum(x[i] for x in parts) for i in range(3))  # type: ignore[assignment]
            shm = shm_bytes(self.shm_prefixes) if self.shm_prefixes else 0
            self.samples.append(Sample(time.perf_counter(), mem, shm))
            self._stop.wait(self.interval)

    def window(self, t0: float, t1: float) -> list[Sample]:
        return [s for s in self.samples if t0 <= s.t <= t1]

    def peak(self, group: str, what: str, t0: float, t1: float) -> int:
        """Peak of 'rss', 'anon' or 'shmem' of `group` within [t0, t1]."""
        i = ("rss", "anon", "shmem").index(what)
        return max((s.mem.get(group, (0, 0, 0))[i] for s in self.window(t0, t1)), default=0)

    def baseline(self, group: str, what: str, t0: float, t1: float) -> int:
        i = ("rss", "anon", "shmem").index(what)
        values = [s.mem.get(group, (0, 0, 0))[i] for s in self.window(t0, t1)]
        return int(statistics.median(values)) if values else 0

    def peak_total(self, groups: list[str], t0: float, t1: float) -> int:
        """Peak over time of Σ RssAnon(groups) + our shm bytes: the stack's real footprint."""
        return max(
            (sum(s.mem.get(g, (0, 0, 0))[1] for g in groups) + s.shm for s in self.window(t0, t1)),
            default=0,
        )


class HealthPoller:
    """GETs `url` every `interval` s in a thread (its own connection); latencies in seconds."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url = url
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (start, latency)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-poller", daemon=True)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def latencies(self, t0: float = 0.0, t1: float = float("inf")) -> list[float]:
        """Latencies of the requests sent within [t0, t1] (perf_counter times)."""
        return [lat for start, lat in self.samples if t0 <= start <= t1]

    def _run(self) -> None:
        with httpx.Client(timeout=300) as client:
            client.get(self.url)  # connect first, so the first sample is not a handshake
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    client.get(self.url).raise_for_status()
                except httpx.HTTPError:
                    self.errors += 1
                elapsed = time.perf_counter() - start
                self.samples.append((start, elapsed))
                self._stop.wait(max(0.0, self.interval - elapsed))


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank on the sorted values); nan for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# --- output ----------------------------------------------------------------------------------


def md_table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_dir(quick: bool = False) -> Path:
    """bench/results/, or bench/results/quick/ (not checked in) for --quick smoke runs."""
    path = RESULTS / "quick" if quick else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, text: str, quick: bool = False) -> Path:
    path = results_dir(quick) / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def fmt_s(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB"


# --- stacks ----------------------------------------------------------------------------------


@dataclass
class Stack:
    """A private redis-server, a forklift worker and its API (and optionally plain Celery)."""

    redis_url: str
    env: dict[str, str]
    url: str
    redis_proc: Proc
    worker: Proc
    api: Proc
    plain: Proc | None = None
    plain_url: str = ""
    procs: list[Proc] = field(default_factory=list)

    @property
    def shm_prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]

    def groups(self) -> dict[str, Callable[[], list[int]]]:
        """Process groups for the meters: API, worker main and children, Redis, plain Celery."""
        groups: dict[str, Callable[[], list[int]]] = {
            "api": lambda: tree(self.api.pid),
            "worker_main": lambda: [self.worker.pid],
            "worker_children": lambda: supervisor.children_of(self.worker.pid),
            "redis": lambda: [self.redis_proc.pid],
        }
        if self.plain is not None:
            plain = self.plain
            groups["celery_main"] = lambda: [plain.pid]
            groups["celery_children"] = lambda: supervisor.children_of(plain.pid)
        return groups


def start_plain_celery(redis_url: str, concurrency: int, broker_url: str = "") -> tuple[Proc, str]:
    """The bench's plain Celery worker (pickle) on database 1 of the same Redis (its broker
    too, unless `broker_url` names another: RabbitMQ)."""
    url = redis_url.rsplit("/", 1)[0] + "/1"
    env = dict(os.environ)
    env.update(
        {"BENCH_CELERY_URL": url, "C_FORCE_ROOT": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": ""}
    )
    if broker_url:
        env["BENCH_CELERY_BROKER"] = broker_url
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.celery_plain",
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        "-n",
        "plain@%h",
        "-Q",
        "bench-plain",
        "--without-mingle",
        "--without-gossip",
        "--loglevel=WARNING",
    ]
    proc = SUPERVISOR.spawn("bench-plain-celery", argv, env)
    supervisor.wait_until(
        lambda: len(supervisor.children_of(proc.pid)) >= concurrency or not proc.running(),
        60,
        what="plain celery children",
    )
    if proc.popen.poll() is not None:
        raise RuntimeError(f"plain celery worker exited:\n{proc.log()[-3000:]}")
    return proc, url


def plain_app(url: str, broker_url: str = "") -> ModuleType:
    """Import bench.celery_plain as a client bound to `url` (and `broker_url`, if given)."""
    os.environ["BENCH_CELERY_URL"] = url
    import bench.celery_plain as plain

    plain.app.conf.broker_url = broker_url or url
    plain.app.conf.result_backend = url
    plain.noop.apply_async().get(timeout=60)  # the worker answers
    return plain


@contextlib.contextmanager
def running_stack(
    concurrency: int = CORES, plain_celery: bool = False, broker_url: str = "", **extra_env: str
) -> Iterator[Stack]:
    """Start redis + forklift worker + API (+ plain Celery), stop them all on exit; with
    `broker_url` (RabbitMQ) both take their messages from there, records stay in Redis."""
    if broker_url:
        extra_env = {"FORKLIFT_BROKER_URL": broker_url, **extra_env}
    tag = uuid.uuid4().hex[:8]
    settings = {
        "FORKLIFT_KEY_PREFIX": f"forklift-bench-{tag}",
        "FORKLIFT_SHM_PREFIX": f"forklift_b{tag}_",
        "FORKLIFT_WORKER_CONCURRENCY": str(concurrency),
        # the product's default, said out loud
        "FORKLIFT_SHM_POOL_BYTES": "-1",
        **extra_env,
    }
    harness = testing.running_stack(
        "bench.jobs",
        concurrency=concurrency,
        env=settings,
        name=f"bench{tag}",
        supervisor=SUPERVISOR,
    )
    with harness as running:
        assert running.redis is not None  # the harness started its own
        plain, plain_url = None, ""
        if plain_celery:
            plain, plain_url = start_plain_celery(running.redis_url, concurrency, broker_url)
        started = [running.redis, running.worker, running.api, *([plain] if plain else [])]
        st = Stack(
            running.redis_url, running.env, running.url, running.redis, running.worker,
            running.api, plain, plain_url, started,
        )  # fmt: skip
        with supervisor.stopping(*([plain] if plain else [])):
            yield st
    if running.leaked_segments:
        leaked = running.leaked_segments
        print(f"warning: removed {len(leaked)} leftover segment(s): {leaked}")


# --- a minimal asyncio HTTP/1.1 client -------------------------------------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams, for load generation.

    httpx's AsyncClient spends more CPU per request than the API under test does (measured
    here: 117 vs 1,643 `GET /healthz`/s at 32 connections), so the load benches speak
    HTTP/1.1 themselves. Responses must carry Content-Length (FastAPI's JSON ones do).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
            + ("Content-Type: application/json\r\n" if body else "")
            + "\r\n"
        )
        self.writer.write(head.encode() + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in header.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        data = await self.reader.readexactly(length) if length else b""
        return int(header[9:12]), data

    async def json(self, method: str, path: str, payload: object = None) -> object:
        body = json.dumps(payload).encode() if payload is not None else b""
        status, data = await self.request(method, path, body)
        if status >= 400:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.writer.close()


# --- a small forklift client -----------------------------------------------------------------


def npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


class Forklift:
    """Just enough HTTP for the benches. Uploads send the array's own memory (no copy)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.http = httpx.Client(base_url=url, timeout=300)

    def close(self) -> None:
        self.http.close()

    def upload(self, arr: np.ndarray) -> dict:
        """POST /arrays with a .npy body written straight from `arr`'s buffer."""
        header = npy_header(arr)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.putrequest("POST", "/arrays")
            conn.putheader("Content-Type", "application/x-npy")
            conn.putheader("Content-Length", str(len(header) + arr.nbytes))
            conn.endheaders()
            conn.send(header)
            conn.send(memoryview(np.ascontiguousarray(arr)).cast("B"))
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 201:
            raise RuntimeError(f"upload failed: {resp.status} {body[:500]!r}")
        return json.loads(body)

    def download(self, array_id: str) -> np.ndarray:
        """GET /arrays/{id}, read straight into a preallocated array."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.request("GET", f"/arrays/{array_id}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"download failed: {resp.status} {resp.read()[:500]!r}")
            shape = tuple(int(n) for n in resp.getheader("X-Forklift-Shape").split(",") if n)
            dtype = np.dtype(resp.getheader("X-Forklift-Dtype"))
            out = np.empty(shape, dtype=dtype)
            header_len = int(resp.getheader("Content-Length")) - out.nbytes
            resp.read(header_len)
            view = memoryview(out).cast("B")
            got = 0
            while got < out.nbytes:
                n = resp.readinto(view[got:])
                if not n:
                    raise RuntimeError(f"download truncated at {got} of {out.nbytes} bytes")
                got += n
        finally:
            conn.close()
        return out

    def delete_array(self, array_id: str) -> None:
        self.http.delete(f"/arrays/{array_id}")

    def submit(self, task: str, params: dict | None = None, inputs: dict | None = None) -> str:
        body = {"task": task, "params": params or {}}
        if inputs:
            body["inputs"] = {k: {"array": v} for k, v in inputs.items()}
        resp = self.http.post("/jobs", json=body)
        if resp.status_code != 202:
            raise RuntimeError(f"submit failed: {resp.status_code} {resp.text[:500]}")
        return resp.json()["id"]

    def wait(self, job_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            view = self.http.get(f"/jobs/{job_id}", params={"wait": 30}).json()
            if view["status"] in ("succeeded", "failed", "cancelled"):
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['status']}")

"""Trivial jobs per second end to end: forklift over HTTP beside plain Celery, same Redis, same run.

forklift: `POST /jobs {"task": "noop"}` then `GET /jobs/{id}?wait=30` until the job ends, from
C concurrent submitters on C keep-alive connections; as a burst (submit all, then wait for
all); and, when the API has them, through `POST /jobs/batch` + `POST /jobs/wait`. The load
comes from a minimal asyncio HTTP/1.1 client (bench.common.RawConnection): httpx's
AsyncClient costs more CPU per request than the API does and would measure itself.
Plain Celery (bench/celery_plain.py, same private Redis, Celery's defaults): 2,000
`apply_async()` at once, then `.get()` each. One job at a time (sequential) gives the
latency p50/p99 of each. CPU seconds of every process group are read from /proc around each
run, so a bottleneck shows as a group near one full core.

When forklift misses 0.75 x Celery's rate (or with `--profile`), a second API process runs
under pyinstrument (bench/api_profiled.py) while py-spy samples the worker, and the report
says where the CPU per job went. Raw profiles go to bench/results/profiles/.

Run: python -m bench.throughput [--jobs 2000] [--concurrency 32] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import redis

from bench import commands as command_log
from bench.common import (
    SUPERVISOR,
    CpuMeter,
    RawConnection,
    Stack,
    fmt_s,
    machine_info,
    md_table,
    pct,
    plain_app,
    results_dir,
    running_stack,
    tree,
    wait_quiet,
    write_results,
)
from forklift import supervisor

FINAL = ("succeeded", "failed", "cancelled")
BODY = {"task": "noop", "params": {}}


@dataclass
class Result:
    label: str
    jobs: int
    wall: float
    latencies: list[float]
    cpu: dict[str, float]  # group -> CPU seconds
    others: float
    errors: int = 0
    redis_commands: dict[str, float] | None = None  # command -> calls per job

    def cores(self, group: str) -> float:
        return self.cpu.get(group, 0.0) / self.wall

    def us_per_job(self, group: str) -> float:
        return self.cpu.get(group, 0.0) / self.jobs * 1e6

    @property
    def rate(self) -> float:
        return self.jobs / self.wall


# --- forklift --------------------------------------------------------------------------------


async def _submit(conn: RawConnection) -> str:
    return (await conn.json("POST", "/jobs", BODY))["id"]  # type: ignore[index]


async def _wait(conn: RawConnection, job_id: str) -> bool:
    return (await _final_view(conn, job_id))["status"] == "succeeded"


async def _final_view(conn: RawConnection, job_id: str) -> dict:
    while True:
        view = await conn.json("GET", f"/jobs/{job_id}?wait=30")
        if view["status"] in FINAL:  # type: ignore[index]
            return view  # type: ignore[return-value]


async def _forklift_load(
    url: str, n: int, conc: int, burst: bool
) -> tuple[float, list[float], int]:
    """`conc` connections; each submits and long-polls jobs until `n` are done."""
    conns = [await RawConnection.open(url) for _ in range(conc)]
    try:
        await asyncio.gather(*(c.request("GET", "/healthz") for c in conns))
        latencies: list[float] = []
        failed = 0
        todo = iter(range(n))
        start = time.perf_counter()
        if burst:
            ids: list[str] = []

            async def submitter(conn: RawConnection) -> None:
                for _ in todo:
                    ids.append(await _submit(conn))

            await asyncio.gather(*(submitter(c) for c in conns))
            pending = iter(ids)

            async def waiter(conn: RawConnection) -> None:
                nonlocal failed
                for job_id in pending:
                    failed += not await _wait(conn, job_id)

            await asyncio.gather(*(waiter(c) for c in conns))
        else:

            async def loop(conn: RawConnection) -> None:
                nonlocal failed
                for _ in todo:
                    t0 = time.perf_counter()
                    failed += not await _wait(conn, await _submit(conn))
                    latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(loop(c) for c in conns))
        return time.perf_counter() - start, latencies, failed
    finally:
        for c in conns:
            c.close()


async def _forklift_batch(
    url: str | Sequence[str], n: int, conc: int, batch: int, body: dict = BODY
) -> tuple[float, list, int]:
    """`POST /jobs/batch` of `batch` jobs, then `POST /jobs/wait` on their ids, per connection;
    with several API URLs the connections go to them in turn."""
    urls = [url] if isinstance(url, str) else list(url)
    conns = [await RawConnection.open(urls[i % len(urls)]) for i in range(conc)]
    failed = 0
    try:
        await asyncio.gather(*(c.request("GET", "/healthz") for c in conns))
        sizes = iter([min(batch, n - i) for i in range(0, n, batch)])
        start = time.perf_counter()

        async def worker(conn: RawConnection) -> None:
            nonlocal failed
            for size in sizes:
                view = await conn.json("POST", "/jobs/batch", {"jobs": [body] * size})
                ids = [j["id"] for j in view["jobs"]]  # type: ignore[index]
                while ids:
                    view = await conn.json("POST", "/jobs/wait", {"ids": ids, "wait": 30})
                    jobs = view["jobs"]  # type: ignore[index]
                    failed += sum(j["status"] in ("failed", "cancelled") for j in jobs)
                    ids = [j["id"] for j in jobs if j["status"] not in FINAL]

        await asyncio.gather(*(worker(c) for c in conns))
        return time.perf_counter() - start, [], failed
    finally:
        for c in conns:
            c.close()


def has_batch_endpoint(url: str) -> bool:
    paths = httpx.get(f"{url}/openapi.json", timeout=10).json().get("paths", {})
    return "/jobs/batch" in paths and "/jobs/wait" in paths


# Where one job's time goes, from the client's clock and the record's stamps (API: created_at;
# worker: started_at, finished_at; one machine, one clock).
PHASES = (
    ("client → record created (HTTP, validation, create script)", "created"),
    ("record created → submit answered (publish, response)", "answered"),
    ("created → started (broker, worker main, prefork hand-off, start script)", "started"),
    ("started → finished (the job, the finish script)", "finished"),
    ("finished → client has the result (event, long-poll answer)", "seen"),
)


def forklift_sequential(url: str, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """One job at a time: latencies, and per job the phases of PHASES (seconds)."""

    async def run() -> tuple[list[float], dict[str, list[float]]]:
        conn = await RawConnection.open(url)
        latencies: list[float] = []
        phases: dict[str, list[float]] = {key: [] for _, key in PHASES}
        try:
            for _ in range(n):
                t0, w0 = time.perf_counter(), time.time()
                job_id = await _submit(conn)
                answered = time.time()
                view = await _final_view(conn, job_id)
                latencies.append(time.perf_counter() - t0)
                seen = time.time()
                created, started = view["created_at"], view["started_at"] or 0.0
                finished = view["finished_at"] or 0.0
                phases["created"].append(created - w0)
                phases["answered"].append(answered - created)
                phases["started"].append(started - created)
                phases["finished"].append(finished - started)
                phases["seen"].append(seen - finished)
        finally:
            conn.close()
        return latencies, phases

    return asyncio.run(run())


# --- plain Celery ----------------------------------------------------------------------------


def celery_burst(plain: ModuleType, n: int) -> tuple[float, int]:
    start = time.perf_counter()
    handles = [plain.noop.apply_async() for _ in range(n)]
    failed = sum(h.get(timeout=120) != 1 for h in handles)
    return time.perf_counter() - start, failed


def celery_sequential(plain: ModuleType, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        plain.noop.apply_async().get(timeout=60)
        latencies.append(time.perf_counter() - t0)
    return latencies


# --- measuring -------------------------------------------------------------------------------


def command_stats(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def metered(
    label: str,
    groups: dict[str, Callable[[], list[int]]],
    n: int,
    fn: Callable[[], tuple],
    client: redis.Redis,
) -> Result:
    """Run `fn`, metering CPU per group and the Redis commands it caused (per job)."""
    before = command_stats(client)
    meter = CpuMeter(groups)
    meter.start()
    out = fn()
    meter.stop()
    after = command_stats(client)
    wall, latencies, failed = out
    commands = {k: (v - before.get(k, 0)) / n for k, v in after.items() if v > before.get(k, 0)}
    commands.pop("info", None)  # this function's own
    return Result(
        label, n, wall, latencies, dict(meter.seconds), meter.others_cores(), failed, commands
    )


def attribute(
    st: Stack, groups: dict[str, Callable[[], list[int]]], n: int, conc: int, timed: Result
) -> str:
    """Idle stack, then `n` jobs of the first run's load, under MONITOR: per process, the
    commands sent and those run inside the scripts sent; the idle passes' commands per
    second, amortised over the timed run's rate."""
    idle_s = 5.0
    with command_log.Monitor(st.redis_url, groups) as mon:
        time.sleep(idle_s)
    idle = mon.counts()
    with command_log.Monitor(st.redis_url, groups) as mon:
        wall, _, _ = asyncio.run(_forklift_load(st.url, n, conc, burst=False))
    loaded = mon.counts()
    idle_rate = sum(idle.values()) / idle_s
    idle_rows = collections.Counter[str]()
    for (group, how, cmd), calls in idle.items():
        idle_rows[f"{group} {'' if how == 'sent' else how + ': '}{cmd}"] += calls
    detail = ", ".join(f"{k} {v / idle_s:.1f}" for k, v in idle_rows.most_common(12))
    return "\n\n".join(
        [
            command_log.report(loaded, n, wall),
            f"Idle stack ({idle_s:g} s, no jobs): {idle_rate:.1f} commands/s (inside scripts"
            f" included): {detail}. At the timed run's {timed.rate:.0f} jobs/s that is"
            f" {idle_rate / timed.rate:.2f} commands per job (included in the counts above).",
        ]
    )


def profile_run(st: Stack, n: int, conc: int, out_dir: Path) -> tuple[str, list[Path]]:
    """A second API process under pyinstrument (bench/api_profiled.py) takes a forklift run
    while py-spy samples the worker and its children; returns a markdown summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    api_out = out_dir / "api.txt"
    for suffix in (".txt", ".json", ".html"):
        api_out.with_suffix(suffix).unlink(missing_ok=True)
    port = supervisor.free_port()
    env = dict(st.env, BENCH_PORT=str(port), BENCH_PROFILE_OUT=str(api_out))
    api = SUPERVISOR.spawn("bench-api-profiled", [sys.executable, "-m", "bench.api_profiled"], env)
    url = f"http://127.0.0.1:{port}"
    spy = None
    worker_out = out_dir / "worker.txt"
    try:
        supervisor.wait_until(lambda: _up(url, api), 30, what="profiled api")
        asyncio.run(_forklift_load(url, 200, conc, burst=False))  # warm
        py_spy = shutil.which("py-spy")
        if py_spy:
            argv = [
                py_spy,
                "record",
                "--pid",
                str(st.worker.pid),
                "--subprocesses",
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(worker_out),
            ]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        meter = CpuMeter({"api": lambda: [api.pid], "worker": lambda: tree(st.worker.pid)})
        os.kill(api.pid, signal.SIGUSR1)
        meter.start()
        wall, _, _ = asyncio.run(_forklift_load(url, n, conc, burst=False))
        meter.stop()
        os.kill(api.pid, signal.SIGUSR2)
        supervisor.wait_until(lambda: api_out.with_suffix(".json").exists(), 60, what="profile")
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        api.stop()
    data = json.loads(api_out.with_suffix(".json").read_text())
    api_cpu = meter.seconds["api"]
    parts = [
        f"A second API process (same stack) under pyinstrument took {n} jobs from {conc}"
        f" submitters: {n / wall:.0f} jobs/s, API CPU {api_cpu / meter.wall:.2f} cores ="
        f" **{api_cpu / n * 1e6:.0f} µs of API CPU per job** (one `POST /jobs` + one"
        " `GET /jobs/{id}?wait=`, plus the job's events). Per-job costs below are the"
        " event-loop thread's sampled time divided by the number of jobs.",
        api_summary(data, n),
    ]
    if worker_out.exists():
        parts.append(summarize("worker (py-spy, main process + children)", worker_out))
    files = [api_out, api_out.with_suffix(".html"), worker_out]
    return "\n\n".join(parts), [f for f in files if f.exists()]


def _up(url: str, proc: supervisor.Proc) -> bool:
    if proc.popen.poll() is not None:
        raise RuntimeError(f"profiled api exited:\n{proc.log()[-3000:]}")
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code in (200, 503)
    except httpx.HTTPError:
        return False


_API_STEPS = (
    ("run", "event loop total (sampled)"),
    ("submit_job", "`POST /jobs` handler (submit_job)"),
    ("validate_params", "  params validation"),
    ("create", "  JobStore.create (Lua, one round trip)"),
    ("_prepare", "  _prepare (task lookup, params, inputs)"),
    ("_submit", "  _submit (record + publish)"),
    ("enqueue", "  enqueue (publish in a worker thread)"),
    ("enqueue_many", "  enqueue_many (publish in a worker thread)"),
    ("submit_jobs", "`POST /jobs/batch` handler"),
    ("wait_for_jobs", "`POST /jobs/wait` handler"),
    ("get", "  JobStore.get (HGETALL) and other `get`s"),
    ("get_job_status", "`GET /jobs/{id}?wait=` handler"),
    ("_wait_for_end", "  _wait_for_end (subscribe, load, wait, load)"),
    ("_load", "  _load (HGETALL + parse)"),
    ("_dispatch", "event hub: dispatch one pub/sub event"),
    ("_run", "event hub: reader loop (parse + dispatch)"),
    ("solve_dependencies", "FastAPI: solve_dependencies (incl. body parsing)"),
    ("serialize_response", "FastAPI: serialize_response (response_model)"),
    ("run_sync_in_worker_thread", "anyio: hand-offs to worker threads"),
    ("execute_command", "redis.asyncio: execute_command"),
    ("__call__", "middleware/ASGI `__call__`s (nested, counted once)"),
)


def api_summary(data: dict, n: int, top: int = 20) -> str:
    inclusive: dict[str, float] = data["inclusive"]
    own: dict[str, float] = data["own"]
    total = data["total"] or 1.0
    steps = [
        [label, f"{inclusive[fn] / n * 1e6:.0f} µs", f"{inclusive[fn] / total:.1%}"]
        for fn, label in _API_STEPS
        if fn in inclusive
    ]
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    rows = [[f"`{k}`", f"{v / n * 1e6:.0f} µs", f"{v / total:.1%}"] for k, v in ranked]
    return "\n\n".join(
        [
            "### API event loop (pyinstrument): inclusive time of the main steps",
            md_table(["step", "per job", "share"], steps),
            f"### API event loop: own time, top {top} functions",
            md_table(["function (file:line)", "per job", "share"], rows),
        ]
    )


_WORKER_STEPS = (
    ("run_job", "worker child: run_job task"),
    ("run", "  runner.run"),
    ("start", "  JobStore.start (Lua)"),
    ("_execute", "  _execute (attach + the job)"),
    ("cancellable", "  cancel.cancellable (one HGET)"),
    ("finish", "  JobStore.finish (Lua)"),
    ("release_inputs", "  JobStore.release_inputs (Lua)"),
    ("send_event", "Celery task events (worker_send_task_events)"),
    ("on_message", "worker main: on_message (consume)"),
    ("apply_async", "worker main: hand the task to a child"),
)


def summarize(name: str, path: Path, top: int = 15) -> str:
    """Own time per function and inclusive time of main steps, from py-spy's raw stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        total += count
        threads[frames[0][:60]] += count
        own[_short(frames[-1])] += count
        seen = set()
        for frame in frames:
            fn = frame.split(" (", 1)[0]
            if fn not in seen:
                seen.add(fn)
                incl[fn] += count
    if not total:
        return f"{name}: no samples"
    rows = [[f"`{fn}`", f"{c / total:.1%}"] for fn, c in own.most_common(top)]
    steps = [[label, f"{incl[fn] / total:.1%}"] for fn, label in _WORKER_STEPS if incl.get(fn)]
    thread_rows = [[f"`{t}`", f"{c / total:.1%}"] for t, c in threads.most_common(6)]
    return "\n\n".join(
        [
            f"### {name}: {total} active samples",
            "By thread / process (first frame):",
            md_table(["thread", "share"], thread_rows),
            "Inclusive time of the main steps:",
            md_table(["step", "share"], steps),
            f"Own time, top {top} functions:",
            md_table(["function (file:line)", "share"], rows),
        ]
    )


def _short(frame: str) -> str:
    fn, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{fn} ({where})"


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per throughput run")
    parser.add_argument("--concurrency", type=int, default=32, help="forklift submitters")
    parser.add_argument("--sequential", type=int, default=300, help="jobs for the latency")
    parser.add_argument("--batch", type=int, default=100, help="jobs per POST /jobs/batch")
    parser.add_argument("--batch-connections", type=int, default=4, help="batch submitters")
    parser.add_argument("--profile", action="store_true", help="py-spy the API and worker")
    parser.add_argument("--no-profile", action="store_true", help="never profile")
    parser.add_argument(
        "--attribute", type=int, default=500, help="jobs of the MONITOR run (0: none)"
    )
    parser.add_argument("--quick", action="store_true", help="200 jobs, 50 sequential")
    parser.add_argument("--quiet", type=float, default=0.25, help="see bench/cpu.py; 0: off")
    parser.add_argument(
        "--broker",
        choices=("redis", "amqp"),
        default="redis",
        help="amqp: forklift and plain Celery on a private RabbitMQ node (throughput_amqp.md)",
    )
    args = parser.parse_args()
    n = 200 if args.quick else args.jobs
    seq = 50 if args.quick else args.sequential
    conc = args.concurrency

    results: list[Result] = []
    attribution = ""
    seq_rows: list[list[object]] = []
    phase_rows: list[list[object]] = []
    profile_text, profile_files = "", []
    rabbit, broker_url = None, ""
    if args.broker == "amqp":
        rabbit, broker_url = SUPERVISOR.start_rabbitmq()
    with (
        supervisor.stopping(*([rabbit] if rabbit else [])),
        running_stack(plain_celery=True, broker_url=broker_url) as st,
    ):
        plain = plain_app(st.plain_url, broker_url)
        groups = st.groups()
        groups["client"] = lambda: [os.getpid()]
        if rabbit is not None:
            groups["rabbitmq"] = lambda: tree(rabbit.pid)
        ours = [p for f in groups.values() for p in f()]
        rclient = redis.Redis.from_url(st.redis_url)

        def quiet() -> None:
            if args.quiet:
                wait_quiet(args.quiet, timeout=90, ignore=ours)

        # warm both paths up (connections, imports, worker children)
        asyncio.run(_forklift_load(st.url, 100, conc, burst=False))
        celery_burst(plain, 100)

        quiet()
        results.append(
            metered(
                f"forklift HTTP, {conc} submitters (submit + long-poll each)",
                groups,
                n,
                lambda: asyncio.run(_forklift_load(st.url, n, conc, burst=False)),
                rclient,
            )
        )
        print(f"  {results[-1].label}: {results[-1].rate:.0f} jobs/s", flush=True)
        quiet()
        results.append(_celery_result(groups, plain, n, rclient))
        print(f"  {results[-1].label}: {results[-1].rate:.0f} jobs/s", flush=True)
        quiet()
        results.append(
            metered(
                f"forklift HTTP burst: submit {n} ({conc} at a time), then wait for all",
                groups,
                n,
                lambda: asyncio.run(_forklift_load(st.url, n, conc, burst=True)),
                rclient,
            )
        )
        print(f"  {results[-1].label}: {results[-1].rate:.0f} jobs/s", flush=True)

        if has_batch_endpoint(st.url):
            quiet()
            batch = args.batch
            results.append(
                metered(
                    f"forklift HTTP batches: `POST /jobs/batch` of {batch} + `POST /jobs/wait`,"
                    f" {args.batch_connections} connections",
                    groups,
                    n,
                    lambda: asyncio.run(_forklift_batch(st.url, n, args.batch_connections, batch)),
                    rclient,
                )
            )
            print(f"  {results[-1].label}: {results[-1].rate:.0f} jobs/s", flush=True)

        quiet()
        fl_seq, fl_phases = forklift_sequential(st.url, seq)
        quiet()
        ce_seq = celery_sequential(plain, seq)
        for label, lat in (("forklift over HTTP", fl_seq), ("plain Celery", ce_seq)):
            seq_rows.append([label, fmt_s(pct(lat, 50)), fmt_s(pct(lat, 99)), len(lat)])
        phase_rows = [
            [label, fmt_s(pct(fl_phases[key], 50)), fmt_s(pct(fl_phases[key], 90))]
            for label, key in PHASES
        ]

        if args.attribute:
            quiet()
            attribution = attribute(st, groups, args.attribute, conc, results[0])

        best = max((r for r in results if r.label.startswith("forklift")), key=lambda r: r.rate)
        best_fl = best.rate
        celery_rate = next(r.rate for r in results if r.label.startswith("plain Celery"))
        wanted = args.profile or best_fl < 0.75 * celery_rate
        if wanted and not args.no_profile and importlib.util.find_spec("pyinstrument"):
            quiet()
            out_dir = results_dir(args.quick) / "profiles"
            profile_text, profile_files = profile_run(st, n, conc, out_dir)

    group_names = [
        "client",
        "api",
        "worker_main",
        "worker_children",
        "redis",
        "celery_main",
        "celery_children",
        *(["rabbitmq"] if rabbit is not None else []),
    ]
    rows, cost_rows, cmd_rows = [], [], []
    for r in results:
        used = [g for g in group_names if r.cpu.get(g, 0) > 0.01 * r.wall]
        total_us = sum(r.us_per_job(g) for g in group_names)
        rows.append(
            [r.label, f"{r.rate:.0f}", fmt_s(r.wall), r.errors]
            + [f"{r.cores(g):.2f}" for g in group_names]
            + [f"{r.others:.2f}"]
        )
        cost_rows.append(
            [
                r.label,
                *(f"{r.us_per_job(g):.0f}" if g in used else "" for g in group_names),
                f"{total_us:.0f}",
            ]
        )
        cmds = r.redis_commands or {}
        top = sorted(cmds.items(), key=lambda kv: -kv[1])[:12]
        cmd_rows.append(
            [r.label, f"{sum(cmds.values()):.1f}", ", ".join(f"{k} {v:.1f}" for k, v in top)]
        )
    table = md_table(["run", "jobs/s", "wall", "failed", *group_names, "foreign"], rows)
    costs = md_table(["run", *group_names, "total"], cost_rows)
    commands = md_table(["run", "per job", "most frequent (calls per job)"], cmd_rows, "lrl")
    ratio = best_fl / celery_rate
    targets = md_table(
        ["target", "measured", "met?"],
        [
            [
                "trivial-job throughput over HTTP ≥ 0.75 × plain Celery",
                f"{best_fl:.0f} vs {celery_rate:.0f} jobs/s = {ratio:.2f} × (best forklift run:"
                f" {best.label.split(':')[0].split(',')[0]})",
                "met" if ratio >= 0.75 else "missed",
            ]
        ],
        align="lll",
    )
    parts = [
        "# bench/throughput.py: trivial jobs end to end"
        + (" (RabbitMQ as the broker)" if rabbit is not None else ""),
        machine_info(),
        *(
            [
                "`--broker amqp`: forklift (`FORKLIFT_BROKER_URL`) and plain Celery take their"
                " messages from a private RabbitMQ node (`Supervisor.start_rabbitmq`, its CPU"
                " the *rabbitmq* group); records and Celery's results stay in Redis."
            ]
            if rabbit is not None
            else []
        ),
        f"{n} jobs per run; forklift's trivial job is the bench job `noop`, Celery's a task"
        " returning 1. Columns after *failed* are CPU cores used by each process group during"
        " the run (client = this bench process; *foreign* = other processes on the machine)."
        " A group near 1.00 is a single-threaded bottleneck; with 2 cores, all groups together"
        " near 2.00 mean the machine is full.",
        table,
        "CPU per job, µs (CPU seconds of each group over the jobs of the run):",
        costs,
        "Redis commands per job (`INFO commandstats`, all clients; commands run inside Lua"
        " scripts count too):",
        commands,
        *(["## Who sends the commands (MONITOR)", attribution] if attribution else []),
        "## One job at a time (latency)",
        md_table(["path", "p50", "p99", "jobs"], seq_rows),
        "forklift's one job, phase by phase (the client's clock against the record's stamps;"
        " the second row overlaps the third):",
        md_table(["phase", "p50", "p90"], phase_rows, "lrr"),
        "## Target (issue 5)",
        targets,
    ]
    if profile_text:
        parts += ["## Profile", profile_text]
        parts.append("Raw stacks: " + ", ".join(f"`{p.name}`" for p in profile_files))
    text = "\n\n".join(parts)
    print("\n" + text)
    name = "throughput" if rabbit is None else "throughput_amqp"
    print(f"\nwritten to {write_results(name, text, quick=args.quick)}")


def _celery_result(
    groups: dict[str, Callable[[], list[int]]], plain: ModuleType, n: int, client: redis.Redis
) -> Result:
    def run() -> tuple[float, list[float], int]:
        wall, failed = celery_burst(plain, n)
        return wall, [], failed

    label = f"plain Celery: {n} `apply_async()` at once, then `.get()` each"
    return metered(label, groups, n, run, client)


if __name__ == "__main__":
    main()

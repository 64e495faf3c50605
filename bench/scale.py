"""How far one broker goes: 1, 2 and 3 hosts in their own network namespaces, on each broker.

Each configuration is a fresh topology of forklift/netns.py (every host its own network, IPC
and mount namespace, API and worker; a private Redis on the root side, and with `amqp` a
private RabbitMQ node beside it, so the broker's CPU is this run's alone). The load is
`POST /jobs/batch` of 100 + `POST /jobs/wait`, from connections spread over the hosts' APIs
(the API's own cost per job is bench/throughput.py's subject; batches keep it small here so
the broker's share shows). Two workloads: `noop` (trivial) and `pause` (a 10 ms sleep: no CPU,
so on this 2-core machine more hosts still add capacity, where CPU-bound jobs could not).

Per run: jobs/s, CPU per job of every process group (APIs, workers, Redis, RabbitMQ) read
from /proc, and Redis commands per job (`INFO commandstats`, those inside scripts counted).
The ceiling of one broker is where it would saturate one core: 1 / (its CPU seconds per
trivial job), and the cores it keeps busy at a job length d is ceiling × d. That is a
linear extrapolation from the measured cost per job (a Redis under more load pipelines
more and gets cheaper per command, so it errs low).

    python -m bench.scale                      # needs root (ip netns); ~5 min
    python -m bench.scale --hosts 1,2 --brokers redis --jobs 500 --quick

Writes bench/results/scale.md and scale.png (or results/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from bench.common import (
    SUPERVISOR,
    CpuMeter,
    machine_info,
    md_table,
    results_dir,
    tree,
    wait_quiet,
    write_results,
)
from bench.throughput import _forklift_batch, command_stats
from forklift import netns
from forklift.supervisor import Proc

NAMES = ("a", "b", "c")
GROUPS = ("api", "worker", "redis", "rabbitmq")
JOB_LENGTHS = (0.010, 0.100, 1.0)  # seconds per job, for "cores one broker feeds"


@dataclass
class Run:
    broker: str
    hosts: int
    workload: str
    jobs: int
    wall: float
    failed: int
    cpu: dict[str, float]
    foreign: float
    commands: float
    by_command: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.jobs / self.wall

    def us_per_job(self, group: str) -> float:
        return self.cpu.get(group, 0.0) / self.jobs * 1e6


def groups_of(topo: netns.Topology) -> dict[str, Callable[[], list[int]]]:
    hosts = list(topo.hosts.values())

    def of(procs: Callable[[], list[Proc | None]]) -> Callable[[], list[int]]:
        return lambda: [pid for p in procs() if p is not None for pid in tree(p.pid)]

    return {
        "api": of(lambda: [h.api for h in hosts]),
        "worker": of(lambda: [h.worker for h in hosts]),
        "redis": of(lambda: [topo.redis]),
        "rabbitmq": of(lambda: [topo.rabbitmq]),
    }


def measure(
    topo: netns.Topology,
    broker: str,
    workload: str,
    body: dict[str, object],
    n: int,
    connections: int,
    batch: int,
) -> Run:
    groups = groups_of(topo)
    ours = [pid for pids in groups.values() for pid in pids()]
    foreign = wait_quiet(ignore=ours)
    client = redis.Redis.from_url(topo.redis_url, password=topo.env["FORKLIFT_REDIS_PASSWORD"])
    try:
        before = command_stats(client)
        meter = CpuMeter(groups)
        meter.start()
        urls = [h.url for h in topo.hosts.values()]
        wall, _, failed = asyncio.run(_forklift_batch(urls, n, connections, batch, body))
        meter.stop()
        after = command_stats(client)
    finally:
        client.close()
    by_command = {k: (v - before.get(k, 0)) / n for k, v in after.items() if v > before.get(k, 0)}
    by_command.pop("info", None)  # this function's own
    return Run(
        broker,
        len(topo.hosts),
        workload,
        n,
        wall,
        failed,
        dict(meter.seconds),
        foreign,
        sum(by_command.values()),
        by_command,
    )


def ceilings(runs: list[Run]) -> list[list[object]]:
    """Per broker, from its trivial runs (median CPU per job over the host counts): the jobs/s
    at which its broker, and its Redis, would keep one core busy, and the cores that feeds."""
    rows: list[list[object]] = []
    for broker in dict.fromkeys(r.broker for r in runs):
        trivial = [r for r in runs if r.broker == broker and r.workload == "noop"]
        if not trivial:
            continue
        servers = ["redis"] if broker == "redis" else ["rabbitmq", "redis"]
        for server in servers:
            costs = sorted(r.us_per_job(server) for r in trivial)
            us = costs[len(costs) // 2]
            ceiling = 1e6 / us if us else float("inf")
            role = (
                "broker + records"
                if broker == "redis"
                else ("broker" if server == "rabbitmq" else "records only")
            )
            rows.append(
                [
                    f"{'Redis' if broker == 'redis' else 'RabbitMQ'} broker",
                    f"{server} ({role})",
                    f"{us:.0f} ({min(costs):.0f}–{max(costs):.0f})",
                    f"**{ceiling:,.0f}**",
                    *(f"{ceiling * d:,.0f}" for d in JOB_LENGTHS),
                ]
            )
    return rows


def plot(runs: list[Run], path_stem: str, quick: bool) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, workload in zip(axes, ("noop", "pause"), strict=True):
        for broker in dict.fromkeys(r.broker for r in runs):
            mine = sorted(
                (r for r in runs if r.broker == broker and r.workload == workload),
                key=lambda r: r.hosts,
            )
            if mine:
                ax.plot([r.hosts for r in mine], [r.rate for r in mine], "o-", label=broker)
        ax.set_title("trivial jobs" if workload == "noop" else "10 ms jobs (sleep)")
        ax.set_xlabel("hosts (network namespaces)")
        ax.set_ylabel("jobs/s")
        ax.set_xticks([1, 2, 3])
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle("forklift: jobs/s by hosts and broker (2-core machine, batch submits)")
    fig.tight_layout()
    path = results_dir(quick) / f"{path_stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", default="1,2,3")
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--jobs", type=int, default=3000, help="per run")
    parser.add_argument("--ms", type=int, default=10, help="the slow workload's job length")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes per host")
    parser.add_argument("--connections", type=int, default=6, help="over all hosts' APIs")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if reason := netns.netns_unavailable():
        sys.exit(f"bench/scale.py needs network namespaces: {reason}")
    host_counts = [int(h) for h in args.hosts.split(",")]
    workloads = {
        "noop": {"task": "noop", "params": {}},
        "pause": {"task": "pause", "params": {"ms": args.ms}},
    }
    runs: list[Run] = []
    started = time.time()
    for broker in args.brokers.split(","):
        for count in host_counts:
            with netns.topology(
                NAMES[:count],
                concurrency=args.concurrency,
                base=SUPERVISOR,
                job_modules="bench.jobs",
                broker=broker,
            ) as topo:
                # Warm up: every worker child and API connection in use once.
                asyncio.run(
                    _forklift_batch(
                        [h.url for h in topo.hosts.values()],
                        300,
                        args.connections,
                        args.batch,
                        workloads["noop"],
                    )
                )
                for name, body in workloads.items():
                    run = measure(topo, broker, name, body, args.jobs, args.connections, args.batch)
                    runs.append(run)
                    print(
                        f"{broker:5} {count} host(s) {name:5}: {run.rate:7.0f} jobs/s, "
                        + ", ".join(f"{g} {run.us_per_job(g):.0f} µs" for g in GROUPS)
                        + f", {run.commands:.1f} Redis commands/job, foreign {run.foreign:.2f}",
                        flush=True,
                    )
            if topo.leftovers:
                sys.exit(f"left behind: {topo.leftovers}")

    rows = [
        [
            r.broker,
            r.hosts,
            "trivial" if r.workload == "noop" else f"{args.ms} ms sleep",
            f"**{r.rate:,.0f}**",
            *(
                f"{r.us_per_job(g):,.0f}" if g != "rabbitmq" or r.broker == "amqp" else "–"
                for g in GROUPS
            ),
            f"{r.commands:.1f}",
            f"{sum(r.cpu.values()) / r.wall:.2f}",
            r.failed,
            f"{r.foreign:.2f}",
        ]
        for r in runs
    ]
    table = md_table(
        [
            "broker",
            "hosts",
            "jobs",
            "jobs/s",
            *(f"{g} µs/job" for g in GROUPS),
            "Redis commands/job",
            "cores busy (all groups)",
            "failed",
            "foreign load",
        ],
        rows,
        "lrlrrrrrrrrr",
    )
    ceiling_table = md_table(
        [
            "stack",
            "server",
            "CPU µs per trivial job (median; range)",
            "jobs/s at one core",
            *(f"cores fed at {d * 1000:g} ms/job" for d in JOB_LENGTHS),
        ],
        ceilings(runs),
        "llrrrrr",
    )
    png = plot(runs, "scale", args.quick)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    text = f"""# bench/scale.py: jobs/s by hosts and broker, and the ceiling of one broker

{machine_info()}

`python -m bench.scale {" ".join(sys.argv[1:])}`, {stamp}.
Hosts are network namespaces of forklift/netns.py, each with its API and a worker of
{args.concurrency} processes; {args.jobs} jobs per run, submitted as `POST /jobs/batch` of
{args.batch} over {args.connections} connections spread over the hosts' APIs, each batch then
waited for with `POST /jobs/wait`. Redis is a private `redis-server`; RabbitMQ a private node
(`Supervisor.start_rabbitmq`), so their CPU is this run's. CPU per job is CPU seconds of the
group's processes over the run, divided by jobs; Redis commands per job from `INFO
commandstats` (commands run inside forklift's Lua scripts counted). Foreign load: cores other
processes kept busy just before the run (the machine is shared).

{table}

{f"![jobs/s by hosts]({png})" if png else ""}

## The ceiling of one broker

One core's worth of broker CPU, divided by the broker's CPU per trivial job: the rate at
which that server is saturated, whatever the number of hosts, and the cores of workers it
keeps busy when each job takes 10 ms, 100 ms or 1 s (rate × length).

{ceiling_table}
"""
    print(text)
    path = write_results("scale", text, args.quick)
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""One job against the same work in-process: where the time of one big job goes.

    .venv/bin/python -m bench.onejob [--repeat 3] [--steps]

For `sort` of 1 GiB float64, `matmul` 4000x4000 and `sum` of 1 GiB: in-process NumPy (one
thread, as a worker child runs) against one forklift job on a private stack, the input put
with the same-host client (so no upload is part of the job). Each job is run cold (the
stack's segment pool drained first, a fresh child) and warm (the next job in the same
child, its result segment from the pool).

`--steps` also times the steps inside the worker child (attach, the job function, storing
the result, the free of what the job allocated, Redis round trips) with minor page faults
per step. It does so by wrapping forklift's functions in the worker's process from this
module, loaded as a job module (`BENCH_ONEJOB_PROBE` names the file the child writes one
JSON line per job to); nothing in forklift itself is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PROBE_ENV = "BENCH_ONEJOB_PROBE"

# --- the probe (runs in the worker's processes only) -----------------------------------------

_events: list[tuple[str, float, float, int]] = []


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _record(name: str, t0: float, f0: int) -> None:
    _events.append((name, t0, time.perf_counter(), _faults() - f0))


def _wrap(owner: Any, attr: str, name: str) -> None:
    original = getattr(owner, attr, None)
    if original is None or getattr(original, "_probe", False):
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, f0 = time.perf_counter(), _faults()
        try:
            return original(*args, **kwargs)
        finally:
            _record(name, t0, f0)

    timed._probe = True  # type: ignore[attr-defined]
    setattr(owner, attr, timed)


def _wrap_cm(owner: Any, attr: str, name: str) -> None:
    """A context manager factory: its enter and its exit timed apart."""
    original = getattr(owner, attr, None)
    if original is None or getattr(original, "_probe", False):
        return

    @contextlib.contextmanager
    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        t0, f0 = time.perf_counter(), _faults()
        cm = original(*args, **kwargs)
        value = cm.__enter__()
        _record(f"{name} enter", t0, f0)
        try:
            yield value
        except BaseException:
            t0, f0 = time.perf_counter(), _faults()
            if not cm.__exit__(*sys.exc_info()):
                raise
            _record(f"{name} exit", t0, f0)
        else:
            t0, f0 = time.perf_counter(), _faults()
            cm.__exit__(None, None, None)
            _record(f"{name} exit", t0, f0)

    timed._probe = True  # type: ignore[attr-defined]
    setattr(owner, attr, timed)


def _install_probe(path: str) -> None:
    from shared.arrays import copying, lifecycle, mappings, pool, segments
    from shared.jobstore import JobStore
    from shared.registry import JobSpec
    from worker import runner

    _wrap(JobStore, "start", "redis: start")
    _wrap(JobStore, "finish", "redis: finish")
    _wrap(JobStore, "report_progress", "redis: progress")
    _wrap_cm(runner, "attached", "attach inputs")
    _wrap_cm(runner, "memory_limit", "memory limit")
    _wrap(runner, "_mapped_bytes", "memory limit: VmSize")
    _wrap(JobSpec, "call", "job function")
    _wrap(JobSpec, "check_inputs", "check inputs")
    _wrap(runner, "encode_result", "store result (all)")
    _wrap(runner, "copy_into", "store: copy_into")
    _wrap(copying, "copy_into", "copy_into")
    _wrap(lifecycle.ArrayWrite, "begin", "store: reserve (redis)")
    _wrap(lifecycle.SegmentWrite, "open", "store: open segment")
    _wrap(lifecycle.Writing, "__exit__", "store: close+commit+fetch")
    _wrap(pool, "claim", "open: pool claim")
    _wrap(pool, "take", "claim: rename+cut")
    _wrap(mappings, "create", "open: new segment")
    _wrap(mappings, "attach", "mappings.attach")
    _wrap(mappings, "sweep", "mappings.sweep")
    _wrap(segments, "prefault", "prefault (MADV_POPULATE_WRITE)")
    _wrap(segments, "_allocate", "posix_fallocate")
    _wrap(lifecycle, "free", "free arrays (redis+pool)")
    _wrap(runner, "_execute", "execute (all)")
    _wrap(runner, "_run_in_place", "in place (all)")
    from shared import splits

    _wrap(splits, "run_part", "in place: copy + sort (run_part)")
    _wrap(splits, "finish", "in place: finish")

    from shared.registry import get_job

    spec = get_job("sort")
    if spec is not None and spec.func.__module__ != __name__:

        def sort(a: np.ndarray, axis: int | None = -1, kind: str = "quicksort") -> np.ndarray:
            """np.sort's own two steps (a private copy, then an in-place sort), timed apart."""
            t0, f0 = time.perf_counter(), _faults()
            b = a.flatten() if axis is None else a.copy(order="K")
            _record("sort: private copy", t0, f0)
            t0, f0 = time.perf_counter(), _faults()
            b.sort(axis=-1 if axis is None else axis, kind=kind)  # type: ignore[arg-type]
            _record("sort: in place", t0, f0)
            return b

        spec.func = sort

    original_run = runner.run

    @functools.wraps(original_run)
    def run(payload: Any, node: str = "") -> runner.Ended:
        _events.clear()
        t0, f0 = time.perf_counter(), _faults()
        try:
            return original_run(payload, node)
        finally:
            _record("run (all)", t0, f0)
            line = {
                "job": payload.job_id,
                "pid": os.getpid(),
                "t0": t0,
                "events": [[n, a - t0, b - t0, f] for n, a, b, f in _events],
            }
            with open(path, "a") as out:
                out.write(json.dumps(line) + "\n")

    run._probe = True  # type: ignore[attr-defined]
    runner.run = run  # type: ignore[assignment]


if os.environ.get(PROBE_ENV) and "worker.tasks" in sys.modules:
    _install_probe(os.environ[PROBE_ENV])


# --- the bench -------------------------------------------------------------------------------

GIB = 1 << 30


def _inprocess(work: str, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """In-process times (one BLAS thread, as a worker child) for one piece of work."""
    from threadpoolctl import threadpool_limits

    out: dict[str, float] = {}
    with threadpool_limits(1):
        if work == "sort":
            a = arrays["a"]
            t = time.perf_counter()
            b = np.sort(a)
            out["np.sort (fresh output)"] = time.perf_counter() - t
            del b
            buf = np.empty_like(a)
            buf[...] = 0
            t = time.perf_counter()
            np.copyto(buf, a)
            t1 = time.perf_counter()
            buf.sort()
            out["copy into warm buffer"] = t1 - t
            out["sort in place (warm buffer)"] = time.perf_counter() - t1
            out["copy + sort in place (warm)"] = time.perf_counter() - t
            del buf
        elif work == "matmul":
            t = time.perf_counter()
            c = arrays["a"] @ arrays["b"]
            out["a @ b"] = time.perf_counter() - t
            del c
        elif work == "sum":
            t = time.perf_counter()
            float(np.sum(arrays["a"]))
            out["np.sum"] = time.perf_counter() - t
    return out


def _drain_pool(prefix: str) -> None:
    for entry in os.scandir("/dev/shm"):
        if entry.name.startswith(prefix + "pool_"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _job(fl: Any, task: str, handles: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    job = fl.submit(task, **handles, **params)
    view = job.wait(timeout=600)
    wall = time.perf_counter() - t0
    if view.status.value != "succeeded":
        raise RuntimeError(f"{task} job {job.id}: {view.status.value} {view.error}")
    return {"id": job.id, "wall": wall, "view": view}


def _child_steps(path: Path, job_id: str) -> dict[str, Any] | None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["job"] == job_id:
                    return row
        time.sleep(0.05)
    return None


def _steps_table(row: dict[str, Any]) -> list[str]:
    """Per-step sums of (time, faults) in the child, in order of first appearance."""
    sums: dict[str, list[float]] = {}
    for name, a, b, faults in row["events"]:
        s = sums.setdefault(name, [0.0, 0, 0, a])
        s[0] += b - a
        s[1] += faults
        s[2] += 1
    lines = []
    for name, (secs, faults, count, start) in sorted(sums.items(), key=lambda kv: kv[1][3]):
        n = f" x{count}" if count > 1 else ""
        lines.append(f"| {name}{n} | {start * 1e3:.0f} | {secs * 1e3:.1f} | {faults:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", action="store_true", help="time the steps in the child")
    parser.add_argument("--work", default="sort,matmul,sum")
    args = parser.parse_args(argv)

    from bench.common import machine_info, md_table, running_stack, wait_quiet

    works = args.work.split(",")
    rng = np.random.default_rng(0)
    data: dict[str, dict[str, np.ndarray]] = {}
    if "sort" in works:
        data["sort"] = {"a": rng.random(GIB // 8)}
    if "matmul" in works:
        data["matmul"] = {"a": rng.random((4000, 4000)), "b": rng.random((4000, 4000))}
    if "sum" in works:
        data["sum"] = {"a": data["sort"]["a"] if "sort" in data else rng.random(GIB // 8)}
    params: dict[str, dict[str, Any]] = {"sort": {}, "matmul": {}, "sum": {}}

    probe = Path(tempfile.mkdtemp(prefix="onejob-")) / "steps.jsonl"
    extra = {"FORKLIFT_JOB_MODULES": "bench.jobs,bench.onejob"} if args.steps else {}
    if args.steps:
        os.environ[PROBE_ENV] = str(probe)
    print(machine_info())
    rows: list[list[object]] = []
    detail: list[str] = []
    # concurrency 1: the warm job runs in the same child as the cold one
    with running_stack(concurrency=1, **extra) as st:
        from forklift import Client

        with Client(st.url, timeout=600) as fl:
            for work in works:
                inproc: dict[str, list[float]] = {}
                for _ in range(args.repeat):
                    wait_quiet(0.3, 60)
                    for k, v in _inprocess(work, data[work]).items():
                        inproc.setdefault(k, []).append(v)
                base = min(next(iter(inproc.values())))
                for rep in range(args.repeat):
                    # cold: a new input (the old one deleted), an empty pool, a new result
                    # segment; warm: the same job again in the same child
                    _drain_pool(st.shm_prefix)
                    time.sleep(3)  # the child sweeps its kept mappings of them
                    busy = wait_quiet(0.3, 60)
                    handles = {
                        k: fl.put_array(v, shared_memory=True) for k, v in data[work].items()
                    }
                    try:
                        for state in ("cold", "warm"):
                            got = _job(fl, work, handles, params[work])
                            view = got["view"]
                            run_s = (view.finished_at or 0) - (view.started_at or 0)
                            rows.append(
                                [work, state, f"{busy:.2f}", f"{base:.3f}", f"{got['wall']:.3f}",
                                 f"{run_s:.3f}", f"{got['wall'] / base:.2f}x"]
                            )  # fmt: skip
                            if args.steps:
                                row = _child_steps(probe, got["id"])
                                if row is not None:
                                    detail += [
                                        f"\n{work}, {state}, run {rep + 1} (child {row['pid']}):\n",
                                        "| step | starts at ms | ms | minor faults |",
                                        "| --- | ---: | ---: | ---: |",
                                        *_steps_table(row),
                                    ]
                            result = view.result
                            if isinstance(result, dict) and "array" in result:
                                fl.delete_array(result["array"]["id"])
                    finally:
                        for h in handles.values():
                            fl.delete_array(h)
                for k, v in inproc.items():
                    detail.append(f"in-process {work}: {k}: {min(v):.3f}-{max(v):.3f} s")
    print(
        md_table(
            [
                "work",
                "state",
                "others' cores",
                "in-process s",
                "job wall s",
                "record run s",
                "ratio",
            ],
            rows,
        )
    )
    print("\n".join(detail))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

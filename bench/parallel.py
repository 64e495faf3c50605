"""One big array, every core: forklift's parallel jobs beside the peers that split an array.

In one run, on float64 arrays of 256 MiB and 1 GiB (standard normal values) and a 4000x4000
`matmul` (`--quick`: 32 MiB and 1000x1000, one repeat):

- **forklift, one job** and **forklift, parallel="auto"** (`POST /jobs`, inputs uploaded once
  before the case; the array results stay in their segments and are checked by attaching
  them; the pipeline is one `POST /jobs/batch` with `{"job": "#0"}` inputs, and once more as
  three jobs the client chains itself);
- **NumPy in this process**, one thread (BLAS pinned to 1 with threadpoolctl), and for `matmul`
  also BLAS threads = cores;
- **joblib** `Parallel(n_jobs=cores)` (loky): the input memmapped automatically (default
  `max_nbytes`), array outputs into a `w+` `np.memmap` (in /dev/shm, as joblib's own
  temp folder is), reductions returned as partials;
- **Dask array**, threaded scheduler, chunks = cores (`map_blocks`, its reductions,
  `da.histogram`), `.compute()`; BLAS 1 thread per chunk;
- **Ray**: `ray.put` once (not timed), one task per slice, `np.concatenate` (or partials);
  the pipeline passes ObjectRefs from task to task;
- **the seed note's approach**: `multiprocessing.shared_memory` + a warm `ProcessPoolExecutor`
  of cores children; the input copied into a segment once (not timed), each output a new
  segment every child writes its slice of.

Every path runs the same kernels: elementwise is bench/jobs.py's `elementwise_into` (ufuncs
with `out=` in 8 MiB blocks), `std` combines per-slice (count, mean, M2), a parallel `sort`
sorts slices then merges them in the driver (a stable sort of the runs, which timsort merges),
`matmul` splits the rows of `a`, the pipeline is min-max normalize -> |rfft| along the last
axis of a (n/4096, 4096) view -> a 100-bin histogram on a fixed range.

Each run starts once the machine is idle (under 0.1 busy cores, waited for up to 5 s), so
what a case leaves running (freed segments being unmapped) is not charged to the next.

Columns: wall time (best of N timed runs, and the range; each case runs once before them, the
cold run, which alone is memory-sampled and shown as `first run`), speedup over one forklift
job (and over NumPy on one thread), CPU cores used (utime+stime, with reaped children's, of
every process of the path: this driver, the stack's API/worker/children/Redis, pool children,
Ray's processes; over the wall time), and peak private memory growth per process. Private
memory: every 0.1 s a thread reads each process's Private_Clean + Private_Dirty of its
MAP_PRIVATE mappings (/proc/<pid>/smaps; the cheaper smaps_rollup when the process maps no
shmem), so pages of /dev/shm segments, memfds and other MAP_SHARED mappings count as shared
even where one process alone maps them; growth is the peak minus the reading just before the
run (a process born during the run: its peak). /dev/shm growth (statvfs, the whole machine) is
its own column.

Run: python -m bench.parallel [--quick] [--repeat 3] [--only numpy,dask,...] [--no-forklift]
"""

# The cases are closures over the loop's current array, each called within the iteration
# that made it (never later), which is what B023 warns about.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import httpx
import numpy as np

from bench.common import (
    CORES,
    MIB,
    Forklift,
    cpu_seconds,
    fmt_bytes,
    fmt_s,
    machine_info,
    md_table,
    results_dir,
    running_stack,
    system_busy_seconds,
    tree,
    write_results,
)
from bench.jobs import elementwise_into

BINS = 100
HIST_RANGE = (-5.0, 5.0)
ROW = 4096  # the pipeline's (n / ROW, ROW) view: fft along the last axis
SPEC_RANGE = (0.0, 64.0)
MM = ["4000²"]  # the matmul's label (set by main)
WORKLOADS = ["elementwise", "sum", "std", "histogram", "sort", "matmul", "pipeline"]
PATHS = ["forklift", "forklift-auto", "forklift-steps", "numpy", "numpy-blas", "joblib", "dask",
         "ray", "seed"]  # fmt: skip
LABELS = {
    "forklift": "forklift, one job",
    "forklift-auto": 'forklift, parallel="auto"',
    "forklift-steps": "forklift, 3 jobs chained by the client",
    "numpy": "NumPy in-process, 1 thread",
    "numpy-blas": f"NumPy in-process, BLAS {CORES} threads",
    "joblib": f"joblib Parallel({CORES}) + memmap",
    "dask": f"Dask array, threads, {CORES} chunks",
    "ray": "Ray: put once, task per slice",
    "seed": f"seed: shared_memory + ProcessPool({CORES})",
}


# --- kernels every path shares ---------------------------------------------------------------


def bounds(n: int, parts: int = CORES) -> list[tuple[int, int]]:
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts) if cuts[i + 1] > cuts[i]]


def elementwise_new(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape, dtype=np.float64)
    elementwise_into(a, out)
    return out


def moments(a: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, M2) of a slice, combined with Chan's formula."""
    n = a.size
    mean = float(a.mean()) if n else 0.0
    d = a - mean
    return n, mean, float(np.dot(d.ravel(), d.ravel()))


def combine_std(parts: list[tuple[int, float, float]]) -> float:
    n, mean, m2 = 0, 0.0, 0.0
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        delta = mb - mean
        tot = n + nb
        mean += delta * nb / tot
        m2 += m2b + delta * delta * n * nb / tot
        n = tot
    return float(np.sqrt(m2 / n))


def hist(a: np.ndarray, rng: tuple[float, float] = HIST_RANGE) -> np.ndarray:
    return np.histogram(a, bins=BINS, range=rng)[0]


def merge_sorted(runs: np.ndarray) -> np.ndarray:
    """One sorted array from consecutive sorted runs: timsort finds and merges them."""
    return np.sort(runs, kind="stable")


def spectrum(block: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.rfft(block, axis=-1))


def pipeline_numpy(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    norm = (m - lo) / (hi - lo)
    return hist(spectrum(norm), SPEC_RANGE)


# --- memory and CPU meters -------------------------------------------------------------------


def _status_shmem(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def private_bytes(pid: int) -> int:
    """Private_Clean + Private_Dirty of the MAP_PRIVATE mappings of `pid` (0 if gone)."""
    try:
        if _status_shmem(pid) == 0:
            total = 0
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Private_"):
                        total += int(line.split()[1]) * 1024
            return total
        total, shared = 0, False
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 2)
                if len(head) > 1 and "-" in head[0] and len(head[1]) == 4:
                    shared = head[1][3] == "s"
                elif not shared and line.startswith("Private_"):
                    total += int(head[1]) * 1024
        return total
    except OSError:
        return 0


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class Meter:
    """Samples the private memory of a changing set of processes every `interval` s."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.pids_fn: Callable[[], list[int]] = lambda: [os.getpid()]
        self.base: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.shm_base = 0
        self.shm_peak = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._on = False
        self._thread = threading.Thread(target=self._run, name="meter", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def begin(self, pids_fn: Callable[[], list[int]]) -> None:
        with self.lock:
            self.pids_fn = pids_fn
            self.base = {p: private_bytes(p) for p in pids_fn()}
            self.peak = dict(self.base)
            self.shm_base = self.shm_peak = shm_used()
            self._on = True

    def end(self) -> dict[str, Any]:
        self._sample()
        with self.lock:
            self._on = False
            growth = {p: self.peak[p] - self.base.get(p, 0) for p in self.peak}
            me = os.getpid()
            others = {p: max(0, g) for p, g in growth.items() if p != me}
            return {
                "driver": max(0, growth.get(me, 0)),
                "other_max": max(others.values(), default=0),
                "other_sum": sum(others.values()),
                "processes": len(growth),
                "shm": max(0, self.shm_peak - self.shm_base),
                "peak_abs": dict(self.peak),
            }

    def _sample(self) -> None:
        with self.lock:
            if not self._on:
                return
            pids = self.pids_fn()
        values = {p: private_bytes(p) for p in pids}
        shm = shm_used()
        with self.lock:
            if not self._on:
                return
            for p, v in values.items():
                self.peak[p] = max(self.peak.get(p, 0), v)
            self.shm_peak = max(self.shm_peak, shm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()


def descendants_of_me() -> list[int]:
    return tree(os.getpid())


SETTLE_CORES = 0.1  # busy cores, machine-wide, under which a run may start
SETTLE_MAX_S = 5.0


def settle() -> None:
    """Wait (up to SETTLE_MAX_S) until the machine is idle: what the last case left running
    (freed GiB segments being unmapped and their pages returned to the host take about a
    second of CPU per GiB here) must not be charged to the next case."""
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        busy = system_busy_seconds()
        time.sleep(0.1)
        if (system_busy_seconds() - busy) / 0.1 < SETTLE_CORES:
            return


@dataclass
class Row:
    runs: list[float] = field(default_factory=list)
    first: float | None = None  # the first run: cold, memory metered, not among `runs`
    cores: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    mem: dict[str, Any] | None = None
    error: str | None = None

    @property
    def best(self) -> float | None:
        return min(self.runs) if self.runs and not self.error else None


class Bench:
    def __init__(self, repeat: int) -> None:
        self.repeat = repeat
        self.rows: dict[tuple[str, str, str], Row] = {}
        self.meter = Meter()
        self.notes: list[str] = []

    def run(
        self,
        path: str,
        work: str,
        size: str,
        fn: Callable[[], Any],
        check: Callable[[Any], None],
        pids: Callable[[], list[int]] = descendants_of_me,
        after: Callable[[Any], None] | None = None,
    ) -> None:
        row = self.rows.setdefault((path, work, size), Row())
        try:
            # Run 0 samples memory (reading /proc/<pid>/smaps of processes that map GiBs costs
            # a core's worth of kernel time on 2 cores, and slows whoever it reads): it is the
            # cold run, reported on its own; the timed runs after it are not sampled.
            for i in range(self.repeat + 1):
                settle()
                before = pids()
                cpu0 = {p: cpu_seconds(p) for p in before}
                sys0 = system_busy_seconds()
                if i == 0:
                    self.meter.begin(pids)
                t0 = time.perf_counter()
                value = fn()
                wall = time.perf_counter() - t0
                sys1 = system_busy_seconds()
                used = sum(cpu_seconds(p) - cpu0.get(p, 0.0) for p in set(before) | set(pids()))
                if i == 0:
                    row.mem = self.meter.end()
                    check(value)
                if after is not None:
                    after(value)
                del value
                if i == 0:
                    row.first = wall
                    continue
                row.runs.append(wall)
                row.cores.append(used / wall)
                row.others.append(max(0.0, (sys1 - sys0) - used) / wall)
            print(
                f"  {size:>8} {work:<12} {LABELS[path]:<42} best {fmt_s(row.best)}"
                f"  ({row.cores[-1]:.2f} cores)",
                flush=True,
            )
        except Exception as exc:
            traceback.print_exc()
            row.error = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")[:200]
            print(f"  {size:>8} {work:<12} {LABELS[path]:<42} FAILED {row.error}", flush=True)


# --- the data and its reference results ------------------------------------------------------


@dataclass
class Data:
    label: str
    a: np.ndarray  # 1-D float64
    m: np.ndarray  # the same bytes as (n / ROW, ROW)
    ref: dict[str, Any]


def make_data(base: np.ndarray, nbytes: int, label: str) -> Data:
    a = base[: nbytes // 8]
    a = a[: (a.size // ROW) * ROW]
    m = a.reshape(-1, ROW)
    with threadpool(1):
        ref = {
            "sum": float(a.sum()),
            "std": float(a.std()),
            "histogram": hist(a),
            "pipeline": pipeline_numpy(m),
            "elementwise_probe": elementwise_new(a[:: max(1, a.size // 4096)]),
        }
    return Data(label, a, m, ref)


def checker(work: str, d: Data | None, mm: tuple[np.ndarray, np.ndarray, np.ndarray] | None):
    """A function that raises if a path's result differs from NumPy's."""

    def check(value: Any) -> None:
        if work == "elementwise":
            assert d is not None
            step = max(1, d.a.size // 4096)
            got = np.asarray(value).reshape(-1)[::step]
            assert got.shape == d.ref["elementwise_probe"].shape, got.shape
            assert np.allclose(got, d.ref["elementwise_probe"]), "elementwise differs"
        elif work in ("sum", "std"):
            assert d is not None
            assert np.isclose(float(value), d.ref[work], rtol=1e-9), (work, value, d.ref[work])
        elif work in ("histogram", "pipeline"):
            assert d is not None
            assert np.array_equal(np.asarray(value), d.ref[work]), f"{work} counts differ"
        elif work == "sort":
            assert d is not None
            v = np.asarray(value).reshape(-1)
            assert v.size == d.a.size and bool(np.all(v[1:] >= v[:-1])), "not sorted"
            assert np.isclose(float(v.sum()), d.ref["sum"], rtol=1e-9), "sort lost values"
        elif work == "matmul":
            assert mm is not None
            v = np.asarray(value)
            assert v.shape == mm[2].shape and np.allclose(v[::97], mm[2][::97]), "matmul differs"

    return check


@contextlib.contextmanager
def threadpool(n: int) -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield


# --- NumPy in process ------------------------------------------------------------------------


def run_numpy(b: Bench, datas: list[Data], mm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    me = lambda: [os.getpid()]  # noqa: E731
    for d in datas:
        a, m = d.a, d.m
        work: dict[str, Callable[[], Any]] = {
            "elementwise": lambda: elementwise_new(a),
            "sum": lambda: a.sum(),
            "std": lambda: a.std(),
            "histogram": lambda: hist(a),
            "sort": lambda: np.sort(a),
            "pipeline": lambda: pipeline_numpy(m),
        }
        with threadpool(1):
            for w, fn in work.items():
                b.run("numpy", w, d.label, fn, checker(w, d, None), me)
    with threadpool(1):
        b.run("numpy", "matmul", MM[0], lambda: mm[0] @ mm[1], checker("matmul", None, mm), me)
    with threadpool(CORES):
        b.run("numpy-blas", "matmul", MM[0], lambda: mm[0] @ mm[1], checker("matmul", None, mm), me)


# --- Dask ------------------------------------------------------------------------------------


def run_dask(b: Bench, datas: list[Data], mm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    import dask
    import dask.array as da

    me = lambda: [os.getpid()]  # noqa: E731
    opts = {"scheduler": "threads", "num_workers": CORES}

    def sort(x: Any) -> np.ndarray:
        return merge_sorted(x.map_blocks(np.sort).compute(**opts))

    def pipeline(y: Any) -> np.ndarray:
        norm = (y - y.min()) / (y.max() - y.min())
        spec = norm.map_blocks(spectrum, chunks=(y.chunks[0], (ROW // 2 + 1,)))
        return da.histogram(spec, bins=BINS, range=SPEC_RANGE)[0].compute(**opts)

    with threadpool(1):
        for d in datas:
            x = da.from_array(d.a, chunks=-(-d.a.size // CORES))
            y = da.from_array(d.m, chunks=(-(-d.m.shape[0] // CORES), ROW))
            work: dict[str, Callable[[], Any]] = {
                "elementwise": lambda: x.map_blocks(elementwise_new).compute(**opts),
                "sum": lambda: x.sum().compute(**opts),
                "std": lambda: x.std().compute(**opts),
                "histogram": lambda: da.histogram(x, bins=BINS, range=HIST_RANGE)[0].compute(
                    **opts
                ),
                "sort": lambda: sort(x),
                "pipeline": lambda: pipeline(y),
            }
            for w, fn in work.items():
                b.run("dask", w, d.label, fn, checker(w, d, None), me)
        n = mm[0].shape[0]
        xa = da.from_array(mm[0], chunks=(-(-n // CORES), n))
        xb = da.from_array(mm[1], chunks=mm[1].shape)
        b.run("dask", "matmul", MM[0], lambda: (xa @ xb).compute(**opts),
              checker("matmul", None, mm), me)  # fmt: skip
    b.notes.append(
        f"Dask {dask.__version__}: `.compute(scheduler='threads', num_workers={CORES})`."
    )


# --- the seed note's approach: shared_memory + ProcessPoolExecutor ---------------------------

_ATTACHED: dict[str, tuple[shared_memory.SharedMemory, np.ndarray]] = {}


def _view(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A child's view of a segment by name, attached once per child."""
    got = _ATTACHED.get(name)
    if got is None or got[1].shape != shape:
        shm = shared_memory.SharedMemory(name=name)
        # Python 3.11 has no track=False: the parent owns (and unlinks) the segment
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        got = (shm, np.ndarray(shape, dtype=np.float64, buffer=shm.buf))
        _ATTACHED[name] = got
    return got[1]


def _forget(name: str) -> int:
    got = _ATTACHED.pop(name, None)
    if got is not None:
        del got
    return os.getpid()


def seed_task(
    op: str, src: str, shape: tuple[int, ...], lo: int, hi: int, dst: str = "",
    dshape: tuple[int, ...] = (), extra: Any = None,
) -> Any:  # fmt: skip
    """One slice [lo, hi) of axis 0 of segment `src`, written to `dst` or returned."""
    a = _view(src, shape)[lo:hi]
    if op == "elementwise":
        elementwise_into(a, _view(dst, dshape)[lo:hi])
        return None
    if op == "sum":
        return float(a.sum())
    if op == "std":
        return moments(a)
    if op == "histogram":
        return hist(a, extra or HIST_RANGE)
    if op == "minmax":
        return float(a.min()), float(a.max())
    if op == "sort":
        _view(dst, dshape)[lo:hi] = np.sort(a)
        return None
    if op == "matmul":
        bname, bshape = extra
        np.matmul(a, _view(bname, bshape), out=_view(dst, dshape)[lo:hi])
        return None
    if op == "normalize":
        lo_v, hi_v = extra
        out = _view(dst, dshape)[lo:hi]
        np.subtract(a, lo_v, out=out)
        out /= hi_v - lo_v
        return None
    if op == "spectrum":
        _view(dst, dshape)[lo:hi] = spectrum(a)
        return None
    raise ValueError(op)


def _seed_warm(_: int) -> int:
    os.environ["OMP_NUM_THREADS"] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    time.sleep(0.05)
    return os.getpid()


class SeedPool:
    def __init__(self) -> None:
        self.pool = ProcessPoolExecutor(CORES)
        list(self.pool.map(_seed_warm, range(2 * CORES)))
        self.segments: list[shared_memory.SharedMemory] = []

    def pids(self) -> list[int]:
        return [os.getpid(), *list(self.pool._processes or {})]

    def segment(self, arr: np.ndarray | None, shape: tuple[int, ...]) -> shared_memory.SharedMemory:
        size = max(8, int(np.prod(shape)) * 8)
        shm = shared_memory.SharedMemory(create=True, size=size)
        if arr is not None:
            np.ndarray(shape, dtype=np.float64, buffer=shm.buf)[...] = arr
        self.segments.append(shm)
        return shm

    def free(self, shm: shared_memory.SharedMemory) -> None:
        list(self.pool.map(_forget, [shm.name] * (2 * CORES)))
        shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
        if shm in self.segments:
            self.segments.remove(shm)

    def map(
        self, op: str, src: shared_memory.SharedMemory, shape: tuple[int, ...], **kw: Any
    ) -> list:
        futures = [self.pool.submit(seed_task, op, src.name, shape, lo, hi, **kw)
                   for lo, hi in bounds(shape[0])]  # fmt: skip
        return [f.result() for f in futures]

    def into(
        self,
        op: str,
        src: shared_memory.SharedMemory,
        shape: tuple[int, ...],
        dshape: tuple[int, ...],
        extra: Any = None,
    ) -> tuple[shared_memory.SharedMemory, np.ndarray]:
        dst = self.segment(None, dshape)
        self.map(op, src, shape, dst=dst.name, dshape=dshape, extra=extra)
        return dst, np.ndarray(dshape, dtype=np.float64, buffer=dst.buf)

    def close(self) -> None:
        for shm in list(self.segments):
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
        self.pool.shutdown()


def run_seed(b: Bench, datas: list[Data], mm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    sp = SeedPool()
    try:
        for d in datas:
            src = sp.segment(d.a, d.a.shape)
            shape, mshape = d.a.shape, d.m.shape
            sshape = (mshape[0], ROW // 2 + 1)

            def release(value: Any) -> None:
                if isinstance(value, tuple) and isinstance(value[0], shared_memory.SharedMemory):
                    sp.free(value[0])

            def sort() -> Any:
                dst, out = sp.into("sort", src, shape, shape)
                merged = merge_sorted(out)
                sp.free(dst)
                return merged

            def pipeline() -> np.ndarray:
                mins = sp.map("minmax", src, mshape)
                lo, hi = min(x[0] for x in mins), max(x[1] for x in mins)
                norm, _ = sp.into("normalize", src, mshape, mshape, (lo, hi))
                spec, _ = sp.into("spectrum", norm, mshape, sshape)
                sp.free(norm)
                counts = sum(sp.map("histogram", spec, sshape, extra=SPEC_RANGE))
                sp.free(spec)
                return counts

            work: dict[str, Callable[[], Any]] = {
                "elementwise": lambda: sp.into("elementwise", src, shape, shape),
                "sum": lambda: sum(sp.map("sum", src, shape)),
                "std": lambda: combine_std(sp.map("std", src, shape)),
                "histogram": lambda: sum(sp.map("histogram", src, shape)),
                "sort": sort,
                "pipeline": pipeline,
            }
            for w, fn in work.items():
                check = checker(w, d, None)
                wrapped = check
                if w == "elementwise":
                    wrapped = lambda v, c=check: c(v[1])  # noqa: E731
                b.run("seed", w, d.label, fn, wrapped, sp.pids, after=release)
            sp.free(src)
        sa, sb = sp.segment(mm[0], mm[0].shape), sp.segment(mm[1], mm[1].shape)
        b.run(
            "seed", "matmul", MM[0],
            lambda: sp.into("matmul", sa, mm[0].shape, mm[2].shape, (sb.name, mm[1].shape)),
            lambda v: checker("matmul", None, mm)(v[1]), sp.pids,
            after=lambda v: sp.free(v[0]),
        )  # fmt: skip
        sp.free(sa)
        sp.free(sb)
    finally:
        sp.close()


# --- joblib ----------------------------------------------------------------------------------


def _jl_elementwise(a: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    elementwise_into(a[lo:hi], out[lo:hi])


def _jl_reduce(op: str, a: np.ndarray, lo: int, hi: int, extra: Any = None) -> Any:
    s = a[lo:hi]
    if op == "sum":
        return float(s.sum())
    if op == "std":
        return moments(s)
    if op == "minmax":
        return float(s.min()), float(s.max())
    return hist(s, extra or HIST_RANGE)


def _jl_into(op: str, a: np.ndarray, out: np.ndarray, lo: int, hi: int, extra: Any = None) -> None:
    if op == "sort":
        out[lo:hi] = np.sort(a[lo:hi])
    elif op == "matmul":
        np.matmul(a[lo:hi], extra, out=out[lo:hi])
    elif op == "normalize":
        np.subtract(a[lo:hi], extra[0], out=out[lo:hi])
        out[lo:hi] /= extra[1] - extra[0]
    elif op == "spectrum":
        out[lo:hi] = spectrum(a[lo:hi])


def run_joblib(b: Bench, datas: list[Data], mm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    import joblib
    from joblib import Parallel, delayed

    folder = tempfile.mkdtemp(prefix="bench_parallel_joblib_", dir="/dev/shm")
    counter = [0]

    def memmap(shape: tuple[int, ...]) -> np.memmap:
        counter[0] += 1
        path = os.path.join(folder, f"out{counter[0]}.mmap")
        return np.memmap(path, dtype=np.float64, shape=shape, mode="w+")

    def drop(value: Any) -> None:
        if isinstance(value, np.memmap):
            name = value.filename
            del value
            with contextlib.suppress(OSError, TypeError):
                os.unlink(name)  # type: ignore[arg-type]

    try:
        with Parallel(n_jobs=CORES) as par:
            par(delayed(os.getpid)() for _ in range(2 * CORES))  # start the workers
            for d in datas:
                a, m = d.a, d.m
                sshape = (m.shape[0], ROW // 2 + 1)

                def ew() -> np.memmap:
                    out = memmap(a.shape)
                    par(delayed(_jl_elementwise)(a, out, lo, hi) for lo, hi in bounds(a.size))
                    return out

                def red(op: str) -> list:
                    return par(delayed(_jl_reduce)(op, a, lo, hi) for lo, hi in bounds(a.size))

                def sort() -> np.ndarray:
                    out = memmap(a.shape)
                    par(delayed(_jl_into)("sort", a, out, lo, hi) for lo, hi in bounds(a.size))
                    merged = merge_sorted(out)
                    drop(out)
                    return merged

                def pipeline() -> np.ndarray:
                    rows = bounds(m.shape[0])
                    mins = par(delayed(_jl_reduce)("minmax", m, lo, hi) for lo, hi in rows)
                    ext = (min(x[0] for x in mins), max(x[1] for x in mins))
                    norm = memmap(m.shape)
                    par(delayed(_jl_into)("normalize", m, norm, lo, hi, ext) for lo, hi in rows)
                    spec = memmap(sshape)
                    par(delayed(_jl_into)("spectrum", norm, spec, lo, hi) for lo, hi in rows)
                    counts = sum(
                        par(
                            delayed(_jl_reduce)("hist", spec, lo, hi, SPEC_RANGE) for lo, hi in rows
                        )
                    )
                    drop(norm)
                    drop(spec)
                    return counts

                work: dict[str, Callable[[], Any]] = {
                    "elementwise": ew,
                    "sum": lambda: sum(red("sum")),
                    "std": lambda: combine_std(red("std")),
                    "histogram": lambda: sum(red("hist")),
                    "sort": sort,
                    "pipeline": pipeline,
                }
                for w, fn in work.items():
                    b.run("joblib", w, d.label, fn, checker(w, d, None), after=drop)

            def matmul() -> np.memmap:
                out = memmap(mm[2].shape)
                par(delayed(_jl_into)("matmul", mm[0], out, lo, hi, mm[1])
                    for lo, hi in bounds(mm[0].shape[0]))  # fmt: skip
                return out

            b.run("joblib", "matmul", MM[0], matmul, checker("matmul", None, mm), after=drop)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(Exception):
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor().shutdown(wait=True)
    b.notes.append(
        f"joblib {joblib.__version__}: loky backend, default `max_nbytes='1M'` (inputs"
        " memmapped by joblib on every call, in its temp folder), outputs `np.memmap(...,"
        " mode='w+')` in /dev/shm."
    )


# --- Ray -------------------------------------------------------------------------------------


def run_ray(b: Bench, datas: list[Data], mm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    biggest = max(d.a.nbytes for d in datas)
    store = max(2 << 30, 5 * biggest)
    t0 = time.perf_counter()
    ray.init(num_cpus=CORES, include_dashboard=False, object_store_memory=store,
             logging_level="ERROR", log_to_driver=False)  # fmt: skip
    init_s = time.perf_counter() - t0

    @ray.remote
    def r_elementwise(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return elementwise_new(a[lo:hi])

    @ray.remote
    def r_reduce(op: str, a: np.ndarray, lo: int, hi: int, extra: Any = None) -> Any:
        return _jl_reduce(op, a, lo, hi, extra)

    @ray.remote
    def r_sort(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return np.sort(a[lo:hi])

    @ray.remote
    def r_matmul(a: np.ndarray, bm: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return a[lo:hi] @ bm

    @ray.remote
    def r_norm_spec(m: np.ndarray, lo: int, hi: int, *mins: tuple[float, float]) -> np.ndarray:
        ext = (min(x[0] for x in mins), max(x[1] for x in mins))
        return spectrum((m[lo:hi] - ext[0]) / (ext[1] - ext[0]))

    @ray.remote
    def r_hist(spec: np.ndarray) -> np.ndarray:
        return hist(spec, SPEC_RANGE)

    try:
        ray.get([r_reduce.remote("sum", np.zeros(8), 0, 8) for _ in range(4 * CORES)])
        for d in datas:
            ref, mref = ray.put(d.a), ray.put(d.m)
            n, rows = d.a.size, bounds(d.m.shape[0])

            def red(op: str) -> list:
                return ray.get([r_reduce.remote(op, ref, lo, hi) for lo, hi in bounds(n)])

            def pipeline() -> np.ndarray:
                mins = [r_reduce.remote("minmax", mref, lo, hi) for lo, hi in rows]
                specs = [r_norm_spec.remote(mref, lo, hi, *mins) for lo, hi in rows]
                return sum(ray.get([r_hist.remote(s) for s in specs]))

            work: dict[str, Callable[[], Any]] = {
                "elementwise": lambda: np.concatenate(
                    ray.get([r_elementwise.remote(ref, lo, hi) for lo, hi in bounds(n)])
                ),
                "sum": lambda: sum(red("sum")),
                "std": lambda: combine_std(red("std")),
                "histogram": lambda: sum(red("hist")),
                "sort": lambda: merge_sorted(
                    np.concatenate(ray.get([r_sort.remote(ref, lo, hi) for lo, hi in bounds(n)]))
                ),
                "pipeline": pipeline,
            }
            for w, fn in work.items():
                b.run("ray", w, d.label, fn, checker(w, d, None))
        refs = {"a": ray.put(mm[0]), "b": ray.put(mm[1])}
        b.run(
            "ray", "matmul", MM[0],
            lambda: np.concatenate(ray.get([r_matmul.remote(refs["a"], refs["b"], lo, hi)
                                            for lo, hi in bounds(mm[0].shape[0])])),
            checker("matmul", None, mm),
        )  # fmt: skip
        refs.clear()
    finally:
        ray.shutdown()
    b.notes.append(
        f"Ray {ray.__version__}: `ray.init(num_cpus={CORES}, object_store_memory="
        f"{store >> 30} GiB)` ({init_s:.1f} s, not counted), workers warmed, inputs `ray.put`"
        " once per array before its cases (not counted); the pipeline chains ObjectRefs"
        " (min/max tasks -> normalize+|rfft| tasks -> histogram tasks), one `ray.get`."
    )


# --- forklift --------------------------------------------------------------------------------


class ForkliftPaths:
    """The forklift rows against issue 16's HTTP contract (`parallel`, `{"job": ...}` inputs)."""

    def __init__(self, url: str, stack_pids: Callable[[], list[int]]) -> None:
        self.fl = Forklift(url)
        self.http = httpx.Client(base_url=url, timeout=600)
        self.stack_pids = stack_pids
        self.arrays: list[str] = []
        self.parts: dict[str, int] = {}  # parts of the last job of each kind (view.parts)

    def pids(self) -> list[int]:
        return [os.getpid(), *self.stack_pids()]

    def upload(self, arr: np.ndarray) -> dict:
        meta = self.fl.upload(np.ascontiguousarray(arr))
        self.arrays.append(meta["id"])
        return meta

    def wait(self, job_id: str) -> dict:
        view = self.fl.wait(job_id)
        if view["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {view['status']}: {view.get('error')}")
        return view

    def job(self, task: str, inputs: dict[str, str], params: dict | None = None,
            parallel: int | str = 1) -> dict:  # fmt: skip
        body: dict[str, Any] = {
            "task": task,
            "params": params or {},
            "inputs": {k: {"array": v} for k, v in inputs.items()},
        }
        if parallel != 1:
            body["parallel"] = parallel
        resp = self.http.post("/jobs", json=body)
        if resp.status_code != 202:
            raise RuntimeError(f"POST /jobs {resp.status_code}: {resp.text[:300]}")
        view = self.wait(resp.json()["id"])
        self.parts[f"{task} parallel={parallel}"] = (view.get("parts") or {}).get("total", 1)
        return view

    def pipeline_batch(self, matrix: str, parallel: int | str) -> dict:
        first: dict[str, Any] = {"task": "normalize", "inputs": {"a": {"array": matrix}}}
        steps = [
            first,
            {"task": "fft", "inputs": {"a": {"job": "#0"}},
             "params": {"axis": -1, "mode": "magnitude", "real": True}},
            {"task": "histogram", "inputs": {"a": {"job": "#1"}},
             "params": {"bins": BINS, "range": list(SPEC_RANGE)}},
        ]  # fmt: skip
        if parallel != 1:
            for s in steps:
                s["parallel"] = parallel
        resp = self.http.post("/jobs/batch", json={"jobs": steps})
        if resp.status_code != 202:
            raise RuntimeError(f"POST /jobs/batch {resp.status_code}: {resp.text[:300]}")
        ids = [j["id"] for j in resp.json()["jobs"]]
        last = self.wait(ids[-1])
        for jid in ids[:-1]:
            view = self.wait(jid)
            self._drop_result(view)
        return last

    def pipeline_steps(self, matrix: str) -> dict:
        norm = self.job("normalize", {"a": matrix})
        spec = self.job("fft", {"a": norm["result"]["array"]["id"]},
                        {"axis": -1, "mode": "magnitude", "real": True})  # fmt: skip
        self._drop_result(norm)
        last = self.job("histogram", {"a": spec["result"]["array"]["id"]},
                        {"bins": BINS, "range": list(SPEC_RANGE)})  # fmt: skip
        self._drop_result(spec)
        return last

    def _drop_result(self, view: dict) -> None:
        """Delete the job's array results (`{"array": meta}`, also inside a dict result)."""
        result = view.get("result")
        if not isinstance(result, dict):
            return
        for item in [result, *result.values()]:
            if isinstance(item, dict) and isinstance(item.get("array"), dict):
                self.fl.delete_array(item["array"]["id"])

    @staticmethod
    def value(view: dict) -> Any:
        """The job's result: an array result attached read-only (same host, no copy)."""
        from shared.arrays.segments import attach_segment, ndarray_view

        result = view["result"]
        if isinstance(result, dict) and "counts" in result:  # a histogram: its counts
            result = result["counts"]
        if isinstance(result, dict) and "array" in result:
            meta = result["array"]
            seg = attach_segment(meta["segment"], meta["nbytes"])
            arr = ndarray_view(seg, np.dtype(meta["dtype"]), tuple(meta["shape"]), meta["order"])
            return arr.copy() if arr.size <= 4096 else _Attached(arr, seg)
        if isinstance(result, list):
            return np.asarray(result)
        return result

    def close(self) -> None:
        for aid in self.arrays:
            with contextlib.suppress(Exception):
                self.fl.delete_array(aid)
        self.http.close()
        self.fl.close()


class _Attached(np.ndarray):
    """An array view that keeps its segment mapped while the check reads it."""

    def __new__(cls, arr: np.ndarray, seg: Any) -> _Attached:
        obj = arr.view(cls)
        obj._seg = seg  # type: ignore[attr-defined]
        return obj


def run_forklift(b: Bench, datas: list[Data], mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                 modes: list[str]) -> None:  # fmt: skip
    with running_stack(concurrency=CORES) as st:
        fp = ForkliftPaths(st.url, lambda: [*tree(st.api.pid), *tree(st.worker.pid),
                                            st.redis_proc.pid])  # fmt: skip
        tasks = httpx.get(f"{st.url}/tasks/elementwise", timeout=30).json()
        b.notes.append(
            f"forklift: `GET /tasks/elementwise` says splittable={tasks.get('splittable')}."
        )
        try:
            for d in datas:
                one, mat = fp.upload(d.a)["id"], fp.upload(d.m)["id"]
                simple = {
                    "elementwise": ("elementwise", {}),
                    "sum": ("sum", {}),
                    "std": ("std", {}),
                    "histogram": ("histogram", {"bins": BINS, "range": list(HIST_RANGE)}),
                    "sort": ("sort", {}),
                }
                check_pipe = checker("pipeline", d, None)
                for mode in modes:
                    par: int | str = "auto" if mode == "forklift-auto" else 1
                    for w, (task, params) in simple.items():
                        check = checker(w, d, None)
                        b.run(
                            mode, w, d.label,
                            lambda t=task, p=params, q=par: fp.job(t, {"a": one}, p, q),
                            lambda v, c=check: c(fp.value(v)),
                            fp.pids, after=fp._drop_result,
                        )  # fmt: skip
                    b.run(
                        mode,
                        "pipeline",
                        d.label,
                        lambda q=par: fp.pipeline_batch(mat, q),
                        lambda v: check_pipe(fp.value(v)),
                        fp.pids,
                        after=fp._drop_result,
                    )
                b.run(
                    "forklift-steps",
                    "pipeline",
                    d.label,
                    lambda: fp.pipeline_steps(mat),
                    lambda v: check_pipe(fp.value(v)),
                    fp.pids,
                    after=fp._drop_result,
                )
                for aid in (one, mat):
                    fp.fl.delete_array(aid)
                    fp.arrays.remove(aid)
            ia, ib = fp.upload(mm[0])["id"], fp.upload(mm[1])["id"]
            for mode in modes:
                par = "auto" if mode == "forklift-auto" else 1
                b.run(mode, "matmul", MM[0],
                      lambda q=par: fp.job("matmul", {"a": ia, "b": ib}, {}, q),
                      lambda v: checker("matmul", None, mm)(fp.value(v)), fp.pids,
                      after=fp._drop_result)  # fmt: skip
        finally:
            b.notes.append(
                "forklift parts per job (the job view's `parts.total`, last run): "
                + ", ".join(f"{k}: {v}" for k, v in fp.parts.items())
                + "."
            )
            fp.close()


# --- report ----------------------------------------------------------------------------------


def cores_cells(r: Row) -> list[str]:
    """Median cores and others' cores; '–' under 0.25 s (CPU time counts 10 ms ticks)."""
    if (r.best or 0.0) < 0.25:
        return ["–", "–"]
    return [f"{statistics.median(r.cores):.2f}", f"{statistics.median(r.others):.2f}"]


def report(b: Bench, sizes: list[str], quick: bool) -> str:
    lines = [
        "# bench/parallel.py: one big array, every core",
        "",
        machine_info(),
        "",
        f"Command: `python -m bench.parallel{' --quick' if quick else ''} --repeat {b.repeat}`."
        " Each run starts once the machine is idle (under 0.1 busy cores, up to 5 s)."
        " Wall time: best of the timed runs (range min–max); each case runs once more before"
        " them, untimed in those columns: the first run (cold: fresh pages, first attaches)"
        " and the only one whose memory is sampled (`first run`; sampling /proc/<pid>/smaps"
        " of processes that map GiBs costs a core's worth of kernel time and slowed parallel"
        " paths by up to 40% when it shared the timed runs). Speedup: over one forklift job of the"
        " same work (and over NumPy on one thread). Cores: CPU seconds of every process of"
        " the path / wall (others' = the rest of the machine meanwhile, a noise gauge)."
        " Memory: peak private growth (MAP_PRIVATE Private_Clean+Private_Dirty, shmem excluded)"
        " of the driver, of the largest other process, summed over the other processes; and"
        " /dev/shm growth (whole machine).",
        "",
    ]
    headers = ["work", "size", "path", "wall (best)", "range", "first run", "× 1 forklift job",
               "× NumPy 1 thread", "cores", "others'", "driver +priv", "largest other +priv",
               "others Σ +priv", "/dev/shm +"]  # fmt: skip
    rows: list[list[object]] = []
    for w in WORKLOADS:
        for size in [MM[0]] if w == "matmul" else sizes:
            base = b.rows.get(("forklift", w, size))
            npy = b.rows.get(("numpy", w, size))
            for p in PATHS:
                r = b.rows.get((p, w, size))
                if r is None:
                    continue
                if r.error:
                    rows.append([w, size, LABELS[p], f"fails: {r.error}", *[""] * 10])
                    continue
                best = r.best or float("nan")
                sp1 = f"{base.best / best:.2f}×" if base and base.best else "–"
                sp2 = f"{npy.best / best:.2f}×" if npy and npy.best else "–"
                mem = r.mem or {}
                rows.append([
                    w, size, LABELS[p], fmt_s(best),
                    f"{fmt_s(min(r.runs))}–{fmt_s(max(r.runs))}",
                    fmt_s(r.first) if r.first is not None else "–", sp1, sp2,
                    *cores_cells(r),
                    fmt_bytes(mem.get("driver")), fmt_bytes(mem.get("other_max")),
                    fmt_bytes(mem.get("other_sum")), fmt_bytes(mem.get("shm")),
                ])  # fmt: skip
    lines.append(md_table(headers, rows, "lll" + "r" * 11))
    lines += ["", "Notes:", ""] + [f"- {n}" for n in b.notes]
    return "\n".join(lines)


def plot(b: Bench, sizes: list[str], quick: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(w, s) for w in WORKLOADS for s in ([MM[0]] if w == "matmul" else sizes)]
    paths = [p for p in PATHS if any((p, w, s) in b.rows for w, s in groups)]
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(groups)), 5.5))
    width = 0.8 / max(1, len(paths))
    for i, p in enumerate(paths):
        xs, ys = [], []
        for j, (w, s) in enumerate(groups):
            r = b.rows.get((p, w, s))
            if r and r.best:
                xs.append(j + i * width)
                ys.append(r.best)
        ax.bar(xs, ys, width, label=LABELS[p])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{w}\n{s}" for w, s in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("wall time, best of runs (s, log)")
    ax.set_title(f"one array over {CORES} cores: wall time per path (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = results_dir(quick) / "parallel.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 MiB and 1000², one repeat")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--only", default="", help="comma list: forklift,numpy,dask,seed,joblib,ray")
    ap.add_argument("--no-forklift", action="store_true")
    args = ap.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    sizes_b = [32 * MIB] if args.quick else [256 * MIB, 1024 * MIB]
    n = 1000 if args.quick else 4000
    MM[0] = f"{n}²"
    only = set(filter(None, args.only.split(","))) or {
        "numpy", "dask", "seed", "joblib", "ray", "forklift"}  # fmt: skip
    if args.no_forklift:
        only.discard("forklift")
    b = Bench(repeat)
    print(machine_info(), flush=True)
    rng = np.random.default_rng(16)
    base = rng.standard_normal(max(sizes_b) // 8)
    sizes = [fmt_bytes(s) for s in sizes_b]
    datas = [make_data(base, s, label) for s, label in zip(sizes_b, sizes, strict=True)]
    ma, mb = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    with threadpool(CORES):
        mm = (ma, mb, ma @ mb)
    runners: list[tuple[str, Callable[[], None]]] = [
        ("numpy", lambda: run_numpy(b, datas, mm)),
        ("dask", lambda: run_dask(b, datas, mm)),
        ("seed", lambda: run_seed(b, datas, mm)),
        ("joblib", lambda: run_joblib(b, datas, mm)),
        ("ray", lambda: run_ray(b, datas, mm)),
        ("forklift", lambda: run_forklift(b, datas, mm, ["forklift", "forklift-auto"])),
    ]
    try:
        for name, fn in runners:
            if name not in only:
                continue
            print(f"--- {name}", flush=True)
            try:
                fn()
            except Exception as exc:
                traceback.print_exc()
                b.notes.append(f"{name} stopped: {type(exc).__name__}: {exc}"[:300])
    finally:
        b.meter.close()
    if "seed" in only:
        b.notes.append(
            "The seed's pool: `ProcessPoolExecutor` children warmed and BLAS-pinned to 1 thread;"
            " per-child attachments kept by segment name; each output a new"
            " `SharedMemory(create=True)` (allocation and page faults timed)."
        )
    b.notes.append(
        "Every path runs bench/jobs.py's `elementwise_into` kernel (8 MiB blocks, ufunc `out=`),"
        " the in-process row too; parallel sorts of the peers merge their sorted slices in"
        " the driver with one stable sort (timsort merges the runs)."
    )
    text = report(b, sizes, args.quick)
    path = write_results("parallel", text, args.quick)
    png = plot(b, sizes, args.quick)
    print(text)
    print(f"\nwrote {path} and {png}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

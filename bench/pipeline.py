"""The three-step pipeline as one batch against the same steps chained by the client.

    python -m bench.pipeline [--mib 256 1024] [--repeat 5]

normalize (min-max) -> |rfft| along the last axis -> histogram of the spectrum, on a float64
array of (n / 4096, 4096). The batch is one `POST /jobs/batch` with `{"job": "#i"}` inputs;
the chained run submits each step once the one before has ended and gives it the result's id.
From the job records: `steps` = the sum of the three jobs' run times (finished - started),
`gaps` = the time between a step's end and the next one's start (the launch of a waiting job,
or the client's round trip), `wall` = the first job's creation to the last one's end. The
target (issue 16): batch wall within 1.1x of its steps. Prints a table (markdown).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import numpy as np

from bench.common import Forklift, md_table, others_busy, running_stack

ROW = 4096
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("normalize", {}),
    ("fft", {"axis": -1, "mode": "magnitude", "real": True}),
    ("histogram", {"bins": 64}),
]


def _wait(fl: Forklift, job_id: str) -> dict:
    while True:
        view = fl.http.get(f"/jobs/{job_id}", params={"wait": 30}).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            if view["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {view['status']}: {view.get('error')}")
            return view


def _drop(fl: Forklift, views: list[dict]) -> None:
    for view in views:
        result = view["result"]
        for item in (result, *(result.values() if isinstance(result, dict) else ())):
            if isinstance(item, dict) and isinstance(item.get("array"), dict):
                fl.http.delete(f"/arrays/{item['array']['id']}")


def batch(fl: Forklift, array_id: str) -> list[dict]:
    jobs = []
    for i, (task, params) in enumerate(STEPS):
        source = {"array": array_id} if i == 0 else {"job": f"#{i - 1}"}
        jobs.append({"task": task, "params": params, "inputs": {"a": source}})
    response = fl.http.post("/jobs/batch", json={"jobs": jobs})
    response.raise_for_status()
    ids = [j["id"] for j in response.json()["jobs"]]
    _wait(fl, ids[-1])
    return [_wait(fl, job_id) for job_id in ids]


def chained(fl: Forklift, array_id: str) -> list[dict]:
    views, source = [], array_id
    for task, params in STEPS:
        body = {"task": task, "params": params, "inputs": {"a": {"array": source}}}
        response = fl.http.post("/jobs", json=body)
        response.raise_for_status()
        views.append(_wait(fl, response.json()["id"]))
        source = (views[-1]["result"].get("array") or {}).get("id", "")
    return views


def figures(views: list[dict]) -> tuple[float, float, float]:
    """(wall, sum of the steps' run times, sum of the gaps between steps), seconds."""
    steps = sum(v["finished_at"] - v["started_at"] for v in views)
    gaps = sum(b["started_at"] - a["finished_at"] for a, b in itertools.pairwise(views))
    return views[-1]["finished_at"] - views[0]["created_at"], steps, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows: list[list[object]] = []
    with running_stack() as st:
        fl = Forklift(st.url)
        try:
            for mib in args.mib:
                n = mib * (1 << 20) // 8
                data = np.random.default_rng(0).standard_normal((n // ROW, ROW))
                array_id = fl.upload(data)["id"]
                del data
                _drop(fl, chained(fl, array_id))  # warm: the segment pool, the children
                got: dict[str, list[tuple[float, float, float]]] = {"batch": [], "chained": []}
                busy = []
                for _ in range(args.repeat):
                    for name, run in (("batch", batch), ("chained", chained)):
                        views = run(fl, array_id)
                        got[name].append(figures(views))
                        _drop(fl, views)
                    busy.append(others_busy(0.5, ignore=[st.api.pid, st.worker.pid]))
                for name, runs in got.items():
                    ratios = [wall / steps for wall, steps, _ in runs]
                    rows.append([
                        f"{mib} MiB", name,
                        f"{statistics.median(w for w, _, _ in runs):.3f}",
                        f"{statistics.median(s for _, s, _ in runs):.3f}",
                        f"{1000 * statistics.median(g for _, _, g in runs):.1f}",
                        f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
                        f"{max(busy):.2f}",
                    ])  # fmt: skip
                fl.http.delete(f"/arrays/{array_id}")
        finally:
            fl.close()
    headers = ["array", "run", "wall s", "steps s", "gaps ms", "wall/steps (range)"]
    headers.append("others' cores")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {args.repeat} runs each, medians")
    print(md_table(headers, rows))


if __name__ == "__main__":
    main()

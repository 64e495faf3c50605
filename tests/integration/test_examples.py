"""The examples the docs show, run for real.

- `docs/examples/seed_service.py`, the seed's FastAPI app with its CPU work handed to forklift,
  under a real uvicorn against the session's stack: its loop answers while a worker computes.
- `docs/examples/myjobs/stats.py`, the job module of docs/jobs.md: loaded by a stack of its own
  through `FORKLIFT_JOB_MODULES` (as the Docker image loads a mounted one), and tested as plain
  functions by `docs/examples/test_stats.py`, the test docs/jobs.md shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from forklift import Client, InvalidRequest
from shared.keys import Keys
from tests import stack
from tests.conftest import Stack

EXAMPLES = stack.REPO / "docs" / "examples"
FIB_N, FIB_VALUE = 34, 5702887  # a few hundred ms of one core: long beside a ping


@contextlib.contextmanager
def serving(app: str, env: dict[str, str]) -> Iterator[str]:
    """`uvicorn --app-dir docs/examples <app>` on a spare port; stopped by its pid, checked gone."""
    port = stack.free_port()
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), app, "--host",
            "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = stack.spawn(f"example-{port}", argv, env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{app} exited early:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        stack.wait_until(up, 30, interval=0.1, what=app)
        yield url
    finally:
        proc.stop()
    assert not [pid for pid in proc.pids if stack.pid_alive(pid)], proc.log()[-3000:]


@dataclass
class Seen:
    order: list[str] = field(default_factory=list)  # "health" / "fib", as the answers came
    pinged_at: list[float] = field(default_factory=list)  # wall clock of each /health answer
    pings: list[object] = field(default_factory=list)
    new_jobs: list[str] = field(default_factory=list)
    answer: object = None
    view: dict[str, Any] = field(default_factory=dict)  # the job's final view, from the stack


def job_ids(live: Stack, index: str) -> set[str]:
    return {str(job_id) for job_id in live.redis.zrange(index, 0, -1)}


async def cpu_request_and_pings(service: str, live: Stack) -> Seen:
    """GET /fib/N; once the job it handed to forklift is running on a worker, three
    GET /health; then the job's view, whose start and end bracket the pings if the
    service's loop was free."""
    seen = Seen()
    jobs_index = Keys(live.key_prefix).jobs  # every job id of the stack, by creation
    before = job_ids(live, jobs_index)
    deadline = time.monotonic() + 60  # a guard against hanging, not a measure
    async with (
        httpx.AsyncClient(base_url=service, timeout=120) as http,
        httpx.AsyncClient(base_url=live.url, timeout=30) as api,
    ):
        cpu = asyncio.create_task(http.get(f"/fib/{FIB_N}"))
        cpu.add_done_callback(lambda _: seen.order.append("fib"))
        status = ""
        while status != "running" and not cpu.done():
            assert time.monotonic() < deadline, f"no running job (new jobs: {seen.new_jobs})"
            await asyncio.sleep(0.02)
            seen.new_jobs = sorted(job_ids(live, jobs_index) - before)
            if len(seen.new_jobs) == 1:
                status = (await api.get(f"/jobs/{seen.new_jobs[0]}")).json()["status"]
        for _ in range(3):
            seen.pings.append((await http.get("/health")).json())
            seen.pinged_at.append(time.time())
            seen.order.append("health")
        seen.answer = (await cpu).json()
        if len(seen.new_jobs) == 1:
            seen.view = (await api.get(f"/jobs/{seen.new_jobs[0]}")).json()
    return seen


def test_seed_service_answers_while_forklift_computes(live: Stack) -> None:
    """The seed's `async def` endpoint, solved: while the job its CPU request handed to
    forklift runs on a worker, the same app answers other requests, and the CPU answer
    comes after them, with the value the worker computed."""
    before = stack.segments(live.shm_prefix)
    with serving("seed_service:app", {**live.env, "FORKLIFT_URL": live.url}) as service:
        seen = asyncio.run(cpu_request_and_pings(service, live))
    assert seen.answer == {"n": FIB_N, "fib": FIB_VALUE}
    assert len(seen.new_jobs) == 1, "the endpoint did not hand its work to forklift"
    view = seen.view
    assert (view["task"], view["params"], view["status"]) == ("fib", {"n": FIB_N}, "succeeded")
    assert view["result"] == FIB_VALUE
    assert seen.pings == [{"ok": True}] * 3
    assert seen.order == ["health", "health", "health", "fib"], "the loop was blocked"
    assert view["started_at"] < min(seen.pinged_at), "pinged before the job ran"
    assert max(seen.pinged_at) < view["finished_at"], "the pings waited for the job to end"
    assert stack.segments(live.shm_prefix) == before


@pytest.fixture(scope="module")
def examples_stack(redis_url: str) -> Iterator[str]:
    """A stack whose API and worker load the example job module, found on PYTHONPATH like a
    module mounted under /app in the Docker image."""
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH")) if p)
    env = stack.stack_env(redis_url, FORKLIFT_JOB_MODULES="myjobs.stats", PYTHONPATH=path)
    before = stack.segments(env["FORKLIFT_SHM_PREFIX"])
    worker, api, url = stack.start_worker_and_api(env, "examples", concurrency=1)
    try:
        yield url
    finally:
        api.stop()
        worker.stop()
    assert not [p for p in api.pids | worker.pids if stack.pid_alive(p)]
    assert stack.segments(env["FORKLIFT_SHM_PREFIX"]) == before


def test_example_jobs_run_on_a_stack(examples_stack: str) -> None:
    with Client(examples_stack, free_on_close=True) as fl:
        spec = fl.task("pairwise_distances")
        assert spec.inputs["x"]["ndim"] == 2 and spec.doc.startswith("Distances between")
        points = np.array([[0.0, 0.0], [3.0, 4.0]])
        distances = fl.submit("pairwise_distances", x=points).result(timeout=60)
        assert distances.tolist() == [[0.0, 5.0], [5.0, 0.0]]
        stats = fl.submit("describe", a=np.array([1.0, np.nan, 3.0]), ddof=1).result(timeout=60)
        assert stats == {"count": 2, "nan": 1, "mean": 2.0, "std": math.sqrt(2), "min": 1.0,
                         "max": 3.0}  # fmt: skip
        empty = fl.submit("describe", a=np.zeros(0)).result(timeout=60)
        nothing = dict.fromkeys(("mean", "std", "min", "max"), "nan")  # NaN, spelled in JSON
        assert empty == {"count": 0, "nan": 0, **nothing}
        with pytest.raises(InvalidRequest, match="same number of columns"):
            fl.submit("pairwise_distances", x=points, y=np.zeros((3, 5)))
        with pytest.raises(InvalidRequest, match="metric"):
            fl.submit("pairwise_distances", x=points, metric="cosine")


def test_the_job_test_docs_jobs_md_shows_passes() -> None:
    argv = [sys.executable, "-m", "pytest", str(EXAMPLES / "test_stats.py"), "-q", "-p",
            "no:cacheprovider"]  # fmt: skip
    result = subprocess.run(argv, cwd=stack.REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout, result.stdout

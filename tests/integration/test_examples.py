"""The examples the docs show, run for real.

- `docs/examples/seed_service.py`, the seed's FastAPI app with its CPU work handed to forklift,
  under a real uvicorn against the session's stack: its loop answers while a worker computes.
- `docs/examples/myjobs/stats.py`, the job module of docs/jobs.md, through the tests that page
  shows: called as plain functions (`test_stats.py`), and loaded through `FORKLIFT_JOB_MODULES`
  by a stack of its own (`test_stats_on_a_stack.py`).
- `docs/examples/myjobs/signals.py`, the splittable jobs of docs/jobs.md ("Running a job as
  parts"): their splits against the plain functions (`test_signals.py`), and `parallel=2` on a
  stack of its own against one job (`test_signals_on_a_stack.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from shared.keys import Keys
from tests import stack
from tests.conftest import Stack

EXAMPLES = stack.REPO / "docs" / "examples"
FIB_N, FIB_VALUE = 34, 5702887  # a few hundred ms of one core: long beside a ping


@contextlib.contextmanager
def serving(app: str, env: dict[str, str]) -> Iterator[str]:
    """`uvicorn --app-dir docs/examples <app>` on a spare port, once its /health answers;
    stopped by its pid, checked gone."""
    proc, url = stack.start_app(app, env, app_dir=EXAMPLES, label="example")
    try:
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


def test_the_job_tests_docs_jobs_md_shows_pass() -> None:
    """docs/examples/test_stats.py (the job called as a function) and
    test_stats_on_a_stack.py (the module loaded by `forklift.testing.running_stack`, its own
    redis-server, worker and API, stopped and checked for leaks by the fixture)."""
    argv = [sys.executable, "-m", "pytest", str(EXAMPLES), "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(argv, cwd=stack.REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "37 passed" in result.stdout, result.stdout

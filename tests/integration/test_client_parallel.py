"""The client's `parallel=`, job handles as inputs and batch pipelines, on the real stack.

Each client test runs twice (the generated `Client` and the hand-written `AsyncClient`
behind tests/clients.py's facade). The bodies the clients build are pinned without a server
in tests/unit/test_client_parallel_bodies.py; here the API answers them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from forklift import Client, InvalidRequest, JobFailed, JobInput, JobStatus
from tests import stack
from tests.clients import KINDS, on_http, open_client
from tests.conftest import Stack


@pytest.fixture(autouse=True)
def no_leftovers(live: Stack) -> Iterator[None]:
    """Every test frees what it made (inputs go with their jobs; results it fetched, and
    those of intermediate steps it asked for as handles, go with the client)."""
    before = stack.array_segments(live.shm_prefix)
    yield
    stack.wait_arrays_freed(live.shm_prefix, before)


@pytest.fixture(params=KINDS)
def client(live: Stack, request: pytest.FixtureRequest) -> Iterator[Client]:
    with open_client(str(request.param), live.url, free_on_close=True, timeout=30) as fl:
        yield fl


def requests_made(client: Client) -> tuple[list[str], Any]:
    """`METHOD path` of every request the client sends from now on; the hook's remover."""
    seen: list[str] = []
    remove = on_http(client, "request", lambda r: seen.append(f"{r.method} {r.url.path}"))
    return seen, remove


# -- parallel ------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [2, "auto"])
def test_parallel_matmul_equals_numpy_and_shows_its_parts(
    client: Client, parallel: int | str
) -> None:
    rng = np.random.default_rng(16)
    x, y = rng.random((301, 64)), rng.random((64, 33))  # 301 rows: 2 does not divide them
    job = client.submit("matmul", a=x, b=y, parallel=parallel)
    result = job.result(timeout=120)
    assert isinstance(result, np.ndarray) and result.shape == (301, 33)
    assert np.allclose(result, x @ y)
    view = job.status()
    assert view.status == JobStatus.succeeded
    if parallel == 2:
        assert view.parts is not None
        assert (view.parts.total, view.parts.done, view.parts.failed) == (2, 2, 0)
        assert len(view.parts.ids) == 2
        for part_id in view.parts.ids:
            assert client.job(part_id).status().parent == job.id


def test_parallel_on_a_task_that_does_not_split(client: Client) -> None:
    with pytest.raises(InvalidRequest) as refused:
        client.submit("fib", n=10, parallel=2)
    assert refused.value.status == 422 and refused.value.code == "not_splittable"
    job = client.submit("fib", n=10, parallel="auto")  # auto never refuses: one part
    assert job.result(timeout=60) == 55


# -- jobs that feed jobs -------------------------------------------------------------------


def test_a_job_handle_feeds_the_next_job_before_it_has_finished(client: Client) -> None:
    x = np.arange(1000, dtype=np.float64)
    upstream = client.submit("slow_copy", a=x, seconds=1.5)
    try:
        downstream = client.submit("sum", a=upstream)
        first = downstream.view
        assert first is not None and first.status == JobStatus.waiting
        assert first.upstream == {"a": JobInput(job=upstream.id, key=None)}
        assert not upstream.done()  # the handle went in while its job was still running
        assert downstream.result(timeout=60) == x.sum()
        up_view, down_view = upstream.status(), downstream.status()
        assert down_view.started_at is not None and up_view.finished_at is not None
        assert down_view.started_at >= up_view.finished_at
    finally:
        upstream.result(timeout=60, download=False)  # its result array: freed on close


def test_output_names_one_array_of_a_dict_result(client: Client) -> None:
    x = np.random.default_rng(3).standard_normal(5001)
    hist = client.submit("histogram", a=x, bins=7)
    try:
        total = client.submit("sum", a=hist.output("counts"))
        assert total.result(timeout=60) == 5001
    finally:
        result = hist.result(timeout=60)  # its arrays fetched: freed on close
    counts, _ = np.histogram(x, bins=7)
    assert result["counts"].tolist() == counts.tolist()


def test_the_failure_of_an_upstream_fails_the_job_that_waits_for_it(client: Client) -> None:
    with client.batch() as batch:
        failing = batch.submit("boom", message="upstream broke")
        downstream = batch.submit("sum", a=failing)
    with pytest.raises(JobFailed):
        downstream.result(timeout=60)
    view = downstream.status()
    assert view.status == JobStatus.failed and view.upstream_failed == failing.id
    with pytest.raises(JobFailed, match="upstream broke"):
        failing.result(timeout=0)


# -- a pipeline in one request --------------------------------------------------------------


def test_a_pipeline_in_one_batch_equals_its_steps_run_one_after_the_other(
    client: Client,
) -> None:
    x = np.random.default_rng(7).standard_normal((64, 257))
    steps = client.submit("normalize", a=x, method="zscore").result(timeout=60, download=False)
    steps = client.submit("fft", a=steps, mode="magnitude").result(timeout=60, download=False)
    expected = client.submit("histogram", a=steps, bins=16).result(timeout=60)

    seen, remove = requests_made(client)
    with client.batch() as batch:
        normal = batch.submit("normalize", a=x, method="zscore")
        spectrum = batch.submit("fft", a=normal, mode="magnitude")
        counts = batch.submit("histogram", a=spectrum, bins=16)
    posted = [r for r in seen if r.startswith("POST /jobs")]
    assert posted == ["POST /jobs/batch"]  # the three jobs: one request
    got = counts.result(timeout=120)
    remove()
    assert got["counts"].tolist() == expected["counts"].tolist()
    assert np.array_equal(got["edges"], expected["edges"])
    # nothing of the steps between came to the client: only the last result's arrays
    downloads = [r for r in seen if r.startswith("GET /arrays") or r.endswith("/result")]
    assert len(downloads) == 2
    assert spectrum.status().upstream == {"a": JobInput(job=normal.id, key=None)}
    for step in (normal, spectrum):  # their results: the client's, freed on close
        step.result(timeout=0, download=False)


def test_map_still_sends_one_batch(client: Client) -> None:
    seen, remove = requests_made(client)
    assert client.map("fib", [{"n": n} for n in range(1, 11)]) == [
        1, 1, 2, 3, 5, 8, 13, 21, 34, 55,
    ]  # fmt: skip
    remove()
    assert next(r for r in seen if r.startswith("POST /jobs")) == "POST /jobs/batch"
    assert "POST /jobs" not in seen


# -- the command ---------------------------------------------------------------------------


def run_cli(live: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FORKLIFT_URL": live.url}
    env.pop("FORKLIFT_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "forklift", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=stack.REPO,
        timeout=120,
        check=False,
    )


def test_cli_parallel_and_a_job_as_input(live: Stack, tmp_path: Path, http: httpx.Client) -> None:
    rng = np.random.default_rng(5)
    x, y = rng.random((99, 20)), rng.random((20, 7))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "out.npy"
    done = run_cli(
        live, "submit", "matmul", f"a=@{tmp_path / 'x.npy'}", f"b=@{tmp_path / 'y.npy'}",
        "--parallel", "2", "--wait", "--json", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["parts"]["total"] == 2 and view["parts"]["done"] == 2
    assert np.allclose(np.load(out), x @ y)

    try:
        total = run_cli(live, "submit", "sum", f"a=job:{view['id']}", "--wait")
        assert total.returncode == 0, total.stderr
        assert np.isclose(float(total.stdout), (x @ y).sum())
    finally:
        assert http.delete(f"/arrays/{view['result']['array']['id']}").status_code in (202, 204)

    refused = run_cli(live, "submit", "fib", "n=5", "--parallel", "2")
    assert refused.returncode == 2 and "split" in refused.stderr.lower()

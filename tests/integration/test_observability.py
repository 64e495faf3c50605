"""Observability end to end: /metrics counts, the dashboard in headless Chromium, JSON logs.

The module runs its own stack (its own redis-server, key prefix, worker and API, logging JSON
lines), so every counter starts at zero and the figures can be checked exactly.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import stack
from tests.http_api import submit, wait

ARTIFACTS = stack.REPO / "test-artifacts"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class ObsStack:
    env: dict[str, str]
    url: str
    worker: stack.Proc
    api: stack.Proc
    domain: str


@pytest.fixture(scope="module")
def obs() -> Iterator[ObsStack]:
    redis_proc, redis_url = stack.start_redis()
    env = stack.stack_env(redis_url, FORKLIFT_LOG_FORMAT="json", FORKLIFT_JANITOR_INTERVAL="2")
    procs = [redis_proc]
    before = stack.segments(env["FORKLIFT_SHM_PREFIX"])
    try:
        worker = stack.start_worker(env, "obs", concurrency=2)
        procs.insert(0, worker)
        api, url = stack.start_api(env)
        procs.insert(0, api)
        domain = httpx.get(f"{url}/healthz", timeout=5).json()["shm_domain"]
        yield ObsStack(env=env, url=url, worker=worker, api=api, domain=domain)
    finally:
        for proc in procs:
            proc.stop()
        left = stack.segments(env["FORKLIFT_SHM_PREFIX"]) - before
        for name in left:
            (Path("/dev/shm") / name).unlink(missing_ok=True)
        assert not left, f"leaked shared-memory segments: {sorted(left)}"


@pytest.fixture
def http(obs: ObsStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=obs.url, timeout=30) as client:
        yield client


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_metrics_count_exactly_what_ran(obs: ObsStack, http: httpx.Client) -> None:
    domain = obs.domain
    base = scrape(http)
    assert value(base, "forklift_redis_up") == 1
    assert value(base, "forklift_workers_online", domain=domain) == 1
    assert value(base, "forklift_worker_slots", domain=domain) == 2

    # 5 fib succeed, 3 boom fail.
    ids = [submit(http, "fib", n=18) for _ in range(5)]
    ids += [submit(http, "boom", message="kaboom") for _ in range(3)]
    states = [wait(http, job_id)["status"] for job_id in ids]
    assert states == ["succeeded"] * 5 + ["failed"] * 3

    # Both children busy with a sleep, a third job waits in the queue and is cancelled there.
    long_jobs = [submit(http, "sleep", seconds=1.5) for _ in range(2)]
    queued = submit(http, "sleep", seconds=0.1)

    def blocked() -> Samples | None:
        now = scrape(http)
        busy = value(now, "forklift_workers_busy", domain=domain)
        depth = value(now, "forklift_queue_depth", queue=obs.env["FORKLIFT_QUEUE"])
        return now if busy == 2 and depth == 1 else None

    during = stack.wait_until(blocked, 10, interval=0.05, what="2 busy children, 1 queued job")
    domain_queue = f"{obs.env['FORKLIFT_QUEUE']}.{domain}"
    assert series(during, "forklift_queue_depth")[frozenset({("queue", domain_queue)})] == 0
    assert http.delete(f"/jobs/{queued}").status_code == 200
    assert [wait(http, job_id)["status"] for job_id in long_jobs] == ["succeeded"] * 2

    # One array up and down again.
    buffer = io.BytesIO()
    np.save(buffer, np.arange(3000, dtype=np.float64))
    body = buffer.getvalue()
    upload = http.post("/arrays", content=body, headers={"content-type": "application/x-npy"})
    assert upload.status_code == 201, upload.text
    array_id = upload.json()["id"]
    download = http.get(f"/arrays/{array_id}")
    assert download.status_code == 200 and len(download.content) == len(body)
    held = scrape(http)
    assert value(held, "forklift_shm_bytes", domain=domain) == 3000 * 8
    assert value(held, "forklift_shm_segments", domain=domain) == 1
    assert http.delete(f"/arrays/{array_id}").status_code == 204

    # The worker picks the cancelled message up and skips it; then everything is idle.
    def idle() -> Samples | None:
        now = scrape(http)
        depth = sum(series(now, "forklift_queue_depth").values())
        return (
            now if depth == 0 and value(now, "forklift_workers_busy", domain=domain) == 0 else None
        )

    after = stack.wait_until(idle, 10, interval=0.1, what="empty queues and idle workers")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(base, name, **labels)

    # Exact counts for the tasks only this test runs...
    assert value(after, "forklift_jobs_submitted_total", task="fib") == 5
    assert value(after, "forklift_jobs_submitted_total", task="boom") == 3
    fib_boom_finished = {
        labels: v
        for labels, v in series(after, "forklift_jobs_finished_total").items()
        if dict(labels)["task"] in ("fib", "boom")
    }
    assert fib_boom_finished == {
        frozenset({"task": "fib", "state": "succeeded"}.items()): 5,
        frozenset({"task": "boom", "state": "failed"}.items()): 3,
    }
    counts = series(after, "forklift_job_duration_seconds_count")
    fib_count = counts[frozenset({"task": "fib"}.items())]
    boom_count = counts[frozenset({"task": "boom"}.items())]
    assert (fib_count, boom_count) == (5, 3)
    assert fib_count + boom_count == 8
    for task, n in (("fib", 5), ("boom", 3)):
        inf = value(after, "forklift_job_duration_seconds_bucket", task=task, le="+Inf")
        assert inf == n
        assert value(after, "forklift_job_duration_seconds_sum", task=task) < 5.0 * n

    # ...and deltas for `sleep` (the dashboard test runs it too).
    assert delta("forklift_jobs_submitted_total", task="sleep") == 3
    assert delta("forklift_jobs_finished_total", task="sleep", state="succeeded") == 2
    assert delta("forklift_jobs_finished_total", task="sleep", state="cancelled") == 1
    assert delta("forklift_job_duration_seconds_count", task="sleep") == 2  # cancelled never ran
    assert delta("forklift_job_duration_seconds_sum", task="sleep") >= 3.0
    assert delta("forklift_job_duration_seconds_bucket", task="sleep", le="1.0") == 0
    assert delta("forklift_job_duration_seconds_bucket", task="sleep", le="2.5") == 2

    assert value(after, "forklift_workers_online", domain=domain) == 1
    assert value(after, "forklift_workers_busy", domain=domain) == 0
    assert value(after, "forklift_shm_bytes", domain=domain) == 0
    assert value(after, "forklift_shm_segments", domain=domain) == 0
    assert delta("forklift_array_upload_bytes_total") == len(body)
    assert delta("forklift_array_download_bytes_total") == len(body)

    # HTTP latency by route template, never by raw path.
    routes = {
        dict(labels)["route"]
        for labels in series(after, "forklift_http_request_duration_seconds_count")
    }
    assert {"/jobs", "/jobs/{job_id}", "/arrays", "/arrays/{array_id}", "/metrics"} <= routes
    assert not [r for r in routes if any(job_id in r for job_id in ids) or array_id in r]
    latency = value(
        after, "forklift_http_request_duration_seconds_count", method="POST", route="/jobs",
        status="202",
    )  # fmt: skip
    assert latency >= 11


def _log_lines(proc: stack.Proc) -> list[dict]:
    lines = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def test_a_finished_job_logs_a_json_line(obs: ObsStack, http: httpx.Client) -> None:
    job_id = submit(http, "whoami")
    assert wait(http, job_id)["status"] == "succeeded"

    def ended() -> dict | None:
        for entry in _log_lines(obs.worker):
            if entry.get("job_id") == job_id and "state" in entry:
                return entry
        return None

    line = stack.wait_until(ended, 10, interval=0.1, what="the job's end in the worker log")
    assert line["task"] == "whoami"
    assert line["state"] == "succeeded"
    assert isinstance(line["duration"], float) and 0 <= line["duration"] < 10
    assert line["domain"] == obs.domain
    assert line["level"] == "INFO" and line["process"] == "worker"
    assert line["logger"] == "forklift.worker" and job_id in line["msg"]
    assert line["ts"].endswith("Z")
    # At INFO forklift logs one line per job, its end ("started" is DEBUG; Celery's own
    # "received"/"succeeded" lines are turned down to WARNING)...
    about = [e for e in _log_lines(obs.worker) if job_id in e.get("msg", "")]
    assert [e["msg"] for e in about] == [line["msg"]]
    # ...and a line the job's own code logs, through any logger, carries the job context.
    own = [e for e in _log_lines(obs.worker) if e.get("logger") == "tests.jobs"]
    mine = [e for e in own if e["msg"] == f"whoami: pid {line['pid']}"]
    assert mine and all(
        (e.get("job_id"), e.get("task"), e.get("domain")) == (job_id, "whoami", obs.domain)
        for e in mine[-1:]
    )
    assert all("args" not in json.dumps(e.get("data", {})) for e in about)
    api_lines = _log_lines(obs.api)
    assert api_lines and all(e["process"] == "api" for e in api_lines)


def _chrome_driver():  # type: ignore[no-untyped-def]
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if browser is None or driver_bin is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install them)")
    profile = tempfile.mkdtemp(prefix="forklift-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_bin)
    return webdriver.Chrome(options=options, service=service), profile


READ_JOB_ROW = """
const row = document.querySelector(`#jobs tr[data-job-id="${arguments[0]}"]`);
if (!row) return null;
return {
  status: row.dataset.status,
  pill: row.querySelector(".job-status").textContent,
  duration: row.querySelector(".job-duration").textContent,
  workers: document.getElementById("workers").textContent,
};
"""


DASHBOARD_KEY = "dashboard-key-0123456789"


@pytest.fixture(scope="module")
def keyed_url(obs: ObsStack) -> Iterator[str]:
    """A second API on the same stack, with a key: its dashboard lists the key's job ids."""
    api, url = stack.start_api({**obs.env, "FORKLIFT_API_KEYS": DASHBOARD_KEY})
    try:
        yield url
    finally:
        api.stop()


def test_open_dashboard_state_has_counts_not_ids(obs: ObsStack, http: httpx.Client) -> None:
    job_id = submit(http, "sleep", seconds=1.5)
    stack.wait_until(
        lambda: http.get(f"/jobs/{job_id}").json()["status"] == "running", 10, what="running"
    )
    state = http.get("/dashboard/state").json()
    assert state["jobs"] == [] and state["jobs_hidden"] is True
    assert state["recent_counts"].get("running", 0) >= 1
    running = [j for w in state["workers"] for j in w["jobs"]] + state["running_elsewhere"]
    assert running and all("id" not in j for j in running)
    assert job_id not in json.dumps(state)
    assert wait(http, job_id)["status"] == "succeeded"


def test_dashboard_shows_a_job_go_from_queued_to_succeeded(obs: ObsStack, keyed_url: str) -> None:
    driver, profile = _chrome_driver()
    try:
        driver.set_page_load_timeout(20)
        # Open, the page shows counts and no job id.
        driver.get(obs.url + "/")
        assert driver.current_url == obs.url + "/dashboard"
        stack.wait_until(
            lambda: driver.execute_script("return document.body.dataset.updatedAt || null"),
            10,
            what="the open dashboard's first update",
        )
        hidden = driver.execute_script(
            "const r = document.getElementById('jobs-hidden'); return r && r.textContent"
        )
        assert hidden and "FORKLIFT_API_KEYS" in hidden, hidden
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard-open.png"))

        # With keys, the page asks for one and then lists the key's jobs.
        driver.get(keyed_url + "/dashboard")
        stack.wait_until(
            lambda: driver.execute_script("return !document.getElementById('keyform').hidden"),
            10,
            what="the key form",
        )
        driver.execute_script(
            "document.getElementById('apikey').value = arguments[0];"
            "document.getElementById('keyform').requestSubmit();",
            DASHBOARD_KEY,
        )
        stack.wait_until(
            lambda: driver.execute_script("return document.body.dataset.updatedAt || null"),
            10,
            what="the keyed dashboard's first update",
        )
        driver.execute_script("window.__forkliftNoReload = 42;")

        headers = {"Authorization": f"Bearer {DASHBOARD_KEY}"}
        with httpx.Client(base_url=keyed_url, headers=headers, timeout=30) as http:
            job_id = submit(http, "sleep", seconds=2)
        seen: list[str] = []
        on_worker = False
        row: dict = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # One script reads the row and the workers table together: the page redraws them
            # every second, so element handles held across calls would go stale.
            row = driver.execute_script(READ_JOB_ROW, job_id) or {}
            status = row.get("status")
            if status and (not seen or seen[-1] != status):
                seen.append(status)
            if status == "running" and job_id[:8] in row["workers"] and not on_worker:
                on_worker = True
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(ARTIFACTS / "dashboard-running.png"))
            if status == "succeeded":
                break
            time.sleep(0.1)
        assert seen and seen[-1] == "succeeded", f"states seen in the page: {seen}"
        assert "running" in seen, f"states seen in the page: {seen}"
        assert seen.index("running") < seen.index("succeeded")
        assert set(seen) <= {"queued", "running", "succeeded"}
        assert on_worker, "the running job was not listed under its worker"
        assert driver.execute_script("return window.__forkliftNoReload") == 42, "page reloaded"
        assert row["pill"] == "succeeded"
        assert row["duration"].endswith(" s"), row

        # Every asset came from forklift itself (no CDN).
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources and all(name.startswith(keyed_url) for name in resources), resources
        # The sparkline got the finished job.
        counts = driver.execute_script("return document.getElementById('sparkline').dataset.counts")
        assert sum(int(c) for c in counts.split(",")) >= 1

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        time.sleep(0.3)
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        # The keyed page's first poll, before the key was typed, is a 401 by design.
        errors = [e for e in errors if "status of 401" not in e.get("message", "")]
        assert not errors, f"console errors: {errors}"
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)

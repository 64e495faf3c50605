"""A Redis other hosts reach (issue 18): with a password, and over TLS where redis-server has it.

Each test starts a private redis-server of its own (`--requirepass`, and for TLS a throwaway CA
and certificate made with the `openssl` command) and a stack on it: the API and a worker reach
it with `FORKLIFT_REDIS_PASSWORD` folded into `REDIS_URL` (the Celery broker included) and run a
job; without the password the API stays up and `/healthz` says Redis is down.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from forklift import supervisor
from shared.settings import Settings
from tests import stack
from tests.http_api import submit, wait

pytestmark = pytest.mark.slow

PASSWORD = f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[str]:
    """A private redis-server that wants PASSWORD; its URL without the password."""
    proc, url = stack.start_redis(password=PASSWORD)
    try:
        assert f":{PASSWORD}@" in url  # what start_redis hands out carries it
        yield url.replace(f":{PASSWORD}@", "")
    finally:
        proc.stop()


def _fib(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=30) as http:
        return wait(http, submit(http, "fib", n=20), 30)


def test_a_stack_with_the_password_runs_a_job(locked_redis: str) -> None:
    bare = redis.Redis.from_url(locked_redis)
    with pytest.raises(redis.AuthenticationError):  # the server really wants it
        bare.ping()
    bare.close()
    env = stack.stack_env(locked_redis, FORKLIFT_REDIS_PASSWORD=PASSWORD)
    settings = Settings.from_env(env)
    assert settings.redis_url == locked_redis.replace("redis://", f"redis://:{PASSWORD}@")
    worker, api, url = stack.start_worker_and_api(env, "auth", concurrency=1)
    with stack.stopping(api, worker):
        health = httpx.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["redis"] is True, health.text
        job = _fib(url)
        assert job["status"] == "succeeded" and job["result"] == 6765, job
    # The password never shows in the logs (Celery masks it in its banner).
    assert PASSWORD not in worker.log() and PASSWORD not in api.log()


def test_without_the_password_the_api_reports_redis_down(locked_redis: str) -> None:
    env = stack.stack_env(locked_redis)
    api, url = stack.start_api(env)
    with stack.stopping(api):
        health = httpx.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 503, health.text
        assert health.json()["redis"] is False
        assert health.headers["retry-after"]
        submitted = httpx.post(f"{url}/jobs", json={"task": "fib", "params": {"n": 5}}, timeout=10)
        assert submitted.status_code == 503, submitted.text
        assert api.popen.poll() is None, "the API must stay up while Redis refuses it"


def test_two_passwords_are_refused_at_startup_without_showing_them() -> None:
    """A URL and FORKLIFT_REDIS_PASSWORD naming two passwords stop the process at startup;
    the error names the variable and prints neither secret."""
    env = {"REDIS_URL": "redis://:first-secret@h:6379/0", "FORKLIFT_REDIS_PASSWORD": "2nd-secret"}
    with pytest.raises(ValueError) as caught:
        Settings.from_env(env)
    text = str(caught.value)
    assert "FORKLIFT_REDIS_PASSWORD" in text and "different passwords" in text
    assert "first-secret" not in text and "2nd-secret" not in text


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(folder: Path) -> None:
    """A CA, and a certificate for 127.0.0.1 signed by it (both for this test only)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "1", "-subj", "/CN=forklift-test-ca", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)  # fmt: skip
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.cnf",
             cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """redis-server on a TLS port only, with a password: (its host:port, the CA file)."""
    binary = supervisor.find_redis_server()
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and the openssl command")
    folder = tmp_path_factory.mktemp("redis-tls")
    _certificates(folder)
    port = stack.free_port()
    argv = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
            "--tls-cert-file", str(folder / "server.crt"),
            "--tls-key-file", str(folder / "server.key"),
            "--tls-ca-cert-file", str(folder / "ca.crt"), "--tls-auth-clients", "no",
            "--daemonize", "no"]  # fmt: skip
    proc = stack.spawn(f"redis-tls-{port}", argv, {"PATH": "/usr/bin:/bin"})
    ca = folder / "ca.crt"
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def answers() -> bool:
        if not proc.running():
            pytest.skip(f"this redis-server has no TLS: {proc.log()[-300:]}")
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    try:
        stack.wait_until(answers, 15, what="redis-server on its TLS port")
        yield f"127.0.0.1:{port}", ca
    finally:
        proc.stop()


def test_a_stack_over_rediss_runs_a_job(tls_redis: tuple[str, Path]) -> None:
    """`rediss://` with `ssl_cert_reqs=required` and the CA passes through to redis-py (API,
    worker) and kombu (the broker) alike; a client trusting another CA is refused."""
    where, ca = tls_redis
    url = f"rediss://{where}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    env = stack.stack_env(url, FORKLIFT_REDIS_PASSWORD=PASSWORD)
    worker, api, api_url = stack.start_worker_and_api(env, "tls", concurrency=1)
    with stack.stopping(api, worker):
        job = _fib(api_url)
        assert job["status"] == "succeeded" and job["result"] == 6765, job
    wrong_ca = ca.with_name("server.crt")  # not a CA: verification must fail
    untrusting = redis.Redis.from_url(
        url.replace(str(ca), str(wrong_ca)), password=PASSWORD, socket_timeout=2
    )
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusting.ping()
    untrusting.close()

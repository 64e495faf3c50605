"""Shared-memory security (issue 14: findings 1, 2, 6, 7, 8), on a stack in its defaults.

One private stack for the module (its own redis-server and prefixes): two API keys, an
internal token (for `/internal/arrays`), the segment pool at its default (on), a janitor every
second, a 1 GiB shared-memory cap. Every test says which finding it reproduces:
1. a recycled registration, committed at once, must not show another key's freed bytes;
2. a download in progress must survive the array's deletion or expiry and a new upload that
   would reuse its segment: right bytes, no SIGBUS, the API alive;
6. files planted in /dev/shm under the stack's names are skipped, never used or truncated,
   and do not stop the janitor;
7. a client-made segment must be the stack's uid, mode 0600, a regular file with one link;
8. the shared-memory counter equals what is in /dev/shm after concurrent reservations,
   recounts and drops, and held reservations count against the cap.
Issue 18 (a Redis other hosts reach): a segment name or a peer API URL rewritten in Redis is
refused before anything is opened or connected to (shared/trust.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import os
import random
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
import redis

from shared.arrays import janitor, pool, replicas
from shared.settings import Settings
from tests import stack
from tests.http_api import npy_bytes, streamed_upload, submit, upload, wait

KEY_A = f"ka-{uuid.uuid4().hex}"
KEY_B = f"kb-{uuid.uuid4().hex}"
TOKEN = uuid.uuid4().hex
MiB = 1 << 20
CAP = 1 << 30
SHM = Path("/dev/shm")
NOBODY = 65534
PEER = "http://127.0.0.1:9"


@dataclass
class Secure:
    env: dict[str, str]
    url: str
    api: stack.Proc
    worker: stack.Proc
    redis: redis.Redis
    settings: Settings

    @property
    def prefix(self) -> str:
        return self.env["FORKLIFT_SHM_PREFIX"]

    def client(self, key: str, **headers: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=60, headers={"authorization": f"Bearer {key}", **headers}
        )

    def counter(self) -> int:
        return int(self.redis.get(self.settings.keys.shm_bytes(self.settings.shm_domain)) or 0)

    def sweep(self) -> janitor.SweepReport:
        """One janitor pass, the API's own code, run here to control when it happens."""
        client = redis.Redis.from_url(self.env["REDIS_URL"], decode_responses=True)
        try:
            report = janitor.sweep(client, self.settings, force=True)
        finally:
            client.close()
        assert report is not None
        return report


@pytest.fixture(scope="module")
def secure() -> Iterator[Secure]:
    # A Redis of its own: the counter, the ledger and the broker are this stack's alone.
    redis_proc, redis_url = stack.start_redis()
    try:
        yield from _secure_stack(redis_url)
    finally:
        redis_proc.stop()


def _secure_stack(redis_url: str) -> Iterator[Secure]:
    env = stack.stack_env(
        redis_url,
        FORKLIFT_API_KEYS=f"{KEY_A},{KEY_B}",
        FORKLIFT_INTERNAL_TOKEN=TOKEN,
        FORKLIFT_JANITOR_INTERVAL="1",
        FORKLIFT_SHM_LIMIT_BYTES=str(CAP),
        FORKLIFT_KEY_MAX_UPLOAD_BYTES=str(CAP),  # per-key limits are not what is tested here
        FORKLIFT_PEER_URLS=PEER,  # a peer that is not the attacker of the peer URL test
    )
    worker, api, url = stack.start_worker_and_api(env, "shmsec", concurrency=1)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    running = Secure(env, url, api, worker, client, Settings.from_env(env))
    try:
        yield running
    finally:
        running.api.stop()
        worker.stop()
        left = stack.segments(env["FORKLIFT_SHM_PREFIX"])
        for name in left:
            (SHM / name).unlink(missing_ok=True)
        client.close()
        assert not left, f"segments left after the stack stopped: {sorted(left)}"


def _delete(http: httpx.Client, array_id: str) -> None:
    assert http.delete(f"/arrays/{array_id}").status_code in (202, 204)


def _register(http: httpx.Client, secure: Secure, nbytes: int, *, recycle: bool) -> dict:
    info = http.get("/arrays/register/info").json()
    body = {
        "segment": f"{secure.prefix}{uuid.uuid4().hex}",
        "dtype": "|u1",
        "shape": [nbytes],
        "domain": info["shm_domain"],
        "recycle": recycle,
    }
    response = http.post("/arrays/register", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _pooled(secure: Secure) -> set[str]:
    return stack.segments(f"{secure.prefix}pool_")


def _alive(secure: Secure) -> None:
    """The API that served everything is the one that started (no SIGBUS, no restart)."""
    assert secure.api.popen.poll() is None, f"the API died:\n{secure.api.log()[-3000:]}"
    assert httpx.get(f"{secure.url}/healthz", timeout=10).status_code in (200, 503)


# -- 1: recycled registrations -------------------------------------------------------------


def test_a_recycled_registration_never_returns_another_keys_bytes(secure: Secure) -> None:
    """Finding 1: B registers `recycle: true` and commits at once, after A freed an array."""
    size = 8 * MiB
    victim = np.full(size, 0xA5, dtype=np.uint8)
    with secure.client(KEY_A) as a, secure.client(KEY_B) as b:
        freed = upload(a, victim)
        _delete(a, freed["id"])
        assert len(_pooled(secure)) == 1, "A's freed segment should be in the pool"

        # The exact sequence of the finding: nothing of B's is pooled, so B gets no segment.
        reservation = _register(b, secure, size, recycle=True)
        assert reservation["created"] is False, "B was handed a segment that A freed"
        commit = b.post(f"/arrays/register/{reservation['id']}/commit")
        assert commit.status_code == 422, commit.text
        assert commit.json()["error"]["code"] == "bad_segment"
        assert len(_pooled(secure)) == 1, "A's pooled segment is still there, unused"

        # Once B has freed an array of its own, a recycled registration gets B's bytes back,
        # and only B's: the pool holds one segment of each key, of the same size.
        mine = np.full(size, 0x5B, dtype=np.uint8)
        theirs = upload(a, victim)  # takes A's pooled segment (overwritten in full)
        own = upload(b, mine)
        _delete(a, theirs["id"])
        _delete(b, own["id"])
        assert len(_pooled(secure)) == 2
        reservation = _register(b, secure, size, recycle=True)
        assert reservation["created"] is True
        commit = b.post(f"/arrays/register/{reservation['id']}/commit")
        assert commit.status_code == 201, commit.text
        got = b.get(f"/arrays/{reservation['id']}")
        assert got.status_code == 200
        assert got.content == npy_bytes(mine), "B must see its own old bytes, nobody else's"
        assert b"\xa5" * 4096 not in got.content
        _delete(b, reservation["id"])
        # A can take its own back the same way; B's segment is not A's to take.
        reservation = _register(a, secure, size, recycle=True)
        assert reservation["created"] is True
        assert a.post(f"/arrays/register/{reservation['id']}/commit").status_code == 201
        assert a.get(f"/arrays/{reservation['id']}").content == npy_bytes(victim)
        _delete(a, reservation["id"])


# -- 2: downloads pin what they read -------------------------------------------------------


def _slow_read_around(
    secure: Secure, http: httpx.Client, path: str, nbytes: int, meanwhile
) -> bytes:
    """Read the first bytes of a download, run `meanwhile()`, then read the rest."""
    chunks = []
    with http.stream("GET", path, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert int(response.headers["content-length"]) == nbytes
        stream = response.iter_raw(1 << 16)
        chunks.append(next(stream))
        meanwhile()
        chunks.extend(stream)
    return b"".join(chunks)


@pytest.mark.parametrize("route", ["array", "job_result", "internal"])
def test_a_slow_download_survives_delete_and_reuse(secure: Secure, route: str) -> None:
    """Finding 2: delete during a slow download, then uploads that fit its segment."""
    n = 8 * MiB  # 64 MiB of float64: far more than the socket buffers hold
    original = np.arange(n, dtype=np.float64)
    with secure.client(KEY_A, **{"x-forklift-internal-token": TOKEN}) as a:
        if route == "job_result":
            source = streamed_upload(a, original[::-1].copy())
            try:
                job = submit(a, "sort", inputs={"a": source["id"]})
                done = wait(a, job, within=120)
            finally:
                _delete(a, source["id"])
            assert done["status"] == "succeeded", done
            array_id = done["result"]["array"]["id"]
            path, expected = f"/jobs/{job}/result", npy_bytes(original)
        else:
            array_id = streamed_upload(a, original)["id"]
            raw = route == "internal"
            path = f"/internal/arrays/{array_id}" if raw else f"/arrays/{array_id}"
            expected = original.tobytes() if raw else npy_bytes(original)
        segment = f"{secure.prefix}{array_id}"
        newcomers: list[str] = []

        def delete_and_reuse() -> None:
            _delete(a, array_id)
            assert a.get(f"/arrays/{array_id}/meta").status_code == 404, "still visible"
            # Same size, and smaller (a reuse would truncate it under the reader).
            for data in (np.full(n, -1.0), np.full(n * 3 // 4, -2.0)):
                newcomers.append(streamed_upload(a, data)["id"])
            assert segment in stack.segments(secure.prefix), "recycled under its reader"

        body = _slow_read_around(secure, a, path, len(expected), delete_and_reuse)
        assert body == expected, "the download did not stream the array it started"
        _alive(secure)
        # Once the reader is done, the last reader frees it: record and segment gone.
        stack.wait_until(
            lambda: segment not in stack.segments(secure.prefix), 20, what="segment freed"
        )
        assert not secure.redis.exists(secure.settings.keys.array(array_id))
        for newcomer in newcomers:
            assert a.get(f"/arrays/{newcomer}/meta").status_code == 200
            _delete(a, newcomer)


def test_a_slow_download_survives_expiry(secure: Secure) -> None:
    """Finding 2: the array expires (janitor) while it streams; the next upload reuses."""
    n = 8 * MiB
    original = np.arange(n, dtype=np.float64) * 3
    with secure.client(KEY_A) as a:
        array_id = streamed_upload_with_ttl(a, original, ttl=3)
        segment = f"{secure.prefix}{array_id}"
        newcomer: list[str] = []

        def expire_and_reuse() -> None:
            stack.wait_until(
                lambda: a.get(f"/arrays/{array_id}/meta").status_code == 404,
                30,
                what="the janitor to expire the array",
            )
            newcomer.append(streamed_upload(a, np.full(n, 9.0))["id"])
            assert segment in stack.segments(secure.prefix), "recycled under its reader"

        expected = npy_bytes(original)
        path = f"/arrays/{array_id}"
        body = _slow_read_around(secure, a, path, len(expected), expire_and_reuse)
        assert body == expected
        _alive(secure)
        stack.wait_until(
            lambda: segment not in stack.segments(secure.prefix), 20, what="segment freed"
        )
        _delete(a, newcomer[0])


def streamed_upload_with_ttl(http: httpx.Client, arr: np.ndarray, ttl: float) -> str:
    response = http.post(
        "/arrays",
        content=npy_bytes(arr),
        params={"ttl": ttl},
        headers={"content-type": "application/x-npy"},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


# -- 6: files planted in /dev/shm ----------------------------------------------------------

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def _set_immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i; False where the filesystem does not support it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags[:4], "little")
        value = value | FS_IMMUTABLE_FL if on else value & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, value.to_bytes(4, "little") + bytes(4))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _fingerprint(path: Path) -> tuple:
    info = os.lstat(path)
    digest = ""
    if path.is_file() and not path.is_symlink():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return (info.st_mode, info.st_uid, info.st_size, info.st_blocks, info.st_nlink, digest)


def test_planted_files_are_skipped_and_left_untouched(secure: Secure, tmp_path: Path) -> None:
    """Finding 6: foreign pool files, orphans the stack may not unlink, symlinks, a FIFO."""
    size = 64 * MiB
    prefix, tag = secure.prefix, pool.owner_tag(_owner(KEY_A))
    target = tmp_path / "precious"  # what a symlink would make the pool truncate
    target.write_bytes(b"precious" * 1024)
    planted: dict[str, Path] = {}

    def plant(name: str) -> Path:
        path = SHM / name
        planted[name] = path
        return path

    # A sparse pool file of another user, of a size that fits the uploads below.
    foreign_pool = plant(f"{prefix}pool_{tag}_{'0' * 32}")
    with foreign_pool.open("wb") as f:
        f.truncate(size)
    os.chown(foreign_pool, NOBODY, NOBODY)
    os.chmod(foreign_pool, 0o600)
    # One of our uid but readable by everyone (not a segment this stack made).
    loose_pool = plant(f"{prefix}pool_{tag}_{'1' * 32}")
    loose_pool.write_bytes(bytes(size))
    os.chmod(loose_pool, 0o644)
    # Symlinks under a pool name and an array name, a FIFO under a pool name.
    plant(f"{prefix}pool_{tag}_{'2' * 32}").symlink_to(target)
    plant(f"{prefix}{'0' * 31}3").symlink_to(target)
    os.mkfifo(plant(f"{prefix}pool_{tag}_{'4' * 32}"), 0o600)
    # An orphan array name (no record) of another user; a pool name hard-linked elsewhere.
    other = plant(f"{prefix}{'0' * 31}5")
    other.write_bytes(b"x" * 4096)
    os.chown(other, NOBODY, NOBODY)
    os.chmod(other, 0o600)
    elsewhere = plant(f"other_app_{uuid.uuid4().hex}")
    elsewhere.write_bytes(bytes(size))
    os.chmod(elsewhere, 0o600)
    os.link(elsewhere, plant(f"{prefix}pool_{tag}_{'6' * 32}"))
    # The janitor still unlinks an orphan that is ours, listed after all of the above.
    ours = SHM / f"{prefix}{'f' * 32}"
    ours.write_bytes(b"z" * 4096)
    os.chmod(ours, 0o600)
    before = {name: _fingerprint(path) for name, path in planted.items()}
    target_before = _fingerprint(target)
    try:
        with secure.client(KEY_A) as a:
            # Uploads of the planted pool files' size work, and fill fresh or real pooled ones.
            data = np.arange(size // 8, dtype=np.float64)
            for _ in range(3):
                meta = streamed_upload(a, data)
                assert a.get(f"/arrays/{meta['id']}").content == npy_bytes(data)
                _delete(a, meta["id"])  # into the pool: the next round takes it back
            # A recycled registration skips them too.
            reservation = _register(a, secure, size, recycle=True)
            name = f"{prefix}{reservation['id']}"
            assert reservation["created"] is True
            assert os.stat(SHM / name).st_ino not in {os.lstat(p).st_ino for p in planted.values()}
            assert a.delete(f"/arrays/register/{reservation['id']}").status_code == 204
        # The API's own janitor got past every planted file: it unlinked our orphan.
        stack.wait_until(lambda: not ours.exists(), 30, what="the API's janitor pass")
        report = secure.sweep()
        assert not set(report.orphan_segments) & set(planted)
        assert pool.trim(secure.settings, idle_s=0) >= 1  # real pooled segments go
        assert pool.take(f"{prefix}{uuid.uuid4().hex}", size, secure.settings) is False
        after = {name: _fingerprint(path) for name, path in planted.items()}
        assert after == before, "a planted file was changed"
        assert _fingerprint(target) == target_before, "the symlink's target was changed"
        _alive(secure)
        stack.wait_until(
            lambda: f"{foreign_pool.name}: owned by uid {NOBODY}" in secure.api.log(),
            10,
            what="the API to log the skipped file",
        )
    finally:
        for path in (*planted.values(), ours):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def test_an_orphan_the_stack_may_not_unlink_does_not_stop_the_janitor(secure: Secure) -> None:
    """Finding 6: `chattr +i` on a `<prefix><32 hex>` file: unlink fails, the pass goes on."""
    stuck = SHM / f"{secure.prefix}{'0' * 32}"
    stuck.write_bytes(b"s" * 4096)
    os.chmod(stuck, 0o600)
    if not _set_immutable(stuck, True):
        stuck.unlink()
        pytest.skip("this /dev/shm does not support the immutable flag")
    later = SHM / f"{secure.prefix}{'f' * 32}"  # listed after it: unlinked by the same pass
    try:
        later.write_bytes(b"z" * 4096)
        os.chmod(later, 0o600)
        report = secure.sweep()
        assert later.name in report.orphan_segments
        assert stuck.name not in report.orphan_segments and stuck.exists()
        with secure.client(KEY_A) as a:  # the API's janitor keeps running too
            meta = upload(a, np.ones(10), ttl=1)
            stack.wait_until(
                lambda: a.get(f"/arrays/{meta['id']}/meta").status_code == 404,
                30,
                what="the API's janitor to expire an array",
            )
    finally:
        _set_immutable(stuck, False)
        stuck.unlink(missing_ok=True)
        later.unlink(missing_ok=True)


def _owner(key: str) -> str:
    from api.owners import owner_id

    return owner_id(key)


# -- 7: client-made segments ---------------------------------------------------------------


def _state(secure: Secure) -> tuple[int, set[str]]:
    return secure.counter(), stack.array_segments(secure.prefix)


def test_client_segments_must_be_the_stacks_own_at_commit(secure: Secure) -> None:
    """Finding 7: owner uid, mode, type and link count are checked on the descriptor."""
    size = 4096
    baseline = _state(secure)
    with secure.client(KEY_A) as a:

        def refused(make, reason: str, *, left_to_its_owner: bool = False) -> None:
            reservation = _register(a, secure, size, recycle=False)
            path = SHM / f"{secure.prefix}{reservation['id']}"
            extra = make(path)
            try:
                response = a.post(f"/arrays/register/{reservation['id']}/commit")
                assert response.status_code == 422, response.text
                error = response.json()["error"]
                assert error["code"] == "bad_segment" and reason in error["message"], error
                assert a.get(f"/arrays/{reservation['id']}/meta").status_code == 404
                assert secure.counter() == baseline[0], "the reservation is still counted"
                # The stack's uid made it: removed (the name only); another uid's stays.
                assert os.path.lexists(path) == left_to_its_owner
                assert all(p.exists() for p in extra), "what a link pointed to was touched"
            finally:
                for p in (path, *extra):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()

        def file_of(mode: int, uid: int = os.geteuid(), data: bytes = bytes(size)):
            def make(path: Path) -> list[Path]:
                path.write_bytes(data)
                os.chown(path, uid, uid)
                os.chmod(path, mode)
                return []

            return make

        def hard_linked(path: Path) -> list[Path]:
            file_of(0o600)(path)
            twin = path.with_name(path.name + "_twin")
            os.link(path, twin)
            return [twin]

        def symlinked(path: Path) -> list[Path]:
            real = path.with_name(path.name + "_real")
            file_of(0o600)(real)
            path.symlink_to(real)
            return [real]

        refused(file_of(0o600, uid=NOBODY), f"owned by uid {NOBODY}", left_to_its_owner=True)
        refused(file_of(0o644), "mode 0644")
        refused(file_of(0o660), "mode 0660")
        refused(hard_linked, "2 hard links")
        refused(symlinked, "cannot be opened as a segment")
        refused(file_of(0o600, data=bytes(size - 1)), f"needs exactly {size}")

        # A sparse one of the right kind is accepted, and its holes are allocated first.
        reservation = _register(a, secure, 64 * MiB, recycle=False)
        path = SHM / f"{secure.prefix}{reservation['id']}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, 64 * MiB)
        os.close(fd)
        assert os.stat(path).st_blocks == 0
        response = a.post(f"/arrays/register/{reservation['id']}/commit")
        assert response.status_code == 201, response.text
        assert os.stat(path).st_blocks * 512 >= 64 * MiB, "a reader could SIGBUS on a hole"
        _delete(a, reservation["id"])
    assert _state(secure) == baseline


# -- 8: the shared-memory counter ----------------------------------------------------------


def _truth(secure: Secure) -> int:
    """Bytes the domain holds: array segments in /dev/shm plus reservations without one."""
    held = 0
    for key in secure.redis.scan_iter(secure.settings.keys.array("*")):
        nbytes, segment = secure.redis.hmget(key, "nbytes", "segment")
        if nbytes is None:
            continue
        path = SHM / segment
        if path.exists():
            assert os.stat(path).st_size == max(int(nbytes), 1), segment
        held += int(nbytes)
    on_disk = sum(os.stat(SHM / name).st_size for name in stack.array_segments(secure.prefix))
    uploading = held - on_disk
    assert uploading >= 0, f"segments without records: {on_disk} > {held}"
    return held


def test_held_reservations_count_against_the_cap_across_recounts(secure: Secure) -> None:
    """Finding 8: reservations with no segment yet survive a recount; the cap holds."""
    assert secure.counter() == 0
    chunk = 300 * MiB
    with secure.client(KEY_A) as a, secure.client(KEY_B) as b:
        held = [_register(http, secure, chunk, recycle=False) for http in (a, b, a)]
        assert secure.counter() == 3 * chunk
        secure.sweep()  # a recount while none of them has a segment
        assert secure.counter() == 3 * chunk, "the recount forgot reservations"
        info = a.get("/arrays/register/info").json()
        over = a.post(
            "/arrays/register",
            json={
                "segment": f"{secure.prefix}{uuid.uuid4().hex}",
                "dtype": "|u1",
                "shape": [chunk],
                "domain": info["shm_domain"],
            },
        )
        assert over.status_code == 507, over.text
        for http, reservation in zip((a, b, a), held, strict=True):
            assert http.delete(f"/arrays/register/{reservation['id']}").status_code == 204
        assert secure.counter() == 0, "the counter did not come back to exactly 0"


def test_the_counter_stays_exact_under_concurrent_reserves_recounts_and_drops(
    secure: Secure,
) -> None:
    """Finding 8: uploads (some broken off), registrations (some abandoned), deletes and
    recounts all at once; afterwards the counter is exactly what /dev/shm and the open
    reservations hold, with no recount to tidy up after them."""
    assert secure.counter() == 0
    stop = threading.Event()
    errors: list[BaseException] = []
    kept: list[tuple[str, str]] = []  # (key, array id) left alive at the end
    lock = threading.Lock()

    def guarded(fn) -> None:
        try:
            fn()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()

    def uploader(key: str, seed: int) -> None:
        rng = random.Random(seed)
        with secure.client(key) as http:
            for i in range(25):
                arr = np.ones(rng.randint(1, 5 * MiB // 8))
                if i % 5 == 4:  # broken off mid-body: the reservation must go too
                    body = npy_bytes(arr)

                    def parts(body: bytes = body) -> Iterator[bytes]:
                        yield body[: len(body) // 2]
                        raise RuntimeError("client gave up")

                    with contextlib.suppress(httpx.HTTPError, RuntimeError):
                        http.post(
                            "/arrays",
                            content=parts(),
                            headers={
                                "content-type": "application/x-npy",
                                "content-length": str(len(body)),
                            },
                        )
                    continue
                meta = upload(http, arr)
                if i % 3 == 0:
                    with lock:
                        kept.append((key, meta["id"]))
                else:
                    _delete(http, meta["id"])

    def registrar(key: str, seed: int) -> None:
        rng = random.Random(seed)
        with secure.client(key) as http:
            for i in range(25):
                nbytes = rng.randint(1, 5 * MiB)
                reservation = _register(http, secure, nbytes, recycle=i % 2 == 0)
                time.sleep(rng.random() * 0.05)  # held across recounts
                if i % 3 == 0:
                    assert http.delete(f"/arrays/register/{reservation['id']}").status_code == 204
                    continue
                path = SHM / f"{secure.prefix}{reservation['id']}"
                if not reservation["created"]:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                    os.ftruncate(fd, nbytes)
                    os.close(fd)
                with path.open("r+b") as f:
                    f.write(b"\x01" * nbytes)
                commit = http.post(f"/arrays/register/{reservation['id']}/commit")
                assert commit.status_code == 201, commit.text
                if i % 3 == 1:
                    with lock:
                        kept.append((key, reservation["id"]))
                else:
                    _delete(http, reservation["id"])

    def recounter() -> None:
        while not stop.is_set():
            secure.sweep()
            assert secure.counter() >= 0

    workers = [
        threading.Thread(target=guarded, args=(lambda k=k, s=s: uploader(k, s),))
        for k, s in ((KEY_A, 1), (KEY_B, 2))
    ] + [
        threading.Thread(target=guarded, args=(lambda k=k, s=s: registrar(k, s),))
        for k, s in ((KEY_A, 3), (KEY_B, 4))
    ]
    counting = threading.Thread(target=guarded, args=(recounter,))
    counting.start()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    counting.join()
    if errors:
        raise errors[0]
    assert kept, "nothing was kept: the comparison would be trivial"
    assert secure.counter() == _truth(secure) > 0
    keys = {KEY_A: secure.client(KEY_A), KEY_B: secure.client(KEY_B)}
    try:
        for key, array_id in kept:
            _delete(keys[key], array_id)
    finally:
        for http in keys.values():
            http.close()
    assert secure.counter() == _truth(secure) == 0
    secure.sweep()
    assert secure.counter() == 0


def test_a_recount_adopts_arrays_from_before_the_ledger(secure: Secure) -> None:
    """Records made by a version without the ledger are counted by the next recount."""
    assert secure.counter() == 0
    ledger = secure.settings.keys.shm_ledger(secure.settings.shm_domain)
    with secure.client(KEY_A) as a:
        meta = upload(a, np.ones(4 * MiB // 8))
        # What an older stack left: the record and its segment, no ledger entry, not counted.
        assert secure.redis.hdel(ledger, meta["id"]) == 1
        secure.redis.decrby(secure.settings.keys.shm_bytes(secure.settings.shm_domain), 4 * MiB)
        assert secure.counter() == 0
        secure.sweep()
        assert secure.counter() == 4 * MiB
        assert int(secure.redis.hget(ledger, meta["id"])) == 4 * MiB
        _delete(a, meta["id"])
    assert secure.counter() == 0


def test_a_download_whose_lease_was_lost_ends_short(secure: Secure) -> None:
    """A lease that lapsed (Redis away longer than it) ends the stream before the array's
    end: a clean failure (short body), never bytes of a segment that may be reused."""
    original = np.arange(8 * MiB, dtype=np.float64)
    with secure.client(KEY_A) as a:
        array_id = streamed_upload(a, original)["id"]
        readers = secure.settings.keys.readers(array_id)
        with a.stream("GET", f"/arrays/{array_id}", timeout=120) as response:
            stream = response.iter_raw(1 << 16)
            got = len(next(stream))
            assert secure.redis.zcard(readers) == 1
            secure.redis.delete(readers)  # what a lapsed lease looks like
            # The API notices at its next renewal (a third of the lease) and ends the stream.
            stack.wait_until(
                lambda: f"read lease of array {array_id} lost" in secure.api.log(),
                30,
                interval=0.2,
                what="the API to notice the lost lease",
            )
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in stream:
                    got += len(chunk)
        assert got < len(npy_bytes(original))
        _alive(secure)
        _delete(a, array_id)


# -- issue 18: names and addresses read from Redis are checked before use --------------------

IN_OPEN, IN_ACCESS, IN_MODIFY, IN_ATTRIB = 0x20, 0x01, 0x02, 0x04


@contextlib.contextmanager
def _touches(path: Path) -> Iterator[list[int]]:
    """The inotify events (masks) on `path` while the block runs, by any process: an open, a
    read, a write or a change of its attributes. Stat and lstat cause none."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    events: list[int] = []
    try:
        mask = IN_OPEN | IN_ACCESS | IN_MODIFY | IN_ATTRIB
        assert libc.inotify_add_watch(fd, str(path).encode(), mask) >= 0
        yield events
        time.sleep(0.1)
        with contextlib.suppress(BlockingIOError):
            data = os.read(fd, 1 << 16)
            offset = 0
            while offset < len(data):
                _wd, event_mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                events.append(event_mask)
                offset += 16 + length
    finally:
        os.close(fd)


@contextlib.contextmanager
def _decoy(name: str) -> Iterator[Path]:
    """A file in /dev/shm another stack (or the system) owns: it must stay unopened, unmapped
    and unchanged. Its atime is set before its mtime, so a mapping (which marks the file
    accessed, relatime or not) would show."""
    path = SHM / name
    content = os.urandom(64 * 1024)
    path.write_bytes(content)
    path.chmod(0o600)
    info = os.stat(path)
    os.utime(path, ns=(info.st_mtime_ns - 3600 * 10**9, info.st_mtime_ns))
    before = os.stat(path)
    try:
        yield path
        after = os.stat(path)
        assert (after.st_ino, after.st_size, after.st_mode, after.st_nlink) == (
            before.st_ino,
            before.st_size,
            before.st_mode,
            before.st_nlink,
        )
        assert after.st_atime_ns == before.st_atime_ns, "the decoy was mapped or read"
        assert after.st_mtime_ns == before.st_mtime_ns and after.st_ctime_ns == before.st_ctime_ns
        assert path.read_bytes() == content
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _poisoned(secure: Secure, array_id: str, **fields: str) -> Iterator[None]:
    """The array's record with `fields` rewritten in Redis (what anyone who reaches Redis can
    do), put back afterwards so the stack's byte counters stay exact."""
    key = secure.settings.keys.array(array_id)
    saved = secure.redis.hmget(key, list(fields))
    secure.redis.hset(key, mapping=fields)
    try:
        yield
    finally:
        secure.redis.hset(key, mapping=dict(zip(fields, saved, strict=True)))


def _security_warnings(proc: stack.Proc, needle: str) -> list[str]:
    return [ln for ln in proc.log().splitlines() if "security: refused" in ln and needle in ln]


@pytest.mark.parametrize("kind", ["other_prefix", "another_array"])
def test_a_segment_name_from_redis_is_checked_before_anything_opens_it(
    secure: Secure, kind: str
) -> None:
    """A record whose segment names a file outside this stack's names: another prefix (a
    decoy another stack owns), or another array's segment of this stack (B's, through A's
    record). The job fails naming the check, downloads are refused, nothing is opened."""
    with secure.client(KEY_A) as a, secure.client(KEY_B) as b:
        mine = upload(a, np.arange(1024, dtype=np.float64))
        theirs = upload(b, np.full(8192, 7, dtype=np.uint8))  # 64 KiB, like the decoy
        target = f"other_{uuid.uuid4().hex}" if kind == "other_prefix" else theirs["segment"]
        if kind == "another_array":
            assert target.startswith(secure.prefix) and target != mine["segment"]
        watched = (
            contextlib.nullcontext(SHM / target) if kind == "another_array" else _decoy(target)
        )
        with watched as path, _poisoned(secure, mine["id"], segment=target):
            with _touches(path) as events:
                job = wait(a, submit(a, "inspect_input", inputs={"a": mine["id"]}), 30)
                download = a.get(f"/arrays/{mine['id']}")
            assert events == [], f"the file was touched: {[hex(m) for m in events]}"
        assert job["status"] == "failed", job
        assert job["error"].startswith("input 'a': refused by the segment name check:"), job
        assert repr(target) in job["error"] and "FORKLIFT_SHM_PREFIX" in job["error"]
        assert download.status_code == 502, download.text
        assert download.json()["error"]["code"] == "untrusted"
        assert _security_warnings(secure.worker, target), "no security warning in the worker log"
        assert _security_warnings(secure.api, target), "no security warning in the API log"
        # B's array is intact, and A's still reads right once its record is its own again.
        assert b.get(f"/arrays/{theirs['id']}").content == npy_bytes(np.full(8192, 7, np.uint8))
        ok = wait(a, submit(a, "inspect_input", inputs={"a": mine["id"]}), 30)
        assert ok["status"] == "succeeded" and ok["result"]["sum"] == sum(range(1024)), ok
        _delete(a, mine["id"])
        _delete(b, theirs["id"])
    stack.wait_arrays_freed(secure.prefix, set())
    assert secure.counter() == 0


class _Attacker(http.server.BaseHTTPRequestHandler):
    """An HTTP server a poisoned record points at: it records every request it gets."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(f"{self.path} {self.headers.get('X-Forklift-Internal-Token')}")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_peer_url_from_redis_is_not_fetched_unless_configured(secure: Secure) -> None:
    """A record rewritten to say its array lives in another domain whose API is an attacker's
    server (on this host, another port than the configured peer): neither the worker's pull
    nor the API's download connects to it (the internal token would go with the request)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    _Attacker.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    attacker = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with secure.client(KEY_A) as a:
            meta = upload(a, np.arange(512, dtype=np.float64))
            with _poisoned(secure, meta["id"], domain="elsewhere", api_url=attacker):
                job = wait(a, submit(a, "inspect_input", inputs={"a": meta["id"]}), 30)
                download = a.get(f"/arrays/{meta['id']}")
            # The check is what refused: the same URL, allowed, is fetched (a sanity check
            # of the server, in process, with this test's settings).
            allowed = Settings.from_env({**secure.env, "FORKLIFT_PEER_URLS": attacker})
            httpx.get(replicas.source(meta["id"], "elsewhere", attacker, allowed).url)
            _delete(a, meta["id"])
    finally:
        server.shutdown()
        server.server_close()
    assert job["status"] == "failed", job
    assert job["error"].startswith("input 'a': refused by the peer url check:"), job
    assert "FORKLIFT_PEER_URLS" in job["error"] and attacker in job["error"]
    assert download.status_code == 502 and download.json()["error"]["code"] == "untrusted"
    assert _Attacker.seen == [f"/internal/arrays/{meta['id']} None"], _Attacker.seen
    assert _security_warnings(secure.worker, attacker) and _security_warnings(secure.api, attacker)
    # The refused pull left no replica record, reservation or segment behind.
    store = replicas.ReplicaStore(secure.redis, secure.settings)
    assert not secure.redis.exists(store.key(meta["id"]))
    assert secure.redis.scard(store.index_key) == 0
    stack.wait_arrays_freed(secure.prefix, set())
    assert secure.counter() == 0

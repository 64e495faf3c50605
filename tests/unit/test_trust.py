"""shared/trust.py: exactly the segment names the stack writes, exactly the configured peers;
and the Redis password folded into REDIS_URL (shared/settings.py)."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

from shared import trust
from shared.arrays import replicas
from shared.settings import Settings

ID = uuid.uuid4().hex
PREFIX = "forklift_tr_"


def settings(**env: str) -> Settings:
    return Settings.from_env({"FORKLIFT_SHM_PREFIX": PREFIX, **env})


def test_the_names_the_stack_writes_pass() -> None:
    s = settings()
    assert trust.segment(f"{PREFIX}{ID}", ID, s, where="t") == f"{PREFIX}{ID}"
    assert trust.segment(f"{PREFIX}{ID}_r", ID, s, where="t", replica=True) == f"{PREFIX}{ID}_r"


@pytest.mark.parametrize(
    "name",
    [
        f"other_{ID}",  # another prefix
        f"forklift_{ID}",  # the default prefix, not this stack's
        f"{PREFIX}{uuid.uuid4().hex}",  # another array's segment of this stack
        f"{PREFIX}{ID}_r",  # the replica's name where the array's is expected
        f"{PREFIX}pool_open_{ID}",  # a pooled segment: never in a record
        f"{PREFIX}{ID}/../x",
        f"../{PREFIX}{ID}",
        f"/{PREFIX}{ID}",
        "",
    ],
)
def test_any_other_name_is_refused_and_logged(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, "forklift.security"),
        pytest.raises(trust.Untrusted) as caught,
    ):
        trust.segment(name, ID, settings(), where="the array record")
    assert caught.value.check == "segment_name"
    assert str(caught.value).startswith("refused by the segment name check: segment ")
    assert "from the array record" in str(caught.value)
    assert any("security: refused by the segment_name check" in r.message for r in caplog.records)


@pytest.mark.parametrize("array_id", ["../../etc", ID.upper(), ID[:31], ID + "0", 7, None])
def test_array_ids_are_32_lowercase_hex(array_id: object) -> None:
    with pytest.raises(trust.Untrusted) as caught:
        trust.segment(f"{PREFIX}{array_id}", array_id, settings(), where="m")
    assert caught.value.check == "array_id"


def test_peer_urls_are_normalized_and_only_they_pass() -> None:
    s = settings(
        FORKLIFT_PEER_URLS="http://Host-1:8000/, https://h2.example/api",
        FORKLIFT_API_INTERNAL_URL="http://me:8000",
    )
    assert s.peer_urls == ("http://host-1:8000", "https://h2.example:443/api")
    for ok in ("http://host-1:8000", "HTTP://HOST-1:8000/", "https://h2.example:443/api/",
               "http://me:8000"):  # fmt: skip
        assert trust.peer_url(ok, s, where="r") == ok
    for bad in ("http://host-1:8001", "https://host-1:8000", "http://host-1:8000/other",
                "http://evil@host-1:8000", "http://host-1:8000?x=1", "file:///etc/passwd",
                "http://127.0.0.1:8000", "", "host-1:8000"):  # fmt: skip
        with pytest.raises(trust.Untrusted) as caught:
            trust.peer_url(bad, s, where="the record of array x")
        assert caught.value.check == "peer_url"


def test_without_peers_no_other_domain_is_read() -> None:
    s = settings(FORKLIFT_INTERNAL_TOKEN="t")
    with pytest.raises(replicas.PullError) as caught:
        replicas.source(ID, "elsewhere", "http://10.0.0.2:8000", s)
    assert caught.value.code == "untrusted"
    assert "FORKLIFT_PEER_URLS" in caught.value.message
    allowed = settings(FORKLIFT_INTERNAL_TOKEN="t", FORKLIFT_PEER_URLS="http://10.0.0.2:8000")
    source = replicas.source(ID, "elsewhere", "http://10.0.0.2:8000", allowed)
    assert source.url == f"http://10.0.0.2:8000/internal/arrays/{ID}"
    with pytest.raises(replicas.PullError, match="array id"):
        replicas.source("../../admin", "elsewhere", "http://10.0.0.2:8000", allowed)


def test_a_bad_peer_url_setting_stops_the_process() -> None:
    with pytest.raises(ValueError, match="FORKLIFT_PEER_URLS"):
        settings(FORKLIFT_PEER_URLS="ftp://h:21")


def test_the_redis_password_is_folded_into_the_url() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://h:6379/0", "FORKLIFT_REDIS_PASSWORD": "p@ss/w:rd"})
    assert s.redis_url == "redis://:p%40ss%2Fw%3Ard@h:6379/0"
    s = Settings.from_env({"REDIS_URL": "rediss://u@h:6380/1?ssl_cert_reqs=required",
                           "FORKLIFT_REDIS_PASSWORD": "pw"})  # fmt: skip
    assert s.redis_url == "rediss://u:pw@h:6380/1?ssl_cert_reqs=required"
    same = Settings.from_env({"REDIS_URL": "redis://:pw@h/0", "FORKLIFT_REDIS_PASSWORD": "pw"})
    assert same.redis_url == "redis://:pw@h/0"
    assert Settings.from_env({}).redis_url == "redis://127.0.0.1:6379/0"


def test_the_redis_password_may_come_from_a_secret_file(tmp_path: Path) -> None:
    (tmp_path / "forklift_redis_password").write_text("from-a-file\n")
    s = Settings.from_env({"FORKLIFT_SECRETS_DIR": str(tmp_path), "REDIS_URL": "redis://r/0"})
    assert s.redis_url == "redis://:from-a-file@r/0"
    assert "from-a-file" not in repr(s.redis_password)


def test_a_crafted_message_opens_nothing_outside_the_stack(tmp_path: Path) -> None:
    """A message (not a record) naming a decoy of another prefix as an input or as the
    in-place output: the worker's attach refuses before any open or mapping."""
    from types import SimpleNamespace

    from shared.schemas import ArrayRef
    from worker import runner

    decoy = Path("/dev/shm") / f"other_{uuid.uuid4().hex}"
    decoy.write_bytes(b"\0" * 4096)
    try:
        info = os.stat(decoy)
        os.utime(decoy, ns=(info.st_mtime_ns - 10**12, info.st_mtime_ns))
        atime = os.stat(decoy).st_atime_ns
        s = settings(FORKLIFT_SHM_DOMAIN="here")
        rt = SimpleNamespace(settings=s, redis=None)
        ref = ArrayRef(id=ID, segment=decoy.name, shape=(512,), dtype="<f8", nbytes=4096,
                       domain="here")  # fmt: skip
        with (
            pytest.raises(runner.JobFailure, match=r"^input 'a': refused by the segment name"),
            runner.attached({"a": ref}, rt),  # type: ignore[arg-type]
        ):
            pass
        with (
            pytest.raises(runner.JobFailure, match=r"^the job's output: refused by the segment"),
            runner.output_view(ref, rt),  # type: ignore[arg-type]
        ):
            pass
        assert os.stat(decoy).st_atime_ns == atime, "the decoy was mapped"
    finally:
        decoy.unlink()

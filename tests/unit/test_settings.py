"""Settings from the environment, a secrets directory and a `.env` file (shared/settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared import settings as settings_module
from shared.settings import Settings, SettingsFileError, with_env_file


def test_every_setting_is_read_from_its_prefixed_variable() -> None:
    settings = Settings.from_env(
        {
            "FORKLIFT_JOB_TTL": "120",
            "FORKLIFT_QUEUE": "q1",
            "FORKLIFT_CELERY_EVENTS": "true",
            "FORKLIFT_MAX_WAIT": "2.5",
            "JOB_TTL": "7",  # unprefixed: not a setting
        }
    )
    assert settings.job_ttl == 120
    assert settings.queue == "q1"
    assert settings.celery_events is True
    assert settings.max_wait == 2.5


def test_from_env_reads_only_the_mapping_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKLIFT_JOB_TTL", "99")
    assert Settings.from_env({}).job_ttl == 86400
    assert Settings.from_env().job_ttl == 99


def test_an_empty_value_means_the_default() -> None:
    settings = Settings.from_env({"FORKLIFT_JOB_TTL": "", "FORKLIFT_QUEUE": "", "REDIS_URL": ""})
    assert settings.job_ttl == 86400
    assert settings.queue == "forklift"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


def test_redis_url_alias_and_its_precedence() -> None:
    assert Settings.from_env({"REDIS_URL": "redis://a:1/0"}).redis_url == "redis://a:1/0"
    both = {"REDIS_URL": "redis://a:1/0", "FORKLIFT_REDIS_URL": "redis://b:2/0"}
    assert Settings.from_env(both).redis_url == "redis://b:2/0"
    empty_prefixed = {"REDIS_URL": "redis://a:1/0", "FORKLIFT_REDIS_URL": ""}
    assert Settings.from_env(empty_prefixed).redis_url == "redis://a:1/0"
    assert Settings(redis_url="redis://c:3/0").redis_url == "redis://c:3/0"  # by field name


def test_lists_are_comma_separated() -> None:
    settings = Settings.from_env(
        {"FORKLIFT_API_KEYS": " k1, k2 ,,", "FORKLIFT_JOB_MODULES": "a.jobs,b.jobs"}
    )
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert settings.job_modules == ("a.jobs", "b.jobs")
    assert settings.all_job_modules[-2:] == ("a.jobs", "b.jobs")


def test_secrets_dir_supplies_keys_and_tokens(tmp_path: Path) -> None:
    (tmp_path / "forklift_api_keys").write_text("s1,s2\n")
    (tmp_path / "FORKLIFT_INTERNAL_TOKEN").write_text("t0k3n\n")
    (tmp_path / "REDIS_URL").write_text("redis://secret:6379/1")
    (tmp_path / "unrelated").write_text("ignored")
    settings = Settings.from_env({"FORKLIFT_SECRETS_DIR": str(tmp_path)})
    assert [k.get_secret_value() for k in settings.api_keys] == ["s1", "s2"]
    assert settings.internal_token is not None
    assert settings.internal_token.get_secret_value() == "t0k3n"
    assert settings.redis_url == "redis://secret:6379/1"
    # The environment wins over a secret file.
    over = Settings.from_env({"FORKLIFT_SECRETS_DIR": str(tmp_path), "FORKLIFT_API_KEYS": "e1"})
    assert [k.get_secret_value() for k in over.api_keys] == ["e1"]


def test_kubernetes_secret_volume_layout(tmp_path: Path) -> None:
    """A mounted Secret: each key a symlink through `..data` to a timestamped folder."""
    version = tmp_path / "..2026_12_02_01_00_00.000000001"
    version.mkdir()
    (version / "forklift_api_keys").write_text("k8s-key")
    (tmp_path / "..data").symlink_to(version.name)
    (tmp_path / "forklift_api_keys").symlink_to("..data/forklift_api_keys")
    settings = Settings.from_env({"FORKLIFT_SECRETS_DIR": str(tmp_path)})
    assert [k.get_secret_value() for k in settings.api_keys] == ["k8s-key"]


def test_a_named_secrets_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsFileError, match="FORKLIFT_SECRETS_DIR"):
        Settings.from_env({"FORKLIFT_SECRETS_DIR": str(tmp_path / "missing")})


def test_default_secrets_dir_only_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "SECRETS_DIR", tmp_path / "run-secrets")
    assert settings_module.secrets_dir({}) is None
    assert Settings.from_env({}).internal_token is None
    (tmp_path / "run-secrets").mkdir()
    (tmp_path / "run-secrets" / "forklift_internal_token").write_text("from-default-dir")
    assert settings_module.secrets_dir({}) == tmp_path / "run-secrets"
    token = Settings.from_env({}).internal_token
    assert token is not None and token.get_secret_value() == "from-default-dir"


def test_env_file_fills_what_the_environment_leaves_unset(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# forklift up\n"
        "FORKLIFT_JOB_TTL=300\n"
        "FORKLIFT_QUEUE=from-file\n"
        "FORKLIFT_MAX_WAIT=5\n"
        "REDIS_URL=redis://file:6379/0\n"
        "OMP_NUM_THREADS=1\n"
    )
    env = {"FORKLIFT_QUEUE": "from-env", "FORKLIFT_MAX_WAIT": ""}
    settings = Settings.from_env(env, env_file=env_file)
    assert settings.job_ttl == 300
    assert settings.queue == "from-env"
    assert settings.max_wait == 5.0  # an empty variable is unset: the file's value
    assert settings.redis_url == "redis://file:6379/0"
    # The environment the launcher hands its children: the same values, other names kept.
    children = with_env_file(env, env_file)
    assert children["FORKLIFT_QUEUE"] == "from-env"
    assert children["FORKLIFT_JOB_TTL"] == "300"
    assert children["OMP_NUM_THREADS"] == "1"
    assert Settings.from_env(children) == settings
    # No file is read unless one is named.
    assert Settings.from_env(env).job_ttl == 86400


def test_a_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsFileError, match="no env file"):
        Settings.from_env({}, env_file=tmp_path / "nope.env")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FORKLIFT_MAX_UPLOAD_BYTES", "-1", "greater than 0"),
        ("FORKLIFT_JOB_TTL", "soon", "valid integer"),
        ("FORKLIFT_LOG_FORMAT", "xml", "should match pattern"),
        ("FORKLIFT_SHM_POOL_BYTES", "-2", "greater than or equal to -1"),
        ("FORKLIFT_WORKER_CONCURRENCY", "0", "greater than or equal to 1"),
    ],
)
def test_a_bad_value_fails_naming_its_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings.from_env({variable: value})
    errors = caught.value.errors()
    assert [e["loc"] for e in errors] == [(variable,)], errors
    assert message in errors[0]["msg"]
    assert variable in str(caught.value) and repr(value) in str(caught.value)


def test_a_bad_value_in_a_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "forklift_job_ttl").write_text("-5")
    with pytest.raises(ValidationError, match="FORKLIFT_JOB_TTL"):
        Settings.from_env({"FORKLIFT_SECRETS_DIR": str(tmp_path)})


def test_settings_stay_frozen_and_keep_their_derived_values() -> None:
    settings = Settings.from_env({"FORKLIFT_SHM_LIMIT_BYTES": "1000", "FORKLIFT_API_KEYS": "k"})
    assert settings.key_upload_bytes_limit == 500
    assert settings.shm_pool_limit == 250
    assert settings.keys.job("x") == "forklift:job:x"
    assert settings.domain_queue("d") == "forklift.d"
    with pytest.raises(ValidationError):
        settings.queue = "other"  # type: ignore[misc]

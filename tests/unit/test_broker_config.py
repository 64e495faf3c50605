"""FORKLIFT_BROKER_URL: which transport Celery gets, and what differs on AMQP (issue 18, item 2)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from api.enqueue import broker_priority
from forklift import launcher
from forklift.cli import cli
from shared.celery_app import AMQP_MAX_PRIORITY, amqp_queue_arguments, celery_config
from shared.schemas import MAX_PRIORITY
from shared.settings import Settings

AMQP = "amqp://user:s3cret@rabbit:5672/vh"


def test_the_broker_is_the_redis_by_default_password_included() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://r:6379/0", "FORKLIFT_REDIS_PASSWORD": "pw"})
    assert settings.broker == "redis://:pw@r:6379/0" and not settings.broker_is_amqp
    config = celery_config(settings)
    assert config["broker_url"] == config["result_backend"] == "redis://:pw@r:6379/0"
    assert "task_queue_max_priority" not in config  # Redis: kombu's priority lists, as before
    assert "priority_steps" in config["broker_transport_options"]  # type: ignore[operator]


def test_an_amqp_broker_gets_priority_queues_and_confirms_records_stay_in_redis() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://r:6379/0", "FORKLIFT_BROKER_URL": AMQP})
    assert settings.broker == AMQP and settings.broker_is_amqp
    config = celery_config(settings)
    assert config["broker_url"] == AMQP
    assert config["result_backend"] == "redis://r:6379/0"
    assert config["task_ignore_result"] is True
    assert config["task_queue_max_priority"] == AMQP_MAX_PRIORITY == MAX_PRIORITY
    assert amqp_queue_arguments(settings) == {"x-max-priority": MAX_PRIORITY}
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["task_acks_late"] is True and config["task_reject_on_worker_lost"] is True


def test_every_declarer_gives_the_queues_the_same_max_priority() -> None:
    """The common queue, a worker's domain queue (select_add) and a queue the API creates
    on its first publish all get x-max-priority: RabbitMQ refuses a mismatch."""
    from shared.celery_app import create_app

    settings = Settings.from_env({"FORKLIFT_BROKER_URL": AMQP, "FORKLIFT_QUEUE": "q"})
    app = create_app(settings)
    queues = app.amqp.queues
    queues.select_add(settings.domain_queue("d1"))
    created = queues[settings.domain_queue("d2")]  # missing: created as the API would
    for queue in (queues["q"], queues["q.d1"], created):
        assert queue.queue_arguments == {"x-max-priority": MAX_PRIORITY}, queue.name


@pytest.mark.parametrize("p", range(MAX_PRIORITY + 1))
def test_broker_priority_is_reversed_on_redis_and_the_identity_on_amqp(p: int) -> None:
    assert broker_priority(p) == MAX_PRIORITY - p
    assert broker_priority(p, amqp=True) == p


def test_a_bad_broker_url_is_refused_without_showing_its_password() -> None:
    with pytest.raises(ValidationError) as info:
        Settings.from_env({"FORKLIFT_BROKER_URL": "http://user:hunter2@x/"})
    text = str(info.value)
    assert "FORKLIFT_BROKER_URL" in text and "hunter2" not in text


def test_forklift_up_takes_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[launcher.UpOptions] = []
    monkeypatch.setattr(launcher, "run", lambda options: seen.append(options) or 0)
    result = CliRunner().invoke(cli, ["up", "--broker", AMQP])
    assert result.exit_code == 0, result.output
    assert seen[0].broker == AMQP
    assert "--broker" in CliRunner().invoke(cli, ["up", "--help"]).output

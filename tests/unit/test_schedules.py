"""The schedules' time rules (shared/schedules.py): cron's next time at fixed instants, the
`every` grid, and the catch-up rule (missed ticks give one run, then the regular times)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.schedules import CronError, first_run, following, next_cron, parse_cron
from shared.schemas import ScheduleSpec


def _t(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _next(expression: str, after: str) -> str:
    at = next_cron(parse_cron(expression), _t(after))
    assert at is not None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S %a")


def test_every_quarter_hour() -> None:
    assert _next("*/15 * * * *", "2026-12-02 06:07:30") == "2026-12-02 06:15:00 Wed"
    # strictly after: a time on the minute gives the next one
    assert _next("*/15 * * * *", "2026-12-02 06:15:00") == "2026-12-02 06:30:00 Wed"
    assert _next("*/15 * * * *", "2026-12-31 23:59:59") == "2027-01-01 00:00:00 Fri"


def test_weekdays_at_nine() -> None:
    assert _next("0 9 * * 1-5", "2026-12-02 08:59:59") == "2026-12-02 09:00:00 Wed"
    assert _next("0 9 * * 1-5", "2026-12-02 09:00:00") == "2026-12-03 09:00:00 Thu"
    assert _next("0 9 * * 1-5", "2026-12-04 10:00:00") == "2026-12-07 09:00:00 Mon"
    assert _next("0 9 * * mon-fri", "2026-12-05 08:00:00") == "2026-12-07 09:00:00 Mon"


def test_months_days_and_sunday() -> None:
    assert _next("30 2 29 2 *", "2026-03-01 00:00:00") == "2028-02-29 02:30:00 Tue"
    assert _next("0 0 * * 0", "2026-12-02 00:00:00") == "2026-12-06 00:00:00 Sun"
    assert _next("5,10 */6 1 jan,jul *", "2026-12-02 00:00:00") == "2027-01-01 00:05:00 Fri"
    # day-of-month and day-of-week must both match (Celery's rule): a Friday the 13th
    assert _next("0 0 13 * 5", "2026-12-02 00:00:00") == "2027-08-13 00:00:00 Fri"


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("* * * *", "5 fields"),
        ("* * * * * *", "5 fields"),
        ("61 * * * *", "61 > 59"),
        ("*/0 * * * *", "step cannot be zero"),
        ("* 24 * * *", "24 > 23"),
        ("* * 0 * *", "0 < 1"),
        ("* * * 13 *", "13 > 12"),
        ("* * * * 7", "7 > 6"),
        ("x * * * *", "'x'"),
        ("1,,2 * * * *", "empty part"),
        ("0 0 31 2 *", "never occurs"),
        ("0 0 30 2 1", "never"),
    ],
)
def test_bad_expressions(expression: str, says: str) -> None:
    with pytest.raises(CronError, match=says):
        parse_cron(expression)


def test_every_keeps_its_grid_and_catches_up_once() -> None:
    spec = ScheduleSpec(task="fib", every=2)
    assert first_run(spec, 1000.0) == 1002.0
    # fired on time, or a little late: the next tick of the grid
    assert following(spec, 1002.0, 1002.0) == 1004.0
    assert following(spec, 1002.0, 1002.3) == 1004.0
    # an hour of missed ticks: this one run, then the first grid time after now
    assert following(spec, 1002.0, 4602.5) == 4604.0
    assert following(spec, 1002.0, 4604.0) == 4606.0


def test_cron_catches_up_once() -> None:
    spec = ScheduleSpec(task="fib", cron="*/15 * * * *")
    assert first_run(spec, _t("2026-12-02 06:07:30")) == _t("2026-12-02 06:15:00")
    # the 06:15 tick fired three days late: the next is the first quarter after now
    assert following(spec, _t("2026-12-02 06:15:00"), _t("2026-12-05 10:01:00")) == _t(
        "2026-12-05 10:15:00"
    )

"""celeriac.schedules against Celery's own: the same answers from ``is_due`` and
``remaining_estimate`` for the same schedules, times and time zones; the crontab
forms Celery accepts; clear errors for what it cannot run."""

from __future__ import annotations

import datetime
import random
import subprocess
import sys
from typing import Any

import pytest
from celeriac import Celeriac
from celeriac.exceptions import ImproperlyConfigured
from celeriac.schedules import (
    ParseException,
    crontab,
    crontab_parser,
    maybe_schedule,
    schedule,
    solar,
)
from celery import Celery
from celery import schedules as celery_schedules

UTC = datetime.timezone.utc

CRONTABS: list[dict[str, Any]] = [
    {"minute": "*/15"},
    {"minute": 0, "hour": "*/3"},
    {"minute": 30, "hour": 7, "day_of_week": "mon-fri"},
    {"minute": 0, "hour": 0, "day_of_month": "1", "month_of_year": "*/3"},
    {"minute": "1,13,30-45,50-59/2"},
    {"minute": 5, "hour": 4, "day_of_month": "29", "month_of_year": "2"},
    {"minute": 0, "hour": 12, "day_of_week": "sat,sun"},
    {"minute": "*", "hour": "8-17/2"},
    {"minute": 0, "hour": 0, "day_of_week": "fri-mon"},
    {"minute": 10, "hour": 3, "day_of_month": "1-7", "day_of_week": "mon"},
    {"minute": [0, 20, 40], "hour": {9, 21}, "month_of_year": "jan-mar,oct"},
    {"minute": "0", "hour": "23", "day_of_month": "28-31"},
]


def apps(zone: str) -> tuple[Celery, Celeriac]:
    theirs = Celery(set_as_current=False)
    theirs.conf.timezone = zone
    ours = Celeriac("schedules", set_as_current=False)
    ours.conf.timezone = zone
    return theirs, ours


def samples(seed: int, count: int) -> list[tuple[datetime.datetime, datetime.datetime]]:
    """(last run, now) pairs across three years, from a second to months apart."""
    pick = random.Random(seed)
    start = datetime.datetime(2024, 1, 1, tzinfo=UTC)
    pairs = []
    for _ in range(count):
        last = start + datetime.timedelta(seconds=pick.randrange(3 * 365 * 86400))
        gap = pick.choice([1, 59, 600, 3600, 86400, 40 * 86400, pick.randrange(1, 200 * 86400)])
        pairs.append((last, last + datetime.timedelta(seconds=gap)))
    return pairs


def same_answers(theirs: Any, ours: Any, last: datetime.datetime) -> None:
    expected, got = theirs.remaining_estimate(last), ours.remaining_estimate(last)
    assert abs((expected - got).total_seconds()) < 1e-6, (theirs, last, expected, got)
    their_due, ours_due = theirs.is_due(last), ours.is_due(last)
    assert bool(their_due[0]) == ours_due[0], (theirs, last)
    assert abs(float(their_due[1]) - ours_due[1]) < 1e-6, (theirs, last, their_due, ours_due)


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/New_York", "Europe/Paris"])
@pytest.mark.parametrize("fields", CRONTABS, ids=str)
def test_crontab_answers_as_celery_does(zone: str, fields: dict[str, Any]) -> None:
    their_app, our_app = apps(zone)
    for last, now in samples(hash((zone, str(fields))) & 0xFFFF, 150):
        theirs = celery_schedules.crontab(app=their_app, nowfun=lambda now=now: now, **fields)
        ours = crontab(app=our_app, nowfun=lambda now=now: now, **fields)
        same_answers(theirs, ours, last)


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("zone", ["Europe/Paris", "Asia/Kolkata"])
@pytest.mark.parametrize("every", [1, 30.5, 90, datetime.timedelta(minutes=5), 7200, 86400])
def test_interval_answers_as_celery_does(every: Any, zone: str, relative: bool) -> None:
    their_app, our_app = apps(zone)
    for last, now in samples(7, 150):
        last = last.astimezone(our_app.timezone)  # as beat gives it: in the app's zone
        theirs = celery_schedules.schedule(every, relative, lambda now=now: now, their_app)
        ours = schedule(every, relative, lambda now=now: now, our_app)
        same_answers(theirs, ours, last)


def test_a_missed_period_is_one_catch_up_run_then_the_period() -> None:
    now = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    every_minute = schedule(60, nowfun=lambda: now, app=apps("UTC")[1])
    # Down for an hour: due once, and the next check is a whole period from now.
    assert every_minute.is_due(now - datetime.timedelta(hours=1)) == (True, 60.0)
    assert every_minute.is_due(now - datetime.timedelta(seconds=20)) == (False, 40.0)


def test_beat_cron_starting_deadline_skips_a_stale_run() -> None:
    their_app, our_app = apps("UTC")
    for app in (their_app, our_app):
        app.conf.beat_cron_starting_deadline = 120
    now = datetime.datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    last = datetime.datetime(2026, 3, 1, 9, 0, tzinfo=UTC)  # missed the 10:00 run
    for fields in ({"minute": 0}, {"minute": 29}):
        theirs = celery_schedules.crontab(app=their_app, nowfun=lambda: now, **fields)
        ours = crontab(app=our_app, nowfun=lambda: now, **fields)
        same_answers(theirs, ours, last)
    assert not crontab(app=our_app, nowfun=lambda: now, minute=0).is_due(last).is_due
    assert crontab(app=our_app, nowfun=lambda: now, minute=29).is_due(last).is_due


def test_nowfun_and_naive_times() -> None:
    now = datetime.datetime(2026, 1, 5, 7, 29, 30, tzinfo=UTC)  # a Monday
    every_weekday = crontab(minute=30, hour=7, day_of_week="mon-fri", nowfun=lambda: now,
                            app=apps("UTC")[1])  # fmt: skip
    naive_last = datetime.datetime(2026, 1, 2, 7, 30)  # Friday's run, naive: UTC
    assert every_weekday.remaining_estimate(naive_last) == datetime.timedelta(seconds=30)
    assert every_weekday.is_due(naive_last) == (False, 30.0)


@pytest.mark.parametrize(
    ("spec", "size", "low", "expected"),
    [
        ("*/15", 60, 0, {0, 15, 30, 45}),
        ("*/4", 24, 0, {0, 4, 8, 12, 16, 20}),
        ("*", 7, 0, set(range(7))),
        ("*/3", 31, 1, {1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31}),
        ("2-12/2", 12, 1, {2, 4, 6, 8, 10, 12}),
        ("1,13,30-45,50-59/2", 60, 0,
         {1, 13, *range(30, 46), 50, 52, 54, 56, 58}),
        ("mon-fri", 7, 0, {1, 2, 3, 4, 5}),
        ("fri-mon", 7, 0, {5, 6, 0, 1}),
        ("sunday,saturday", 7, 0, {0, 6}),
        ("jan-mar", 12, 1, {1, 2, 3}),
        ("5/20", 60, 0, {5, 25, 45}),
    ],
)  # fmt: skip
def test_crontab_parser_reads_celery_forms(
    spec: str, size: int, low: int, expected: set[int]
) -> None:
    assert crontab_parser(size, low).parse(spec) == expected
    if "/" not in spec or not spec.split("/")[0].isdigit():
        assert celery_schedules.crontab_parser(size, low).parse(spec) == expected


def test_crontab_from_string() -> None:
    app = apps("UTC")[1]
    made = crontab.from_string("*/5 4 1-7 jan,jul mon")
    made.app = app
    assert made == crontab(minute="*/5", hour=4, day_of_month="1-7", month_of_year="jan,jul",
                           day_of_week="mon")  # fmt: skip
    assert repr(made) == "<crontab: */5 4 1-7 jan,jul mon (m/h/dM/MY/d)>"
    with pytest.raises(ParseException, match="expected 5 fields"):
        crontab.from_string("* * *")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"minute": "*/0"}, "the step must be positive"),
        ({"minute": "60"}, "minute: .*60 is out of range 0-59"),
        ({"hour": 24}, "hour: 24 is out of range 0-23"),
        ({"day_of_week": "funday"}, "'funday' is not a number, a day or a month"),
        ({"day_of_month": "0"}, "out of range 1-31"),
        ({"month_of_year": "13"}, "out of range 1-12"),
        ({"minute": "1,,2"}, "an empty part"),
        ({"minute": "-5"}, "cannot read '-5'"),
        ({"minute": "*/x"}, "the step 'x' is not a number"),
        ({"day_of_month": 30, "month_of_year": 2}, "never occurs"),
        ({"minute": 1.5}, "expected an int, a str or ints"),
        ({"minute": ["1"]}, "not an int"),
        ({"minute": []}, "matches nothing"),
    ],
)
def test_invalid_crontab_fields_are_clear_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        crontab(**fields)


@pytest.mark.parametrize("bad", [-1, 0, datetime.timedelta(seconds=-5), float("nan")])
def test_a_negative_or_zero_interval_is_an_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="invalid schedule interval"):
        schedule(bad)
    with pytest.raises(ValueError):
        maybe_schedule(bad)


def test_maybe_schedule_takes_numbers_timedeltas_and_schedules() -> None:
    app = apps("UTC")[1]
    assert maybe_schedule(10, app=app) == schedule(10)
    assert maybe_schedule(datetime.timedelta(seconds=10), app=app) == schedule(10)
    cron = crontab(minute=1)
    assert maybe_schedule(cron, app=app) is cron and cron.app is app
    with pytest.raises(TypeError, match="a schedule must be"):
        maybe_schedule("10")


@pytest.mark.parametrize("event", ["sunrise", "sunset", "solar_noon", "dawn_civil",
                                   "dusk_astronomical"])  # fmt: skip
@pytest.mark.parametrize(("lat", "lon"), [(48.85, 2.35), (-33.87, 151.21), (78.2, 15.6)])
def test_solar_answers_as_celery_does(event: str, lat: float, lon: float) -> None:
    their_app, our_app = apps("UTC")
    for last, now in samples(3, 20):
        theirs = celery_schedules.solar(event, lat, lon, app=their_app, nowfun=lambda now=now: now)
        ours = solar(event, lat, lon, app=our_app, nowfun=lambda now=now: now)
        same_answers(theirs, ours, last)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("moonrise", 0, 0), "invalid solar event 'moonrise'"),
        (("sunset", 91, 0), "invalid latitude 91"),
        (("sunset", 0, -181), "invalid longitude -181"),
    ],
)
def test_invalid_solar_arguments(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        solar(*args)


def test_solar_without_ephem_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['ephem'] = None\n"
        "from celeriac.schedules import solar\n"
        "solar('sunset', 48.85, 2.35)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "ImproperlyConfigured: solar schedules need the 'ephem' package" in result.stderr
    assert "pip install 'celeriac[solar]'" in result.stderr
    assert ImproperlyConfigured.__name__ in result.stderr


def test_add_periodic_task_fills_beat_schedule() -> None:
    app = Celeriac("periodic", set_as_current=False)
    seen: list[Any] = []

    @app.on_after_configure.connect
    def setup(sender: Celeriac, **kwargs: Any) -> None:
        seen.append(sender)
        sender.add_periodic_task(10.0, "periodic.add", (1, 2), name="add every 10")
        sender.add_periodic_task(
            crontab(minute=0),
            {"task": "periodic.mul", "args": (2,), "kwargs": {}, "options": {"queue": "q"}},
            (3,),
            priority=5,
        )

    app.finalize()
    app.finalize()  # sent once
    assert seen == [app]
    entries = app.conf.beat_schedule
    assert entries["add every 10"] == {"schedule": 10.0, "task": "periodic.add",
                                       "args": (1, 2), "kwargs": {}, "options": {}}  # fmt: skip
    assert entries["periodic.mul(2, 3)"]["options"] == {"queue": "q", "priority": 5}
    with pytest.raises(ValueError, match="invalid schedule interval"):
        app.add_periodic_task(-1, "periodic.add")
    with pytest.raises(TypeError, match="expected a signature, a task or a task name"):
        app.add_periodic_task(1, 42)

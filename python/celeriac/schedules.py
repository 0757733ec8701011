"""When periodic tasks run: Celery's schedule types, with Celery's semantics.

- :class:`schedule`: every ``run_every`` (a ``timedelta`` or seconds). A number or a
  ``timedelta`` in ``beat_schedule`` becomes one of these.
- :class:`crontab`: cron's five fields (``minute``, ``hour``, ``day_of_week``,
  ``day_of_month``, ``month_of_year``), each an int, a set/list of ints or a pattern
  (``"*/15"``, ``"1,13,30-45,50-59/2"``, ``"mon-fri"``, ``"jan-mar"``), evaluated in
  the app's time zone (``timezone``).
- :class:`solar`: sunrise, sunset, dawn and dusk at a place; needs the optional
  ``ephem`` package (``pip install celeriac[solar]``).

Each answers ``is_due(last_run_at) -> (is_due, next)``: whether a run is due now and
how many seconds until the next check, and ``remaining_estimate(last_run_at)``: the
time from now until the run after ``last_run_at`` (negative when overdue). As in
Celery, a schedule that missed several runs (beat was down) is due once, and the
next run counts from then.

Unlike Celery, a negative or zero interval and a crontab day that never occurs are
errors when the schedule is made, not a beat that spins or stops.
"""

from __future__ import annotations

import calendar
import datetime
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = [
    "BaseSchedule",
    "ParseException",
    "crontab",
    "crontab_parser",
    "maybe_schedule",
    "schedstate",
    "schedule",
    "solar",
]

_UTC = datetime.timezone.utc
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun",
                "jul", "aug", "sep", "oct", "nov", "dec")  # fmt: skip
#: The longest each month can be (February of a leap year).
_LONGEST_MONTH = {month: calendar.monthrange(2000, month)[1] for month in range(1, 13)}


class schedstate(NamedTuple):
    """``is_due``'s answer: run now or not, and seconds until the next check."""

    is_due: bool
    next: float


class ParseException(ValueError):
    """A crontab pattern that cannot be read."""


class BaseSchedule:
    """What the schedules share: the clock (``nowfun`` or the app's) and time zone."""

    def __init__(
        self, nowfun: Callable[[], datetime.datetime] | None = None, app: Celeriac | None = None
    ) -> None:
        self.nowfun = nowfun
        self._app = app

    @property
    def app(self) -> Celeriac:
        if self._app is not None:
            return self._app
        from celeriac.local import get_current_app

        return get_current_app()

    @app.setter
    def app(self, app: Celeriac | None) -> None:
        self._app = app

    @property
    def tz(self) -> datetime.tzinfo:
        return self.app.timezone

    @property
    def utc_enabled(self) -> bool:
        return bool(self.app.conf["enable_utc"])

    def now(self) -> datetime.datetime:
        return self.nowfun() if self.nowfun is not None else self.app.now()

    def maybe_make_aware(self, dt: datetime.datetime) -> datetime.datetime:
        """A naive time is taken as UTC (Celery's rule), then shown in our zone."""
        if dt.tzinfo is None or dt.utcoffset() is None:
            return dt.replace(tzinfo=_UTC).astimezone(self.tz)
        return dt

    def remaining_estimate(self, last_run_at: datetime.datetime) -> datetime.timedelta:
        raise NotImplementedError

    def is_due(self, last_run_at: datetime.datetime) -> schedstate:
        """Due when the run after ``last_run_at`` is not in the future; the next check
        is then in one period (from now), else when that run comes."""
        remaining = self.remaining_estimate(last_run_at).total_seconds()
        if remaining > 0:
            return schedstate(False, remaining)
        return schedstate(True, max(self.remaining_estimate(self.now()).total_seconds(), 0.0))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BaseSchedule):
            return other.nowfun == self.nowfun
        return NotImplemented

    def __hash__(self) -> int:
        return hash(type(self))


def _elapsed(later: datetime.datetime, earlier: datetime.datetime) -> datetime.timedelta:
    """Real time between two aware datetimes (Python subtracts wall clocks when both
    share one tzinfo, which is wrong across a DST change)."""
    return later.astimezone(_UTC) - earlier.astimezone(_UTC)


class schedule(BaseSchedule):
    """Every ``run_every`` (a ``timedelta`` or seconds; it must be positive).

    With ``relative=True`` the run time is rounded down to the resolution of the
    interval (whole days, hours, minutes or seconds, in the zone of ``last_run_at``;
    beat gives it in the app's), as in Celery.
    """

    def __init__(
        self,
        run_every: float | datetime.timedelta | None = None,
        relative: bool = False,
        nowfun: Callable[[], datetime.datetime] | None = None,
        app: Celeriac | None = None,
    ) -> None:
        self.run_every = _interval(run_every)
        self.relative = relative
        super().__init__(nowfun, app)

    @property
    def seconds(self) -> float:
        return self.run_every.total_seconds()

    @property
    def human_seconds(self) -> str:
        return _humanize(self.seconds)

    def remaining_estimate(self, last_run_at: datetime.datetime) -> datetime.timedelta:
        start = self.maybe_make_aware(last_run_at)
        # Rounded (relative=True) in the zone of the time given, as Celery does.
        end = (start.astimezone(_UTC) + self.run_every).astimezone(start.tzinfo)
        if self.relative:
            end = _round_down(end, self.run_every, after=start)
        return _elapsed(end, self.maybe_make_aware(self.now()))

    def is_due(self, last_run_at: datetime.datetime) -> schedstate:
        remaining = self.remaining_estimate(last_run_at).total_seconds()
        if remaining > 0:
            return schedstate(False, remaining)
        following = self.seconds
        if self.relative:
            # The next rounded time after now, in the zone of the time given.
            zone = self.maybe_make_aware(last_run_at).tzinfo
            now = self.maybe_make_aware(self.now()).astimezone(zone)
            following = self.remaining_estimate(now).total_seconds()
            if following <= 0:
                following = self.seconds
        return schedstate(True, following)

    def __repr__(self) -> str:
        return f"<freq: {self.human_seconds}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, schedule):
            return self.run_every == other.run_every and self.relative == other.relative
        return self.run_every == other

    def __hash__(self) -> int:
        return hash(self.run_every)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.run_every, self.relative, self.nowfun)


def _interval(value: Any) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        interval = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"invalid schedule interval {value!r}: must be a finite number")
        interval = datetime.timedelta(seconds=value)
    else:
        raise TypeError(
            f"a schedule interval must be a timedelta or a number of seconds, not "
            f"{type(value).__name__}"
        )
    if interval <= datetime.timedelta(0):
        raise ValueError(
            f"invalid schedule interval {value!r}: it must be positive (a task cannot "
            "run every 0 seconds or less)"
        )
    return interval


def _round_down(
    end: datetime.datetime, step: datetime.timedelta, *, after: datetime.datetime
) -> datetime.datetime:
    """``end`` rounded down to the resolution of ``step``, but later than ``after``."""
    if step >= datetime.timedelta(days=1):
        rounded, unit = end.replace(hour=0, minute=0, second=0, microsecond=0), "days"
    elif step >= datetime.timedelta(hours=1):
        rounded, unit = end.replace(minute=0, second=0, microsecond=0), "hours"
    elif step >= datetime.timedelta(minutes=1):
        rounded, unit = end.replace(second=0, microsecond=0), "minutes"
    else:
        rounded, unit = end.replace(microsecond=0), "seconds"
    if _elapsed(rounded, after) <= datetime.timedelta(0):
        rounded = rounded + datetime.timedelta(**{unit: 1})
    return rounded


def _humanize(seconds: float) -> str:
    for unit, size in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0)):
        if seconds >= size:
            amount = seconds / size
            return f"every {amount:.2f} {unit}{'s' if amount != 1 else ''}"
    return f"every {seconds:.2f} seconds" if seconds != 1 else "every second"


# -- crontab -------------------------------------------------------------------------

_PART = re.compile(r"^(?:(?P<star>\*)|(?P<low>\w+)(?:-(?P<high>\w+))?)(?:/(?P<step>\w*))?$")


class crontab_parser:
    """Reads one crontab field: ``*``, ``N``, ``N-M`` (wrapping past the maximum, as
    ``fri-mon``), any of them with ``/STEP``, and comma-separated lists of those.
    Names of days (``sun``..``sat``) and months (``jan``..``dec``) count as numbers.
    ``crontab_parser(60).parse("*/15") == {0, 15, 30, 45}``; fields that start at 1
    (days of the month, months) use ``crontab_parser(31, 1)``."""

    ParseException = ParseException

    def __init__(self, max_: int = 60, min_: int = 0) -> None:
        self.max_ = max_
        self.min_ = min_

    def parse(self, spec: str) -> set[int]:
        values: set[int] = set()
        for part in spec.split(","):
            values.update(self._part(part.strip(), spec))
        return values

    def _part(self, part: str, spec: str) -> list[int]:
        if not part:
            raise ParseException(f"invalid crontab pattern {spec!r}: an empty part")
        found = _PART.match(part)
        if found is None:
            raise ParseException(f"invalid crontab pattern {spec!r}: cannot read {part!r}")
        if found["star"]:
            values = list(range(self.min_, self.min_ + self.max_))
        else:
            low = self._number(found["low"], spec)
            high = self._number(found["high"], spec) if found["high"] else None
            if high is None:
                values = [low]
            elif high >= low:
                values = list(range(low, high + 1))
            else:  # wraps around, e.g. fri-mon
                values = [*range(low, self.min_ + self.max_), *range(self.min_, high + 1)]
        step_text = found["step"]
        if step_text is None:
            return values
        if found["high"] is None and not found["star"]:
            # "5/15" means 5, 20, 35, 50 in cron: from 5 to the end.
            values = list(range(values[0], self.min_ + self.max_))
        try:
            step = int(step_text)
        except ValueError:
            raise ParseException(
                f"invalid crontab pattern {spec!r}: the step {step_text!r} is not a number"
            ) from None
        if step <= 0:
            raise ParseException(f"invalid crontab pattern {spec!r}: the step must be positive")
        return values[::step]

    def _number(self, text: str, spec: str) -> int:
        if text.isdigit():
            value = int(text)
        else:
            name = text[:3].lower()
            if name in _MONTH_NAMES:
                value = _MONTH_NAMES.index(name) + 1
            elif name in _DAY_NAMES:
                value = _DAY_NAMES.index(name)
            else:
                raise ParseException(
                    f"invalid crontab pattern {spec!r}: {text!r} is not a number, a day or "
                    "a month name"
                )
        highest = self.min_ + self.max_ - 1
        if not self.min_ <= value <= highest:
            raise ParseException(
                f"invalid crontab pattern {spec!r}: {value} is out of range {self.min_}-{highest}"
            )
        return value


Cronspec = int | str | Iterable[int]


class crontab(BaseSchedule):
    """A cron-like schedule: runs at every minute that matches all five fields, in the
    app's time zone. ``day_of_week``: 0 or ``sun`` is Sunday. A day must match both
    the day of the month and the day of the week (as in Celery, not cron's "either").

    ``crontab(minute="*/15")``, ``crontab(hour=7, minute=30, day_of_week="mon-fri")``,
    ``crontab(0, 0, day_of_month="1", month_of_year="*/3")``,
    ``crontab.from_string("0 4 * * *")``.
    """

    def __init__(
        self,
        minute: Cronspec = "*",
        hour: Cronspec = "*",
        day_of_week: Cronspec = "*",
        day_of_month: Cronspec = "*",
        month_of_year: Cronspec = "*",
        **kwargs: Any,
    ) -> None:
        self._orig_minute = minute
        self._orig_hour = hour
        self._orig_day_of_week = day_of_week
        self._orig_day_of_month = day_of_month
        self._orig_month_of_year = month_of_year
        self._orig_kwargs = kwargs
        self.minute = self._expand("minute", minute, 60)
        self.hour = self._expand("hour", hour, 24)
        self.day_of_week = self._expand("day_of_week", day_of_week, 7)
        self.day_of_month = self._expand("day_of_month", day_of_month, 31, 1)
        self.month_of_year = self._expand("month_of_year", month_of_year, 12, 1)
        if not any(
            day <= _LONGEST_MONTH[month]
            for month in self.month_of_year
            for day in self.day_of_month
        ):
            raise ValueError(
                f"invalid crontab: day_of_month {day_of_month!r} never occurs in "
                f"month_of_year {month_of_year!r}"
            )
        super().__init__(**kwargs)
        # Sorted once: the search for the next run walks them in order.
        self._minutes = sorted(self.minute)
        self._hours = sorted(self.hour)

    @classmethod
    def from_string(cls, crontab: str) -> crontab:
        """``"m h dom mon dow"``, as in a crontab file."""
        fields = crontab.split()
        if len(fields) != 5:
            raise ParseException(
                f"invalid crontab {crontab!r}: expected 5 fields (minute hour day_of_month "
                f"month_of_year day_of_week), got {len(fields)}"
            )
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        return cls(minute, hour, day_of_week, day_of_month, month_of_year)

    @staticmethod
    def _expand(field: str, spec: Any, size: int, low: int = 0) -> set[int]:
        if isinstance(spec, bool):
            raise TypeError(f"crontab {field}: expected an int, a str or ints, not a bool")
        if isinstance(spec, int):
            values = {spec}
        elif isinstance(spec, str):
            try:
                values = crontab_parser(size, low).parse(spec)
            except ParseException as exc:
                raise ParseException(f"crontab {field}: {exc}") from None
        elif isinstance(spec, Iterable):
            values = set(spec)
            if not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
                raise TypeError(f"crontab {field}: {spec!r} holds something that is not an int")
        else:
            raise TypeError(
                f"crontab {field}: expected an int, a str or ints, not {type(spec).__name__}"
            )
        if not values:
            raise ValueError(f"crontab {field}: {spec!r} matches nothing")
        for value in values:
            if not low <= value < low + size:
                raise ValueError(f"crontab {field}: {value} is out of range {low}-{low + size - 1}")
        return values

    def _day_matches(self, day: datetime.date) -> bool:
        return (
            day.month in self.month_of_year
            and day.day in self.day_of_month
            and day.isoweekday() % 7 in self.day_of_week
        )

    def next_run_after(self, last_run_at: datetime.datetime) -> datetime.datetime:
        """The first matching minute after the minute of ``last_run_at``, aware, in
        the app's time zone."""
        last = self.maybe_make_aware(last_run_at).astimezone(self.tz)
        day = last.date()
        if self._day_matches(day):
            for hour in self._hours:
                if hour < last.hour:
                    continue
                for minute in self._minutes:
                    if hour > last.hour or minute > last.minute:
                        return self._at(day, hour, minute)
        # The day of an entry that never matches was refused at construction; the
        # longest wait for one that does is 29 Feb on a given weekday (28 years).
        for _ in range(366 * 29):
            day += datetime.timedelta(days=1)
            if self._day_matches(day):
                return self._at(day, self._hours[0], self._minutes[0])
        raise ValueError(f"{self!r} does not run in the next 29 years")

    def _at(self, day: datetime.date, hour: int, minute: int) -> datetime.datetime:
        wall = datetime.datetime(day.year, day.month, day.day, hour, minute, tzinfo=self.tz)
        # A wall time skipped by a DST change runs at the moment the clocks moved.
        return wall.astimezone(_UTC).astimezone(self.tz)

    def remaining_estimate(self, last_run_at: datetime.datetime) -> datetime.timedelta:
        return _elapsed(self.next_run_after(last_run_at), self.maybe_make_aware(self.now()))

    def is_due(self, last_run_at: datetime.datetime) -> schedstate:
        """As :meth:`BaseSchedule.is_due`; with ``beat_cron_starting_deadline`` (seconds),
        a missed run older than that is skipped rather than caught up."""
        remaining = self.remaining_estimate(last_run_at).total_seconds()
        due = remaining <= 0
        deadline = self.app.conf.get("beat_cron_starting_deadline")
        if due and deadline is not None and remaining < 0:
            now = self.maybe_make_aware(self.now())
            since = now - datetime.timedelta(seconds=deadline, microseconds=1)
            if self.remaining_estimate(since).total_seconds() > 0:
                due = False  # no run fell within the deadline: too late to catch up
        if due or remaining <= 0:
            remaining = self.remaining_estimate(self.now()).total_seconds()
        return schedstate(due, max(remaining, 0.0))

    def __repr__(self) -> str:
        return (
            f"<crontab: {self._orig_minute} {self._orig_hour} {self._orig_day_of_month} "
            f"{self._orig_month_of_year} {self._orig_day_of_week} (m/h/dM/MY/d)>"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, crontab):
            return (
                other.month_of_year == self.month_of_year
                and other.day_of_month == self.day_of_month
                and other.day_of_week == self.day_of_week
                and other.hour == self.hour
                and other.minute == self.minute
                and super().__eq__(other)
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((frozenset(self.minute), frozenset(self.hour)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (
                self._orig_minute,
                self._orig_hour,
                self._orig_day_of_week,
                self._orig_day_of_month,
                self._orig_month_of_year,
            ),
            self._orig_kwargs,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        BaseSchedule.__init__(self, **state)
        self._orig_kwargs = state


# -- solar ---------------------------------------------------------------------------

#: Event -> (horizon, ephem method, measured at the sun's centre).
_SOLAR_EVENTS: dict[str, tuple[str, str, bool]] = {
    "dawn_astronomical": ("-18", "next_rising", True),
    "dawn_nautical": ("-12", "next_rising", True),
    "dawn_civil": ("-6", "next_rising", True),
    "sunrise": ("-0:34", "next_rising", False),
    "solar_noon": ("0", "next_transit", False),
    "sunset": ("-0:34", "next_setting", False),
    "dusk_civil": ("-6", "next_setting", True),
    "dusk_nautical": ("-12", "next_setting", True),
    "dusk_astronomical": ("-18", "next_setting", True),
}

SOLAR_EPHEM_MISSING = (
    "solar schedules need the 'ephem' package, which is not installed: "
    "pip install 'celeriac[solar]' (or pip install ephem)"
)


class solar(BaseSchedule):
    """At a solar event (``sunrise``, ``sunset``, ``solar_noon``, ``dawn_civil``,
    ``dawn_nautical``, ``dawn_astronomical``, ``dusk_civil``, ``dusk_nautical``,
    ``dusk_astronomical``) seen from latitude ``lat`` and longitude ``lon``.

    Needs ``ephem``; without it, ``ImproperlyConfigured`` says how to install it. Where
    an event does not happen on a day (polar day or night), the next day is tried, for
    up to a year."""

    #: Days searched for an event that does not happen every day.
    max_search_days = 366

    def __init__(self, event: str, lat: float, lon: float, **kwargs: Any) -> None:
        try:
            import ephem  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ImproperlyConfigured(SOLAR_EPHEM_MISSING) from exc
        if event not in _SOLAR_EVENTS:
            raise ValueError(
                f"invalid solar event {event!r}: must be one of {', '.join(sorted(_SOLAR_EVENTS))}"
            )
        if not -90 <= lat <= 90:
            raise ValueError(f"invalid latitude {lat!r}: must be between -90 and 90")
        if not -180 <= lon <= 180:
            raise ValueError(f"invalid longitude {lon!r}: must be between -180 and 180")
        super().__init__(**kwargs)
        self.ephem: Any = ephem
        self.event, self.lat, self.lon = event, lat, lon
        horizon, self.method, self.use_center = _SOLAR_EVENTS[event]
        observer = ephem.Observer()
        observer.lat, observer.lon, observer.elev = str(lat), str(lon), 0
        observer.horizon = horizon
        observer.pressure = 0
        self.cal = observer

    def _next_event(self, start: Any) -> Any:
        sun = self.ephem.Sun()
        options = {"use_center": True} if self.use_center else {}
        for _ in range(self.max_search_days):
            try:
                return getattr(self.cal, self.method)(sun, start=start, **options)
            except self.ephem.CircumpolarError:
                start = self.cal.next_antitransit(sun, start=start)
        return start  # none within the search: check again from there

    def remaining_estimate(self, last_run_at: datetime.datetime) -> datetime.timedelta:
        last = self.maybe_make_aware(last_run_at).astimezone(_UTC).replace(tzinfo=None)
        self.cal.date = last
        following = self._next_event(self.ephem.Date(last)).datetime().replace(tzinfo=_UTC)
        return _elapsed(following, self.maybe_make_aware(self.now()))

    def __repr__(self) -> str:
        return f"<solar: {self.event} at latitude {self.lat}, longitude: {self.lon}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, solar):
            return (other.event, other.lat, other.lon) == (self.event, self.lat, self.lon)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.event, self.lat, self.lon))

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.event, self.lat, self.lon)


def maybe_schedule(value: Any, relative: bool = False, app: Celeriac | None = None) -> BaseSchedule:
    """A schedule from a number of seconds, a ``timedelta`` or a schedule (given
    ``app``)."""
    if isinstance(value, BaseSchedule):
        if app is not None:
            value.app = app
        return value
    if isinstance(value, (int, float, datetime.timedelta)) and not isinstance(value, bool):
        return schedule(value, relative, app=app)
    raise TypeError(
        f"a schedule must be a number of seconds, a timedelta, a crontab, a solar or a "
        f"schedule, not {type(value).__name__}"
    )


def periodic_entry(
    run_every: Any,
    sig: Any,
    args: Any,
    kwargs: Any,
    name: str | None,
    options: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """``app.add_periodic_task``'s entry: ``(name, beat_schedule entry)``. ``sig`` is a
    signature (a mapping with ``task``, ``args``, ``kwargs``, ``options``, as Celery's
    ``add.s(2, 2)``), a task or a task name; ``args``/``kwargs`` are added to the
    signature's. Without ``name`` the entry is named after the call, as in Celery."""
    if isinstance(sig, str):
        task, sig_args, sig_kwargs, sig_options = sig, (), {}, {}
    elif isinstance(sig, dict) and "task" in sig:
        task = sig["task"]
        sig_args = tuple(sig.get("args") or ())
        sig_kwargs = dict(sig.get("kwargs") or {})
        sig_options = dict(sig.get("options") or {})
    elif isinstance(getattr(sig, "name", None), str):
        task, sig_args, sig_kwargs, sig_options = sig.name, (), {}, {}
    else:
        raise TypeError(
            f"add_periodic_task: expected a signature, a task or a task name, not "
            f"{type(sig).__name__}"
        )
    all_args = (*sig_args, *(args or ()))
    all_kwargs = {**sig_kwargs, **(kwargs or {})}
    if name is None:
        shown = [repr(value) for value in all_args]
        shown += [f"{key}={value!r}" for key, value in all_kwargs.items()]
        name = f"{task}({', '.join(shown)})"
    maybe_schedule(run_every)  # a bad schedule fails here, at the line that added it
    entry = {
        "schedule": run_every,
        "task": task,
        "args": all_args,
        "kwargs": all_kwargs,
        "options": {**sig_options, **options},
    }
    return name, entry

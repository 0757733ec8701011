"""Beat: sends the periodic tasks of ``beat_schedule`` when they are due.

Any number of beats (``celeriac beat`` processes and ``worker -B``) may run on one
broker: each due run is sent once. The last run of every entry lives in a shared
store, and a run is sent only by the beat that *claims* it there: an atomic
compare-and-set of the entry's last run from the value the beat saw to now
(``_core.BeatStore.claim``). The others learn the new last run from their failed
claim and wait for the next period. There is no leader: a beat that dies costs
nothing but itself.

The store is the one the app already uses: the result backend when it is Redis or
SQLite, else the broker when it is Redis or SQLite. With RabbitMQ and no such
backend (``rpc://`` or none) the state goes to a local SQLite file next to the
schedule file (``-s``): beats on this machine still send each run once, but beats on
other machines do not see it (a warning says so at start).

The schedule is read at start: a new entry first runs one period after it first
appeared (as in Celery), a changed one keeps its last run and follows its new
schedule, and a removed one is dropped from the store. A beat that was down for
several periods sends one catch-up run per entry, then resumes the period.

A run is claimed before it is sent: a beat killed between the two (the time a publish
takes, or a batch of up to ``CLAIM_BATCH`` runs due at once) loses those runs; no run is
ever sent twice.
"""

from __future__ import annotations

import datetime
import heapq
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celeriac import _core, signals
from celeriac.app import transport_of
from celeriac.schedules import BaseSchedule, maybe_schedule
from celeriac.transports import redis_ssl_option, scheme_of

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["Beat", "BeatError", "ScheduleEntry", "store_url"]

logger = logging.getLogger("celeriac.beat")

#: Celery's default ``beat_max_loop_interval`` (seconds).
DEFAULT_MAX_INTERVAL = 300.0
#: The first pause after the store or the broker failed; it doubles up to this cap.
RETRY_FIRST = 1.0
RETRY_MOST = 30.0
#: Due runs claimed together, then sent and flushed before the next batch: a beat
#: killed in between loses at most these (one round trip per batch to the store).
CLAIM_BATCH = 100
#: The soonest an entry is checked again after a check (seconds).
MIN_DELAY = 0.01
#: ``worker -B``: how often the embedded beat checks that its worker still runs.
PARENT_CHECK = 1.0
#: Keys a ``beat_schedule`` entry may have (Celery's ``ScheduleEntry`` fields).
ENTRY_KEYS = frozenset(
    {"task", "schedule", "args", "kwargs", "options", "relative", "last_run_at",
     "total_run_count"}
)  # fmt: skip
_UTC = datetime.timezone.utc
#: The header of a beat message that names its run: ``[previous run, this run]``, in
#: microseconds since the epoch.
RUN_HEADER = "celeriac_beat_run"


class BeatError(Exception):
    """A schedule or a setting beat cannot use: reported at start, nothing is sent."""


def _micros(moment: datetime.datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


@dataclass(eq=False)
class ScheduleEntry:
    """One entry of ``beat_schedule`` and what beat knows of its runs."""

    name: str
    task: str
    schedule: BaseSchedule
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    #: The stored last run, microseconds since the epoch (what claims compare).
    last_run: int = 0
    total_run_count: int = 0
    #: The claim about to be made, or whose answer was lost: ``(seen, run)``.
    pending: tuple[int, int] | None = None
    #: ``pending`` was tried and its answer lost: finding ``run`` stored means it won.
    retrying: bool = False

    @property
    def last_run_at(self) -> datetime.datetime:
        moment = datetime.datetime.fromtimestamp(self.last_run / 1_000_000, _UTC)
        return moment.astimezone(self.schedule.tz)

    def is_due(self) -> tuple[bool, float]:
        """``schedule.is_due(last_run_at)``: run now?, seconds to the next check."""
        due, following = self.schedule.is_due(self.last_run_at)
        return bool(due), float(following)

    def __repr__(self) -> str:
        call = [repr(arg) for arg in self.args]
        call += [f"{key}={value!r}" for key, value in self.kwargs.items()]
        return f"<ScheduleEntry: {self.name} {self.task}({', '.join(call)}) {self.schedule!r}>"


def read_schedule(app: Celeriac, schedule: Mapping[str, Any]) -> list[ScheduleEntry]:
    """The entries of ``beat_schedule``, checked: ``BeatError`` names the first bad one."""
    entries = []
    for name, spec in schedule.items():
        where = f"beat_schedule[{name!r}]"
        if not isinstance(name, str) or not name:
            raise BeatError(f"beat_schedule: entry names must be non-empty str, not {name!r}")
        if not isinstance(spec, Mapping):
            raise BeatError(f"{where}: expected a dict, not {type(spec).__name__}")
        unknown = set(spec) - ENTRY_KEYS
        if unknown:
            raise BeatError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
        task = spec.get("task")
        if not isinstance(task, str) or not task:
            raise BeatError(f"{where}: 'task' must be the task's name (a str), not {task!r}")
        if "schedule" not in spec:
            raise BeatError(f"{where}: 'schedule' is missing")
        try:
            run_every = maybe_schedule(spec["schedule"], bool(spec.get("relative")), app=app)
        except (TypeError, ValueError) as exc:
            raise BeatError(f"{where}: {exc}") from None
        args = spec.get("args") or ()
        if not isinstance(args, (list, tuple)):
            raise BeatError(f"{where}: 'args' must be a list or tuple, not {type(args).__name__}")
        kwargs = spec.get("kwargs") or {}
        options = spec.get("options") or {}
        for key, value in (("kwargs", kwargs), ("options", options)):
            if not isinstance(value, Mapping):
                raise BeatError(f"{where}: {key!r} must be a dict, not {type(value).__name__}")
        try:
            run_every.is_due(app.now())
        except Exception as exc:
            raise BeatError(f"{where}: its schedule {run_every!r} fails: {exc}") from exc
        entries.append(
            ScheduleEntry(name, task, run_every, tuple(args), dict(kwargs), dict(options))
        )
    return entries


def store_url(app: Celeriac, schedule_name: str) -> tuple[str, bool]:
    """Where beat keeps its state: ``(url, shared)``; ``shared`` is False for the local
    file used when neither the result backend nor the broker is Redis or SQLite."""
    for url in (app.result_backend_url, app.broker_url):
        if url and transport_of(url) in ("redis", "sqlite"):
            return url, True
    path = os.path.abspath(f"{schedule_name}.sqlite3")
    return f"sqlite://{path}", False


class Beat:
    """The scheduler service: ``Beat(app).run()`` until ``stop()`` (or a signal)."""

    def __init__(
        self,
        app: Celeriac,
        *,
        schedule_filename: str | None = None,
        max_interval: float | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.app = app
        #: ``worker -B``: the worker's pid; beat stops when it is gone.
        self.parent_pid = parent_pid
        self.schedule_name = schedule_filename or app.conf["beat_schedule_filename"]
        configured = app.conf["beat_max_loop_interval"]
        self.max_interval = float(max_interval or configured or DEFAULT_MAX_INTERVAL)
        if self.max_interval <= 0:
            raise BeatError(f"--max-interval must be positive, not {self.max_interval}")
        self.entries: dict[str, ScheduleEntry] = {}
        self._heap: list[tuple[float, int, ScheduleEntry]] = []
        self._sequence = 0
        self._stopping = threading.Event()
        self._store: Any = None
        self._retry = RETRY_FIRST
        self.store_url = ""
        self.shared = True

    # -- start ------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and check the schedule, connect the store and load the last runs.
        ``BeatError`` for a bad schedule; ``OperationalError`` when the store is down."""
        self.app.finalize()
        entries = read_schedule(self.app, self.app.conf["beat_schedule"])
        unknown: dict[str, list[str]] = {}
        for entry in entries:
            if entry.task not in self.app.tasks:
                unknown.setdefault(entry.task, []).append(entry.name)
        for task, names in unknown.items():
            logger.warning(
                "beat: the task %r (of %s) is not registered in this app; it is sent by "
                "name (a worker that does not know it rejects it).",
                task,
                ", ".join(map(repr, names[:3]))
                + (f" and {len(names) - 3} more" if len(names) > 3 else ""),
            )
        url, self.shared = store_url(self.app, self.schedule_name)
        self.store_url = _core.mask_url(url)
        if not self.shared:
            logger.warning(
                "beat: neither the broker nor the result backend is Redis or SQLite, so "
                "the schedule state is kept in the local file %s: several beats on this "
                "machine send each run once, but a beat on another machine would send "
                "runs again. Use a redis:// or sqlite:// result backend to share it.",
                url.removeprefix("sqlite://"),
            )
        options = self.app.conf["result_backend_transport_options"] or {}
        # A sentinel:// store takes master_name and sentinel_kwargs from the options
        # of the setting its URL came from.
        sentinel = None
        if scheme_of(url) == "sentinel":
            own = options if url == self.app.result_backend_url else self.app.transport_options()
            sentinel = {
                key: own[key]
                for key in ("master_name", "sentinel_kwargs", "min_other_sentinels")
                if key in own
            }
        ssl_setting = (
            "redis_backend_use_ssl" if url == self.app.result_backend_url else ("broker_use_ssl")
        )
        ssl = None
        if transport_of(url) == "redis":
            ssl = redis_ssl_option(self.app.conf[ssl_setting])
        self._store = _core.BeatStore(
            url,
            self.schedule_name,
            global_keyprefix=options.get("global_keyprefix"),
            timeout=float(self.app.conf["broker_connection_timeout"]),
            transport_options=sentinel,
            ssl=ssl,
            ssl_setting=ssl_setting,
        )
        names = [entry.name for entry in entries]
        runs = self._store.register(names, _micros(self.app.now()))
        for entry, last_run in zip(entries, runs, strict=True):
            entry.last_run = last_run
        for name in self._store.prune(names):
            logger.info("beat: dropped %r from the schedule store: it left beat_schedule.", name)
        self.entries = {entry.name: entry for entry in entries}
        now = time.time()
        self._heap = []
        for entry in entries:
            self._push(entry, now)

    def _push(self, entry: ScheduleEntry, when: float) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (when, self._sequence, entry))

    def _later(self, entry: ScheduleEntry, now: float, delay: float) -> None:
        """Check ``entry`` again ``delay`` seconds after ``now``: never later than the
        longest sleep, never within this tick (a schedule answering 0 cannot spin)."""
        self._push(entry, now + max(min(delay, self.max_interval), MIN_DELAY))

    # -- the loop ---------------------------------------------------------------------

    def tick(self) -> float:
        """Send what is due; return the seconds to sleep before the next tick."""
        now = time.time()
        due: list[ScheduleEntry] = []
        while self._heap and self._heap[0][0] <= now:
            _, _, entry = heapq.heappop(self._heap)
            if entry.pending is None:
                delay = self._due_in(entry)
                if delay is not None:
                    self._later(entry, now, delay)
                    continue
            due.append(entry)
        for start in range(0, len(due), CLAIM_BATCH):
            self._claim_and_send(due[start : start + CLAIM_BATCH], now)
        if not self._heap:
            return self.max_interval
        return max(0.0, min(self._heap[0][0] - time.time(), self.max_interval))

    def _due_in(self, entry: ScheduleEntry) -> float | None:
        """None when the entry is due (its claim is then prepared), else the seconds
        until it should be checked again."""
        try:
            due, delay = entry.is_due()
        except Exception:
            logger.exception(
                "beat: cannot compute the next run of %r; trying again in %.0f s.",
                entry.name,
                self.max_interval,
            )
            return self.max_interval
        if not due:
            return delay
        seen = entry.last_run
        entry.pending = (seen, max(_micros(self.app.now()), seen + 1))
        return None

    def _claim_and_send(self, due: list[ScheduleEntry], now: float) -> None:
        """Claim the due runs in one go, send those this beat won, then flush."""
        claims = [(entry.name, *entry.pending) for entry in due if entry.pending is not None]
        try:
            answers = self._store.claim_many(claims)
        except _core.OperationalError as exc:
            # The answers may be lost, not the claims: each is tried again as it is.
            delay = self._store_failed(exc)
            for entry in due:
                entry.retrying = True
                self._later(entry, now, delay)
            return
        self._retry = RETRY_FIRST
        sent = False
        for entry, (won, stored) in zip(due, answers, strict=True):
            seen, run = entry.pending or (entry.last_run, entry.last_run)
            retried, entry.pending, entry.retrying = entry.retrying, None, False
            logger.debug(
                "beat: claim of %r from %d to %d: %s", entry.name, seen, run,
                "won" if won else f"lost, stored {stored}",
            )  # fmt: skip
            # stored == run after a lost answer: that claim was ours. Not on a first
            # try: another beat that woke at the same moment may have picked the same
            # microsecond, and its run is then not ours to send again.
            if won or (retried and stored == run):
                entry.last_run = run
                entry.total_run_count += 1
                if self._send(entry, seen, run):
                    sent = True
                    delay = self._next_check(entry)
                else:
                    delay = self._give_back(entry, seen, run)
            else:
                delay = self._adopt(entry, stored, seen)
            self._later(entry, now, delay)
        if sent:
            self._flush()

    def _adopt(self, entry: ScheduleEntry, stored: int | None, seen: int) -> float:
        """Another beat sent this run: take its last run and wait for the next."""
        if stored is None:
            # The store lost the entry (a Redis restarted without its data, or a beat
            # with another schedule dropped it): nobody sent this run. Put back the last
            # run this beat knew and check again at once, so that the due run is
            # claimed anew (sent once, by whichever beat wins), not skipped.
            try:
                entry.last_run = self._store.register([entry.name], seen)[0]
            except _core.OperationalError as exc:
                return self._store_failed(exc)
            logger.warning("beat: %r was missing from the schedule store; added again.", entry.name)
            return 0.0
        entry.last_run = stored
        logger.debug("beat: %r was sent by another beat.", entry.name)
        return self._next_check(entry)

    def _give_back(self, entry: ScheduleEntry, seen: int, run: int) -> float:
        """Not sent: give the run back so that this or another beat sends it."""
        try:
            self._store.claim(entry.name, run, seen)
        except _core.OperationalError as exc:
            logger.error("beat: cannot give back the run of %r: %s", entry.name, exc)
            return self._store_failed(None)
        entry.last_run = seen
        return self._store_failed(None)

    def _next_check(self, entry: ScheduleEntry) -> float:
        try:
            _, delay = entry.is_due()
        except Exception:
            return self.max_interval
        return delay

    def _send(self, entry: ScheduleEntry, seen: int, run: int) -> bool:
        logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        options = dict(entry.options)
        headers = dict(options.pop("headers", None) or {})
        headers["celery_beat_task"] = True  # as Celery's beat marks its messages
        # The run this message is, after which one: consecutive runs link up, so a
        # lost or doubled run shows (and a task may use it to drop a duplicate).
        headers[RUN_HEADER] = [seen, run]
        try:
            result = self.app.send_task(
                entry.task, entry.args, entry.kwargs, headers=headers, **options
            )
        except _core.OperationalError as exc:
            logger.error("beat: cannot send %s (%s): %s", entry.name, entry.task, exc)
            return False
        except Exception as exc:
            # A bad entry (options the message cannot carry): counted as its run, so a
            # broken entry does not stop the others or resend in a loop.
            logger.error("Message Error: %s", exc, exc_info=True)
            return True
        logger.debug("%s sent. id->%s", entry.task, result.id)
        return True

    def _flush(self) -> None:
        try:
            self.app.producer.flush()
        except _core.OperationalError as exc:
            logger.error("beat: the broker did not confirm the messages just sent: %s", exc)

    def _store_failed(self, exc: Exception | None) -> float:
        delay, self._retry = self._retry, min(self._retry * 2, RETRY_MOST)
        if exc is not None:
            logger.error(
                "beat: the schedule store %s failed: %s. Trying again in %.0f s.",
                self.store_url,
                exc,
                delay,
            )
        return delay

    def run(self) -> None:
        """``setup()`` then ``serve()``."""
        self.setup()
        self.serve()

    def serve(self) -> None:
        """Tick until ``stop()``, sleeping until the next due run in between."""
        # As Celery: ``beat_embedded_init`` for beat inside a worker (-B), else ``beat_init``.
        started = signals.beat_embedded_init if self.parent_pid is not None else signals.beat_init
        started.send(sender=self)
        logger.info("beat: Starting...")
        while not self._stopping.is_set():
            delay = self.tick()
            if self.parent_pid is not None:
                if os.getppid() != self.parent_pid:
                    logger.info("beat: the worker that started it is gone; stopping.")
                    return
                delay = min(delay, PARENT_CHECK)
            if delay > 0:
                logger.debug("beat: Waking up in %.2f seconds.", delay)
                self._stopping.wait(delay)

    def stop(self) -> None:
        self._stopping.set()

    def start_thread(self) -> threading.Thread:
        """Run in a daemon thread (``worker -B``); errors are logged."""

        def run() -> None:
            try:
                self.run()
            except Exception:
                logger.exception("beat: stopped by an error")

        thread = threading.Thread(target=run, name="celeriac-beat", daemon=True)
        thread.start()
        return thread

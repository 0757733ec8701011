"""Celery's events (docs/wire.md §5): what Flower and ``celery events`` consume.

``EventDispatcher`` publishes on the ``celeryev`` exchange (a durable topic exchange on
AMQP; PUB/SUB channel ``/{db}.celeryev/<routing key>`` on Redis) with Celery's fields:
``type``, ``hostname``, ``timestamp``, ``utcoffset``, ``pid``, ``clock`` and the event's
own. Task events are buffered and sent as one list on ``task.multi`` (at most
``BATCH`` per message), as a Celery worker does; worker events are sent at once.

Events are best effort: a broker that is down loses them (logged once), and nothing
here ever raises into the worker.

On the embedded SQLite broker events are rows of the file's ``broadcast`` log (kept a
minute); ``EventReceiver`` reads them back there, since Celery's own receiver (and
Flower) cannot open that transport.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celeriac._core import EventPublisher, __version__, loads
from celeriac._core import EventReceiver as _CoreEventReceiver
from celeriac.conf import setting
from celeriac.signals import heartbeat_sent

if TYPE_CHECKING:
    from celeriac.conf import BrokerApp

__all__ = ["EventDispatcher", "EventReceiver", "Heart", "utcoffset", "worker_fields"]

logger = logging.getLogger("celeriac.events")

#: Task events buffered before a flush (Celery flushes at 24 or on the next tick).
BATCH = 24
#: Longest a buffered task event waits, in seconds, when the worker loop does not flush
#: (while a prefork child runs a long task, say). Celery's parent process flushes its
#: buffer on its event loop's next tick; a wake-up at most ten times a second is cheap.
MAX_BUFFER_AGE = 0.1
#: Seconds between ``worker-heartbeat`` events (Celery's default ``freq``).
HEARTBEAT_FREQ = 2.0
#: The software the worker events name (Celery sends "py-celery" and its version):
#: celeriac's own, so a monitor can tell the two apart. Flower and Celery's
#: ``events.state`` only display these fields.
SW_IDENT = "celeriac"
SW_VER = __version__


def utcoffset() -> float:
    """Hours *west* of UTC, as Celery sends it (UTC+1 -> -1.0)."""
    if time.localtime().tm_isdst > 0:
        return time.altzone / 3600
    return time.timezone / 3600


def _loadavg() -> list[float]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


def worker_fields(freq: float, active: int, processed: int) -> dict[str, Any]:
    """The fields of ``worker-online``/``worker-heartbeat``/``worker-offline``."""
    return {
        "freq": freq,
        "active": active,
        "processed": processed,
        "loadavg": _loadavg(),
        "sw_ident": SW_IDENT,
        "sw_ver": SW_VER,
        "sw_sys": platform.system(),
    }


class EventDispatcher:
    """Sends events for ``hostname`` through its own broker connection.

    ``enabled`` turns task events on (``-E``); worker events are always sent.
    One per process: a forked child makes its own (``for_process``).
    """

    def __init__(
        self,
        app: BrokerApp,
        hostname: str,
        *,
        enabled: bool = True,
        exchange: str | None = None,
    ) -> None:
        self.app = app
        self.hostname = hostname
        self.enabled = enabled
        self.exchange = exchange or str(setting(app.conf, "event_exchange"))
        redis_like = not app.broker_url.lower().startswith(("amqp", "pyamqp"))
        #: Celery makes ``celeryev`` a fanout exchange on Redis; it is PUB/SUB there.
        self.exchange_type = "fanout" if redis_like else "topic"
        self.pid = os.getpid()
        self._clock = itertools.count(1)
        self._lock = threading.Lock()
        #: Held while a batch is taken and published, so batches leave in order.
        self._flush_lock = threading.Lock()
        self._buffer: list[dict[str, Any]] = []
        #: Set when the buffer holds events; the flusher thread of ``_flusher_pid``
        #: sends them once they are ``MAX_BUFFER_AGE`` old.
        self._aging = threading.Event()
        self._flusher_pid: int | None = None
        self._publisher: Any = None
        self._failed = False

    # -- connection -----------------------------------------------------------------

    def _connect(self) -> Any:
        if self._publisher is None and not self._failed:
            app = self.app
            try:
                self._publisher = EventPublisher(
                    app.broker_url,
                    transport_options=app.transport_options(),
                    connect_timeout=float(setting(app.conf, "broker_connection_timeout")),
                )
            except ValueError as exc:
                # A broker without broadcast (the embedded SQLite): expected, not a fault.
                self._failed = True
                logger.info("Events are off: %s", exc)
            except Exception as exc:
                self._failed = True
                logger.warning("Events are off: cannot publish events: %s", exc)
        return self._publisher

    # -- sending --------------------------------------------------------------------

    def event(
        self, type_: str, fields: Mapping[str, Any], timestamp: float | None = None
    ) -> dict[str, Any]:
        """The event dict, with the standard fields and the next clock value;
        ``timestamp`` (default now) is when it happened."""
        event = dict(fields)
        event.update(
            type=type_,
            hostname=self.hostname,
            timestamp=time.time() if timestamp is None else timestamp,
            utcoffset=utcoffset(),
            pid=self.pid,
            clock=next(self._clock),
        )
        return event

    def send(self, type_: str, **fields: Any) -> None:
        """Send one event now (worker events, or any event outside a worker loop)."""
        if type_.startswith("task-") and not self.enabled:
            return
        self._publish(type_.replace("-", "."), self.event(type_, fields))

    def send_task(self, type_: str, timestamp: float | None = None, **fields: Any) -> None:
        """Buffer a task event (sent by ``flush``, or at once when ``BATCH`` wait) that
        happened at ``timestamp`` (default now)."""
        if not self.enabled:
            return
        event = self.event(type_, fields, timestamp)
        with self._lock:
            self._buffer.append(event)
            full = len(self._buffer) >= BATCH
        if full:
            self.flush()
        else:
            self._age_buffer()

    def _age_buffer(self) -> None:
        """Have the buffer sent within ``MAX_BUFFER_AGE`` even if the worker loop does
        not flush it (a long task's ``task-started`` must reach monitors while it runs)."""
        if self._flusher_pid != os.getpid():  # none yet, or it stayed behind a fork
            self._flusher_pid = os.getpid()
            threading.Thread(
                target=self._flush_aged, name="celeriac-event-flush", daemon=True
            ).start()
        self._aging.set()

    def _flush_aged(self) -> None:
        while True:
            self._aging.wait()
            time.sleep(MAX_BUFFER_AGE)
            self._aging.clear()
            self.flush()

    def flush(self) -> None:
        """Send the buffered task events as one ``task.multi`` message."""
        if not self._buffer:
            return
        with self._flush_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if batch:
                self._publish("task.multi", batch)

    def _publish(self, routing_key: str, body: Any) -> None:
        publisher = self._connect()
        if publisher is None:
            return
        try:
            publisher.publish(
                self.exchange,
                routing_key,
                body,
                headers={"hostname": self.hostname},
                exchange_type=self.exchange_type,
                durable=True,
            )
        except Exception as exc:  # an event must never break the worker
            logger.warning("Could not send event %s: %s", routing_key, exc)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered and wait (bounded) until it is written."""
        self.flush()
        publisher, self._publisher = self._publisher, None
        if publisher is None:
            return
        try:
            publisher.flush(timeout)
        except Exception as exc:
            logger.warning("Some events were not sent: %s", exc)
        finally:
            publisher.close()


class Heart:
    """Sends ``worker-online`` now, ``worker-heartbeat`` every ``freq`` seconds from a
    daemon thread, and ``worker-offline`` on ``stop``. ``counts()`` gives
    ``(active, processed)``."""

    def __init__(
        self,
        dispatcher: EventDispatcher,
        counts: Callable[[], tuple[int, int]],
        freq: float = HEARTBEAT_FREQ,
    ) -> None:
        self.dispatcher = dispatcher
        self.counts = counts
        self.freq = freq
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _send(self, type_: str) -> None:
        try:
            active, processed = self.counts()
        except Exception:
            active, processed = 0, 0
        if heartbeat_sent.receivers:
            heartbeat_sent.send(sender=self)
        self.dispatcher.send(type_, **worker_fields(self.freq, active, processed))

    def start(self) -> None:
        self._send("worker-online")
        self._thread = threading.Thread(target=self._run, name="celeriac-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.freq):
            self._send("worker-heartbeat")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.freq + 1.0)
            self._thread = None
        self._send("worker-offline")


class EventReceiver:
    """Reads the events sent from now on, on the embedded SQLite broker, as Celery's
    ``EventReceiver`` hands them to its handlers: one dict per event (a ``task.multi``
    message gives several), plus ``local_received``. Broadcasts that cannot be read
    are logged and skipped. ``ValueError`` for other brokers."""

    def __init__(
        self,
        app: BrokerApp,
        *,
        handlers: Mapping[str, Callable[[dict[str, Any]], Any]] | None = None,
        exchange: str | None = None,
    ) -> None:
        self.app = app
        self.handlers = dict(handlers or {})
        self._receiver: Any = _CoreEventReceiver(
            app.broker_url,
            exchange=exchange or str(setting(app.conf, "event_exchange")),
            transport_options=app.transport_options(),
            connect_timeout=float(setting(app.conf, "broker_connection_timeout")),
        )

    def next_events(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """The events of the next broadcast; ``[]`` when none came within ``timeout``
        seconds or it could not be read."""
        got = self._receiver.receive(timeout)
        if got is None:
            return []
        routing_key, headers, body = got
        if headers is None:
            logger.warning("Skipped an unreadable event message (%s): %s", routing_key, body)
            return []
        try:
            decoded = loads(body)
        except Exception as exc:
            logger.warning("Skipped an event message (%s) that is not JSON: %s", routing_key, exc)
            return []
        items = decoded if isinstance(decoded, list) else [decoded]
        events = []
        now = time.time()
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("type"), str):
                item["local_received"] = now
                events.append(item)
            else:
                logger.warning("Skipped an event (%s) without a type: %.200r", routing_key, item)
        return events

    def capture(self, limit: int | None = None, timeout: float | None = None) -> int:
        """Call the handler of each event's type (``"*"``: any) until ``limit`` events
        were handled or nothing came for ``timeout`` seconds; how many were handled."""
        handled = 0
        while limit is None or handled < limit:
            events = self.next_events(1.0 if timeout is None else timeout)
            if not events and timeout is not None:
                return handled
            for event in events:
                handler = self.handlers.get(event["type"]) or self.handlers.get("*")
                if handler is not None:
                    handler(event)
                handled += 1
        return handled

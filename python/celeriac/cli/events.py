"""``celeriac events``: print the workers' events as they happen (``celery events --dump``)."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celeriac.cli.common import EX_OK, AppError, UsageError, add_global_options, prepare_app

if TYPE_CHECKING:
    from celeriac.app import Celeriac


def add_parser(commands: Any) -> None:
    events = commands.add_parser(
        "events",
        help="dump the workers' events as they happen",
        description="Print every event (worker and task) as it happens, like "
        "'celery events --dump'. Stop with Ctrl-C.",
        epilog="Example: celeriac -A tasks events --dump",
    )
    add_global_options(events, suppress=True)
    events.add_argument("-d", "--dump", action="store_true",
                        help="dump events to stdout (the only mode celeriac has)")  # fmt: skip


_HUMAN_TYPES = {
    "worker-offline": "shutdown",
    "worker-online": "started",
    "worker-heartbeat": "heartbeat",
}


class EventDumper:
    """Formats events as ``celery events --dump`` prints them."""

    def __init__(self, out: Any = None) -> None:
        self.out = out
        self.task_names: dict[str, str] = {}

    def say(self, message: str) -> None:
        print(message, file=self.out or sys.stdout, flush=True)

    def on_event(self, event: dict[str, Any]) -> None:
        event = dict(event)
        event.pop("local_received", None)
        try:
            stamp = datetime.datetime.fromtimestamp(
                float(event.pop("timestamp")), datetime.timezone.utc
            )
        except (KeyError, TypeError, ValueError, OverflowError):
            stamp = datetime.datetime.now(datetime.timezone.utc)
        kind = str(event.pop("type", "")).lower()
        hostname = event.pop("hostname", "?")
        human = _HUMAN_TYPES.get(kind, kind.replace("-", " "))
        if kind.startswith("task-"):
            uuid = str(event.pop("uuid", ""))
            if kind in ("task-received", "task-sent"):
                task = (
                    f"{event.pop('name', None)}({uuid}) args={event.pop('args', None)} "
                    f"kwargs={event.pop('kwargs', None)}"
                )
                self.task_names[uuid] = task
                if len(self.task_names) > 0xFFF:
                    self.task_names.pop(next(iter(self.task_names)))
            else:
                task = self.task_names.get(uuid, "")
            fields = ", ".join(f"{key}={event[key]}" for key in sorted(event))
            sep = ":" if fields else ""
            self.say(f"{hostname} [{stamp}] {human}{sep} {task} {fields}")
            return
        fields = ", ".join(f"{key}={event[key]}" for key in sorted(event))
        sep = ":" if fields else ""
        self.say(f"{hostname} [{stamp}] {human}{sep} {fields}")


def cmd_events(ns: argparse.Namespace) -> int:
    app = prepare_app(ns)
    dumper = EventDumper()
    try:
        next_events = _event_source(app)
    except ValueError as exc:
        raise UsageError(f"events: {exc}") from None
    except Exception as exc:
        raise AppError(f"cannot receive events: {exc}") from None
    dumper.say("-> evdump: starting capture...")
    try:
        while True:
            for event in next_events():
                dumper.on_event(event)
    except KeyboardInterrupt:
        return EX_OK


def _event_source(app: Celeriac) -> Callable[[], list[dict[str, Any]]]:
    """A function giving the next events (``[]`` after a second without any):
    celeriac's ``EventReceiver`` on SQLite; on Redis and AMQP a subscription of its own
    to ``celeryev``, as Celery's receiver (exclusive ``celeryev.<uuid>`` queue bound
    with ``#``, ``event_queue_ttl``/``event_queue_expires``)."""
    import uuid

    from celeriac import _core
    from celeriac.events import EventReceiver

    if app.broker_url.startswith("sqlite"):
        receiver = EventReceiver(app)
        return lambda: receiver.next_events(1.0)
    conf = app.conf
    expires, ttl = conf["event_queue_expires"], conf["event_queue_ttl"]
    mailbox = _core.Mailbox(
        app.broker_url,
        transport_options=app.transport_options(),
        connect_timeout=float(conf["broker_connection_timeout"] or 4.0),
        queue_expires=float(expires) if expires else None,
        queue_ttl=float(ttl) if ttl else None,
    )
    exchange = str(conf["event_exchange"] or "celeryev")
    prefix = str(conf.get("event_queue_prefix") or "celeryev")
    mailbox.subscribe(
        exchange,
        f"{prefix}.{uuid.uuid4()}",
        exchange_type="topic",
        routing_key="#",
        durable=True,
    )

    def next_events() -> list[dict[str, Any]]:
        got = mailbox.receive(1.0)
        if got is None:
            return []
        headers, body = got
        if headers is None:
            print(f"-> skipped an unreadable event message: {body}", file=sys.stderr)
            return []
        try:
            decoded = _core.loads(body)
        except Exception as exc:
            print(f"-> skipped an event message that is not JSON: {exc}", file=sys.stderr)
            return []
        items = decoded if isinstance(decoded, list) else [decoded]
        return [item for item in items if isinstance(item, dict) and "type" in item]

    return next_events

"""``task-received``: one per delivery that runs the task, with that delivery's fields.

Celery's consumer announces a message as it arrives and keeps it until a child is free,
so each delivery is announced once. A celeriac prefork child prefetches for itself and,
before a task that may be long, gives back what it holds (``-O fair``, ``_make_way``):
a sibling receives those messages again. Announced on arrival, each was announced
twice, and the first child's stale ``task-received`` could reach a monitor after the
retry's, resetting ``retries`` in ``celery.events.state.State`` and Flower. So a child
that may give messages back announces a message only once it keeps it: as it starts
(or is held for its ETA or rate limit, or settled at once), with the time it arrived.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celeriac.signals import task_received
from celeriac.worker.request import short_repr

if TYPE_CHECKING:
    from celeriac.events import EventDispatcher
    from celeriac.worker.request import Request


def prepare_received(request: Request, events: EventDispatcher) -> None:
    """Note the ``task-received`` of ``request``, as it arrives now (sent by
    ``announce_received``)."""
    delivery = request.delivery
    headers = delivery.headers
    request.events = events
    request.received_event = {
        "timestamp": time.time(),
        "name": request.name,
        "args": headers.get("argsrepr") or short_repr(delivery.args),
        "kwargs": headers.get("kwargsrepr") or short_repr(delivery.kwargs),
        "root_id": headers.get("root_id") or request.id,
        "parent_id": headers.get("parent_id"),
        "retries": headers.get("retries") or 0,
        "eta": headers.get("eta"),
        "expires": headers.get("expires"),
    }


def announce_received(request: Request) -> None:
    """Send the ``task-received`` noted for ``request``, once (no-op after, or without
    ``-E``); and a ``task_received`` signal held back until now."""
    worker = request.received_by
    if worker is not None:  # the task_received signal, also sent once kept
        request.received_by = None
        task_received.send(sender=worker, request=request)
    fields: dict[str, Any] | None = request.received_event
    if fields is None:
        return
    request.received_event = None
    if request.events is not None:
        request.events.send_task("task-received", uuid=request.id, **fields)

"""Signals: callbacks that run when something happens (Celery's ``celery.signals``).

For now only what beat needs: the :class:`Signal` type and the app's
``on_after_configure`` (``@app.on_after_configure.connect`` then
``sender.add_periodic_task(...)``), sent once, before beat reads ``beat_schedule``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, overload

__all__ = ["Signal"]

Receiver = Callable[..., Any]


class Signal:
    """A list of receivers called with ``(sender=..., **named)`` by :meth:`send`.

    ``@signal.connect`` and ``@signal.connect(sender=app)`` register a function (kept
    by a strong reference); ``send`` calls them in order and returns
    ``[(receiver, result), ...]``. An exception in a receiver propagates, as with
    Celery's ``send`` for these app signals.
    """

    def __init__(self, name: str, providing_args: Any = None) -> None:
        self.name = name
        self._receivers: list[tuple[Receiver, Any]] = []
        self._lock = threading.Lock()

    @overload
    def connect(self, receiver: Receiver, /, *, sender: Any = None, **options: Any) -> Receiver: ...
    @overload
    def connect(
        self, receiver: None = None, /, *, sender: Any = None, **options: Any
    ) -> Callable[[Receiver], Receiver]: ...
    def connect(
        self, receiver: Receiver | None = None, /, *, sender: Any = None, **options: Any
    ) -> Receiver | Callable[[Receiver], Receiver]:
        def add(function: Receiver) -> Receiver:
            with self._lock:
                if not any(known is function for known, _ in self._receivers):
                    self._receivers.append((function, sender))
            return function

        return add(receiver) if receiver is not None else add

    def disconnect(self, receiver: Receiver, sender: Any = None) -> bool:
        with self._lock:
            before = len(self._receivers)
            self._receivers = [(known, s) for known, s in self._receivers if known is not receiver]
            return len(self._receivers) != before

    @property
    def receivers(self) -> list[Receiver]:
        return [receiver for receiver, _ in self._receivers]

    def send(self, sender: Any, **named: Any) -> list[tuple[Receiver, Any]]:
        with self._lock:
            receivers = list(self._receivers)
        return [
            (receiver, receiver(sender=sender, signal=self, **named))
            for receiver, wanted in receivers
            if wanted is None or wanted is sender
        ]

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"

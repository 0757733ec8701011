"""``Queue`` and ``Exchange``: queue declarations for ``task_queues``, as kombu's.

They take kombu's constructor arguments, so ``from kombu import Queue`` becomes
``from celeriac import Queue`` (kombu's own objects are read too)::

    task_queues = [
        Queue("tasks", Exchange("tasks", type="topic"), routing_key="tasks.#",
              queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": 5}),
        Queue("urgent", max_priority=10),
    ]

Every argument is declared on the broker as given. What celeriac cannot honour
(several bindings, binding or consumer arguments, ``no_ack``, ``no_declare``) is
refused with :class:`~celeriac.exceptions.ImproperlyConfigured` when the settings are
read, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Exchange", "Queue", "declared_arguments"]


class Exchange:
    """An exchange: ``name``, ``type`` (``direct``, ``topic``, ``fanout``,
    ``headers``), ``durable``, ``auto_delete``. kombu's ``arguments``, ``passive``
    and ``no_declare`` are accepted only at their defaults."""

    def __init__(
        self,
        name: str = "",
        type: str = "direct",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
        passive: bool = False,
        no_declare: bool = False,
        delivery_mode: Any = None,
    ) -> None:
        self.name = name
        self.type = type or "direct"
        self.durable = bool(durable)
        self.auto_delete = bool(auto_delete)
        self.arguments = dict(arguments) if arguments else None
        self.passive = bool(passive)
        self.no_declare = bool(no_declare)
        self.delivery_mode = delivery_mode

    def __repr__(self) -> str:
        return f"<Exchange {self.name}({self.type})>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Exchange):
            return NotImplemented
        return (self.name, self.type, self.durable, self.auto_delete, self.arguments) == (
            other.name,
            other.type,
            other.durable,
            other.auto_delete,
            other.arguments,
        )

    def __hash__(self) -> int:
        return hash(f"E|{self.name}")


class Queue:
    """A queue bound to ``exchange`` with ``routing_key`` (kombu's defaults: a direct
    exchange named after the queue when ``exchange`` is a string or None, durable,
    not exclusive, not auto-delete). ``queue_arguments`` are declared as given;
    ``max_priority``, ``max_length``, ``max_length_bytes``, ``message_ttl`` and
    ``expires`` (seconds) become ``x-max-priority``, ``x-max-length``,
    ``x-max-length-bytes``, ``x-message-ttl`` and ``x-expires`` (milliseconds) as
    kombu sends them."""

    def __init__(
        self,
        name: str = "",
        exchange: Exchange | str | None = None,
        routing_key: str = "",
        *,
        queue_arguments: Mapping[str, Any] | None = None,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        max_priority: int | None = None,
        max_length: int | None = None,
        max_length_bytes: int | None = None,
        message_ttl: float | None = None,
        expires: float | None = None,
        binding_arguments: Mapping[str, Any] | None = None,
        consumer_arguments: Mapping[str, Any] | None = None,
        no_ack: bool | None = None,
        no_declare: bool = False,
        alias: str | None = None,
        bindings: Any = None,
    ) -> None:
        self.name = name
        self.exchange: Exchange | None = (
            Exchange(exchange) if isinstance(exchange, str) else exchange
        )
        self.routing_key = routing_key
        self.queue_arguments = dict(queue_arguments) if queue_arguments else None
        self.durable = bool(durable)
        self.exclusive = bool(exclusive)
        # kombu: exclusive implies auto-delete.
        self.auto_delete = bool(auto_delete) or self.exclusive
        self.max_priority = max_priority
        self.max_length = max_length
        self.max_length_bytes = max_length_bytes
        self.message_ttl = message_ttl
        self.expires = expires
        self.binding_arguments = dict(binding_arguments) if binding_arguments else None
        self.consumer_arguments = dict(consumer_arguments) if consumer_arguments else None
        self.no_ack = no_ack
        self.no_declare = bool(no_declare)
        self.alias = alias
        self.bindings = set(bindings or ())

    def __repr__(self) -> str:
        return f"<Queue {self.name} -> {self.exchange!r} -> {self.routing_key}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Queue):
            return NotImplemented
        return (
            self.name,
            self.exchange,
            self.routing_key,
            declared_arguments(self),
            self.durable,
            self.exclusive,
            self.auto_delete,
        ) == (
            other.name,
            other.exchange,
            other.routing_key,
            declared_arguments(other),
            other.durable,
            other.exclusive,
            other.auto_delete,
        )

    def __hash__(self) -> int:
        return hash(f"Q|{self.name}")


def _ms(seconds: Any) -> int:
    return int(float(seconds) * 1000)


_SHORTHANDS: tuple[tuple[str, str, Callable[[Any], int]], ...] = (
    ("expires", "x-expires", _ms),
    ("message_ttl", "x-message-ttl", _ms),
    ("max_length", "x-max-length", int),
    ("max_length_bytes", "x-max-length-bytes", int),
    ("max_priority", "x-max-priority", int),
)


def declared_arguments(queue: Any) -> dict[str, Any]:
    """The arguments ``queue`` (ours, kombu's, or a dict of its attributes) is
    declared with: ``queue_arguments`` plus the shorthands, as kombu merges them."""
    get: Callable[[str], Any]
    if isinstance(queue, Mapping):
        get = queue.get
    else:

        def get(key: str) -> Any:
            return getattr(queue, key, None)

    given = get("queue_arguments") or {}
    if not isinstance(given, Mapping):
        raise TypeError(f"queue_arguments must be a dict, not {given!r}")
    arguments = dict(given)
    for attribute, key, convert in _SHORTHANDS:
        value = get(attribute)
        if value is not None:
            try:
                arguments[key] = convert(value)
            except (TypeError, ValueError):
                raise TypeError(f"{attribute} must be a number, not {value!r}") from None
    return arguments

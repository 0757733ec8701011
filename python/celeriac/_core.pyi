"""Type stubs for celeriac's Rust extension (src/py/)."""

from collections.abc import Mapping, Sequence
from typing import Any

__version__: str

class CeleriacError(Exception):
    """Base of every error celeriac raises itself (Celery's ``CeleryError``)."""

class OperationalError(CeleriacError):
    """The broker or the result store cannot be reached (kombu's ``OperationalError``)."""

class TimeoutError(CeleriacError):
    """A wait for a result ran out of time."""

class DecodeError(CeleriacError):
    """Bytes that are not valid JSON or not a message celeriac understands."""

def dumps(obj: Any) -> bytes:
    """JSON bytes as kombu writes them (type markers for datetime, date, time, Decimal,
    UUID and bytes; ``", "`` / ``": "`` separators; ASCII only). Raises ``TypeError``
    naming the offending type for anything else."""

def loads(data: bytes | str) -> Any:
    """Parse JSON, turning kombu type markers back into Python objects.
    Raises ``DecodeError`` on bad input."""

def uuid4() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())``: the default task id."""

def mask_url(url: str) -> str:
    """The URL with its password replaced by ``**`` (``redis://:**@host:6379/0``)."""

class Producer:
    """Publishes task messages. One per app per process; thread-safe.

    ``send`` encodes in the calling thread and hands the frame to the I/O thread,
    which pipelines everything pending in one round trip.
    """

    def __init__(
        self,
        url: str,
        *,
        origin: str,
        reply_to: str = "",
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> None:
        """Connect now. Raises ``ValueError`` for a bad URL and ``OperationalError``
        when the broker cannot be reached within ``connect_timeout`` seconds."""

    def send(
        self,
        name: str,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        queue: str,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish one task message (protocol v2) to ``queue``.

        ``options`` keys, all optional: ``eta``, ``expires`` (ISO-8601 str or None),
        ``expiration`` (int ms), ``priority`` (int 0-255), ``exchange`` (default ``""``),
        ``routing_key`` (default ``queue``), ``reply_to``, ``correlation_id``,
        ``parent_id``, ``root_id`` (default task_id), ``retries`` (int), ``timelimit``
        (``(hard, soft)``, each float or None), ``shadow``, ``group``, ``group_index``,
        ``ignore_result`` (bool), ``headers`` (dict merged into the headers),
        ``callbacks``, ``errbacks``, ``chain``, ``chord`` (the body's embed part),
        ``argsrepr``, ``kwargsrepr`` (default: repr truncated to 1024 chars),
        ``delivery_mode`` (1 or 2), ``origin``, ``stamped_headers``, ``stamps``,
        ``replaced_task_nesting``. An unknown key raises ``ValueError``.
        An argument that cannot be encoded raises ``TypeError``; nothing is sent.
        """

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything sent so far is written. Raises ``OperationalError``
        when it could not be written within ``timeout`` seconds."""

    def close(self) -> None: ...

class Delivery:
    """One message taken from a queue, decoded."""

    @property
    def delivery_tag(self) -> str: ...
    @property
    def exchange(self) -> str: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def priority(self) -> int: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def content_type(self) -> str: ...
    @property
    def headers(self) -> dict[str, Any]:
        """The task headers (protocol v2 layout; v1 messages are converted)."""
    @property
    def task(self) -> str | None:
        """``headers["task"]``."""
    @property
    def id(self) -> str | None:
        """``headers["id"]``."""
    @property
    def args(self) -> list[Any]: ...
    @property
    def kwargs(self) -> dict[str, Any]: ...
    @property
    def embed(self) -> dict[str, Any]:
        """``callbacks``, ``errbacks``, ``chain``, ``chord`` (each may be None)."""
    @property
    def error(self) -> str | None:
        """Why this message cannot be run (not JSON, wrong shape, bad base64, missing
        headers, disallowed content type). When set, args/kwargs/embed are empty and the
        message must be logged and dropped (acked)."""

class Consumer:
    """Takes messages from queues (kombu's Redis layout: priority sub-lists,
    ``unacked`` hash + ``unacked_index`` zset)."""

    def __init__(
        self,
        url: str,
        queues: Sequence[str],
        *,
        prefetch_count: int,
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> None:
        """Connect now; same errors as ``Producer``. ``prefetch_count`` bounds the
        messages fetched and not yet acked (0 = unbounded)."""

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Up to ``max_count`` deliveries (bounded by the prefetch window). Waits up to
        ``timeout`` seconds, GIL released, for at least one; ``[]`` when none came.
        Raises ``KeyboardInterrupt`` (or the signal handler's exception) promptly."""

    def ack(self, delivery_tags: Sequence[str]) -> None:
        """Ack these; written asynchronously, pipelined with other acks."""

    def reject(self, delivery_tag: str, requeue: bool) -> None:
        """``requeue=False`` drops the message; ``True`` puts it back in its queue."""

    def extend_window(self, delta: int) -> None:
        """Grow (``delta > 0``) or shrink the prefetch window, one slot per message held
        for its ETA or rate limit (Celery's ``qos.increment_eventually``). Transports
        without a local window ignore it."""

    def restore_unacked(self) -> int:
        """Put every message this consumer fetched and did not ack back in its queue
        (warm shutdown). Returns how many."""

    def close(self) -> None: ...

class Backend:
    """The result store (``redis://``): ``celery-task-meta-<id>`` keys and pub/sub.
    ``rpc://``: results are messages on the AMQP broker ``broker_url``: each client
    reads its own reply queue ``reply_to`` (its oid, declared here as Celery 5.7 does:
    durable, auto-delete, ``x-expires`` = ``expires``)."""

    def __init__(
        self,
        url: str,
        *,
        expires: float | None = 86400.0,
        key_prefix: str = "celery-task-meta-",
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
        broker_url: str | None = None,
        reply_to: str = "",
        persistent: bool = False,
    ) -> None:
        """``broker_url``, ``reply_to`` and ``persistent`` (``result_persistent``) are
        read by ``rpc://`` only; a backend with an empty ``reply_to`` only stores."""

    def store(
        self,
        task_id: str,
        meta: Mapping[str, Any],
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Write ``meta`` (encoded by ``dumps``) with SETEX + PUBLISH; asynchronous and
        pipelined. ``TypeError`` if meta cannot be encoded. ``rpc://`` publishes it to
        the request's ``reply_to`` (nothing is sent when that is empty or None) with its
        ``correlation_id`` (default: ``task_id``); the other stores ignore both."""

    def get_meta(self, task_id: str) -> dict[str, Any] | None:
        """The stored meta, or None when there is none (PENDING)."""

    def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        """Block (GIL released, Ctrl-C honoured) until the task's meta has a ready state
        (SUCCESS, FAILURE, REVOKED) and return it. Subscribes first, then reads, so no
        update is missed. Raises ``TimeoutError`` after ``timeout`` seconds."""

    def forget(self, task_id: str) -> None: ...
    def flush(self, timeout: float = 10.0) -> None: ...
    def close(self) -> None: ...

class RateLimiter:
    """Per-task token buckets (capacity 1) for the worker's rate limits; one per
    worker process, as in Celery (limits are not cluster-wide)."""

    def __init__(self) -> None: ...
    def set(self, name: str, rate: float) -> None:
        """Limit ``name`` to ``rate`` messages per second; ``0`` removes the limit.
        ``ValueError`` for a negative or NaN rate."""

    def is_limited(self, name: str) -> bool: ...
    def acquire(self, name: str) -> float:
        """``0.0`` when a message of ``name`` may start now (a token is taken), else the
        seconds to wait before asking again."""

class EventPublisher:
    """Fire-and-forget broadcasts to a named exchange: Celery events (``celeryev``).
    Redis: one ``PUBLISH`` of the kombu envelope on ``/{db}.<exchange>/<routing_key>``;
    AMQP: ``basic.publish`` to the exchange (declared once with ``exchange_type`` and
    ``durable``), not mandatory. Written by an I/O task; best effort."""

    def __init__(
        self,
        url: str,
        *,
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> None:
        """Connect now; same errors as ``Producer`` (``OperationalError``,
        ``ValueError``); the SQLite broker raises ``ValueError`` (no broadcast)."""

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Any,
        *,
        headers: Mapping[str, Any] | None = None,
        exchange_type: str = "topic",
        durable: bool = True,
    ) -> None:
        """Encode ``body`` (``dumps``) and hand it over; never waits. ``TypeError``
        when it cannot be encoded."""

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything handed over was written (or given up after retries);
        ``OperationalError`` after ``timeout``."""

    @property
    def dropped(self) -> int:
        """Broadcasts given up so far (broker down, backlog full)."""

    def close(self) -> None: ...

class Mailbox:
    """Remote control's transport (kombu's pidbox on Redis only; ``ValueError`` for
    other brokers). Broadcasts are one ``PUBLISH`` on ``/{db}.<exchange>``; a direct
    publish is an ``LPUSH`` to each queue bound with the routing key in
    ``_kombu.binding.<exchange>``."""

    def __init__(
        self,
        url: str,
        *,
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> None: ...
    def subscribe(self, exchange: str) -> None:
        """``PSUBSCRIBE`` the exchange's channel on a connection of its own (resubscribes
        after a lost connection); messages wait for ``receive``."""

    def receive(self, timeout: float = 1.0) -> tuple[Any, Any] | None:
        """The next broadcast as ``(headers, body bytes)``; ``(None, reason)`` for one
        that is not a kombu envelope; None after ``timeout``."""

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Any,
        *,
        headers: Mapping[str, Any] | None = None,
        exchange_type: str = "direct",
    ) -> int:
        """Encode ``body`` and send it now (``fanout``: PUBLISH; else LPUSH to the bound
        queues); the number of receivers/queues reached."""

    def bind(self, exchange: str, routing_key: str, queue: str) -> None: ...
    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        """Remove the binding and delete the queue."""

    def pop(self, queue: str) -> tuple[Any, Any] | None:
        """The oldest message of ``queue`` (as ``receive``), or None."""

    def close(self) -> None: ...

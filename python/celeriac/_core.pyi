"""Type stubs for celeriac's Rust extension (src/py/)."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Generic, TypeVar, final

from typing_extensions import Self

_T = TypeVar("_T")

__version__: str

SEND_OPTIONS: Final[tuple[str, ...]]
"""Every ``Producer.send`` option name (listed once, in ``src/protocol/send.rs``)."""
DELAYED_DELIVERY_EXCHANGE: Final[str]
"""The exchange Celery publishes a natively delayed task to (``celery_delayed_27``)."""

class CeleriacError(Exception):
    """Base of every error celeriac raises itself (Celery's ``CeleryError``)."""

class OperationalError(CeleriacError):
    """The broker or the result store cannot be reached (kombu's ``OperationalError``)."""

class ClosedError(OperationalError):
    """The producer, consumer or result store was closed (or used after a fork);
    retrying cannot help, unlike a lost connection."""

class TimeoutError(CeleriacError):
    """A wait for a result ran out of time."""

class DecodeError(CeleriacError):
    """Bytes that are not valid JSON or not a message celeriac understands."""

class ContentDisallowed(DecodeError):
    """A result in a serializer not in ``result_accept_content`` (kombu's name)."""

def serializer_content_type(name: str) -> tuple[str, str]:
    """``(content type, content encoding)`` of a serializer name or content type
    (json, pickle, msgpack, yaml); ``ValueError`` for anything else."""

def compression_content_type(name: str) -> str:
    """kombu's ``compression`` header value for a method (``gzip``/``zlib``,
    ``bzip2``, ``lzma``/``xz``, ``zstd``, or the content type); ``ValueError`` else."""

def compress(data: bytes, method: str) -> bytes:
    """``data`` compressed as kombu's ``method`` does, by the Rust core."""

def decompress(data: bytes, method: str) -> bytes:
    """``compress`` undone; ``DecodeError`` when ``data`` is not ``method``'s output."""

def dumps(obj: Any) -> bytes:
    """JSON bytes as kombu writes them (type markers for datetime, date, time, Decimal,
    UUID and bytes; ``", "`` / ``": "`` separators; ASCII only). Raises ``TypeError``
    naming the offending type for anything else."""

def loads(data: bytes | str) -> Any:
    """Parse JSON, turning kombu type markers back into Python objects.
    Raises ``DecodeError`` on bad input."""

def uuid4() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())``: the default task id."""

def delayed_routing_key(seconds: int, routing_key: str) -> str:
    """The routing key of Celery's native delayed delivery for a delay of ``seconds``
    (at least 1) to ``routing_key``: ``ValueError`` for 0 or an empty key."""

def mask_url(url: str) -> str:
    """The URL with its password replaced by ``**`` (``redis://:**@host:6379/0``)."""

@final
class Producer:
    """Publishes task messages. One per app per process; thread-safe.

    ``send`` encodes in the calling thread and hands the frame to the I/O thread,
    which pipelines everything pending in one round trip.
    """

    def __new__(
        cls,
        url: str,
        *,
        origin: str,
        reply_to: str = "",
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> Self:
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

    def send_many(
        self,
        name: str,
        items: list[
            tuple[str | None, Sequence[Any], Mapping[str, Any]]
            | tuple[str | None, Sequence[Any], Mapping[str, Any], str, Mapping[str, Any] | None]
        ],
        queue: str,
        options: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Publish one message of task ``name`` per item, in one call: ``(task_id, args,
        kwargs)`` goes to ``queue`` with ``options`` (as ``send``'s); ``(task_id, args,
        kwargs, queue, options)`` has its own. A ``task_id`` of None gets a new one.
        Every message is encoded before any is published: a bad item raises
        ``TypeError`` (or ``ValueError``) naming its index, and nothing is sent.
        Returns the task ids, in order."""

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything sent so far is written. Raises ``OperationalError``
        when it could not be written within ``timeout`` seconds."""

    def close(self) -> None: ...

@final
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

@final
class Consumer:
    """Takes messages from queues (kombu's Redis layout: priority sub-lists,
    ``unacked`` hash + ``unacked_index`` zset)."""

    def __new__(
        cls,
        url: str,
        queues: Sequence[str],
        *,
        prefetch_count: int,
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
        accept_content: Sequence[str] | None = None,
    ) -> Self:
        """Connect now; same errors as ``Producer``. ``prefetch_count`` bounds the
        messages fetched and not yet acked (0 = unbounded). ``accept_content``:
        serializer names or content types decoded (default ``["json"]``); a message in
        any other is a delivery with ``error`` set, its body left undecoded."""

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Up to ``max_count`` deliveries (bounded by the prefetch window). Waits up to
        ``timeout`` seconds, GIL released, for at least one; ``[]`` when none came.
        Raises ``KeyboardInterrupt`` (or the signal handler's exception) promptly."""

    def ack(self, delivery_tags: Sequence[str]) -> None:
        """Ack these; written asynchronously, pipelined with other acks."""

    def reject(self, delivery_tag: str, requeue: bool) -> None:
        """``requeue=False`` drops the message; ``True`` puts it back in its queue."""

    def give_back(self, delivery_tags: Sequence[str]) -> None:
        """Put these fetched, unacked messages back in their queue, near the front
        (Redis: the front of the list, oldest first; RabbitMQ and SQLite: their place
        in line), and free their window slots, so another worker process can take them."""

    def extend_window(self, delta: int) -> None:
        """Grow (``delta > 0``) or shrink the prefetch window, one slot per message held
        for its ETA or rate limit (Celery's ``qos.increment_eventually``). Transports
        without a local window ignore it."""

    def add_queue(self, queue: str) -> bool:
        """Consume from ``queue`` too, declared as the worker's queues are
        (``add_consumer``); ``False`` when it is consumed already. Raises
        ``OperationalError`` when it cannot be declared or consumed."""

    def cancel_queue(self, queue: str) -> bool:
        """Stop consuming from ``queue`` (``cancel_consumer``); ``False`` when it was
        not consumed. Messages already fetched from it are still handed over."""

    def restore_unacked(self) -> int:
        """Put every message this consumer fetched and did not ack back in its queue
        (warm shutdown). Returns how many."""

    def close(self) -> None: ...

@final
class Backend:
    """The result store (``redis://``): ``celery-task-meta-<id>`` keys and pub/sub.
    ``rpc://``: results are messages on the AMQP broker ``broker_url``: each client
    reads its own reply queue ``reply_to`` (its oid, declared here as Celery 5.7 does:
    durable, auto-delete, ``x-expires`` = ``expires``)."""

    def __new__(
        cls,
        url: str,
        *,
        expires: float | None = 86400.0,
        key_prefix: str = "celery-task-meta-",
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
        broker_url: str | None = None,
        reply_to: str = "",
        persistent: bool = False,
        serializer: str = "json",
        compression: str | None = None,
        accept_content: Sequence[str] | None = None,
        ssl: bool | Mapping[str, Any] | None = None,
    ) -> Self:
        """``broker_url``, ``reply_to`` and ``persistent`` (``result_persistent``) are
        read by ``rpc://`` only; a backend with an empty ``reply_to`` only stores.
        ``serializer`` (``result_serializer``) writes and reads the metas;
        ``compression`` (``result_compression``, not for ``rpc://``) compresses what is
        written, as Celery 5.7 does; reading raises ``ContentDisallowed`` when
        ``serializer`` is not in ``accept_content`` (None: anything)."""

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
    # The chord join, on redis:// and sqlite:// (NotImplementedError on rpc://, Celery's
    # message); keys are this store's prefix + group id + ".j" / ".t" / ".s" / ".d" / ".c",
    # as Celery names them (SQLite: rows ".s", ".j:<index>:<id>", ".c"; one transaction each).
    def chord_set_size(self, group_id: str, size: int, expires: int) -> None:
        """The client's step before the last header message: DEL .c, SET .s."""

    def chord_part_begin(
        self,
        group_id: str,
        task_id: str,
        index: int | None,
        member: Any,
        expires: int,
        claim_expires: int,
        token: str,
    ) -> ChordJoin:
        """Record one header part (``member``: ``[1, id, state, result]``) in one
        script, without waiting: the part is on its way when this returns.
        ``ChordJoin.wait()`` gives ``(ready, total, claimed)``: ready -1 once the chord
        is done; claimed True for the one caller that must send the body."""

    def chord_results(self, group_id: str) -> list[Any]:
        """The recorded parts, decoded, in header order."""

    def chord_claim_extend(self, group_id: str, token: str, expires: int) -> bool: ...
    def chord_cleanup(self, group_id: str, token: str, done_expires: int) -> bool: ...
    def chord_drop_size(self, group_id: str) -> None: ...
    def flush(self, timeout: float = 10.0) -> None: ...
    def close(self) -> None: ...

@final
class ChordJoin:
    """One chord header part sent by ``Backend.chord_part_begin``, its reply not read yet."""

    def ready(self) -> bool:
        """Whether ``wait`` would return at once."""

    def wait(self) -> tuple[int, int, bool]:
        """``(ready, total, claimed)`` of the part; blocks (GIL released) until the
        store answered. Once only."""

@final
class BeatStore:
    """Beat's shared state: the last run of every entry of one schedule (microseconds
    since the epoch), in Redis (a hash ``celeriac-beat:<namespace>``) or the SQLite file
    (table ``beat_runs``). ``ValueError`` for another scheme, ``OperationalError`` when
    the store cannot be reached within ``timeout`` seconds."""

    def __new__(
        cls,
        url: str,
        namespace: str,
        *,
        global_keyprefix: str | None = None,
        timeout: float = 4.0,
        transport_options: dict[str, Any] | None = None,
        ssl: bool | Mapping[str, Any] | None = None,
        ssl_setting: str = "redis_backend_use_ssl",
    ) -> Self:
        """``transport_options``: a ``sentinel://`` store's ``master_name`` and
        ``sentinel_kwargs``; ``ssl``: the TLS setting of a Redis store (``ssl_setting``
        names it in errors)."""
    def register(self, names: list[str], now: int) -> list[int]:
        """Store ``now`` as the last run of the entries not stored yet; return every
        entry's stored last run, in order."""

    def claim(self, name: str, seen: int, run: int) -> tuple[bool, int | None]:
        """``(True, None)`` when this call moved the last run from ``seen`` to ``run``;
        else ``(False, stored)``: another beat moved it first (None: not stored)."""

    def claim_many(self, claims: list[tuple[str, int, int]]) -> list[tuple[bool, int | None]]:
        """``claim`` for ``[(name, seen, run), ...]`` in a few round trips; in order."""

    def entries(self) -> list[tuple[str, int]]: ...
    def prune(self, keep: list[str]) -> list[str]:
        """Drop the stored entries not in ``keep``; return their names."""

@final
class RateLimiter:
    """Per-task token buckets (capacity 1) for the worker's rate limits; one per
    worker process (a prefork node shares ``SharedRateLimiter``), as in Celery
    (limits are not cluster-wide)."""

    def __new__(cls) -> Self: ...
    def set(self, name: str, rate: float) -> None:
        """Limit ``name`` to ``rate`` messages per second; ``0`` removes the limit.
        ``ValueError`` for a negative or NaN rate."""

    def is_limited(self, name: str) -> bool: ...
    def acquire(self, name: str) -> float:
        """``0.0`` when a message of ``name`` may start now (a token is taken), else the
        seconds to wait before asking again."""

@final
class SharedRateLimiter:
    """``RateLimiter`` over buckets in shared memory: made before a prefork supervisor
    forks, its children all take tokens from the same buckets (a limit holds per node,
    as in Celery). Sized for ``names`` task names; names past that get buckets of
    their own process."""

    def __new__(cls, names: int) -> Self: ...
    def set(self, name: str, rate: float) -> None:
        """Limit ``name`` to ``rate`` messages per second for every process sharing the
        table (an unchanged rate keeps the bucket); ``0`` removes the limit.
        ``ValueError`` for a negative or NaN rate."""

    def is_limited(self, name: str) -> bool: ...
    def acquire(self, name: str) -> float:
        """``0.0`` when a message of ``name`` may start now (a token is taken), else the
        seconds to wait before asking again."""

    @property
    def capacity(self) -> int: ...

@final
class SharedCounters:
    """``count`` integers in shared memory (made before a fork, shared with the
    children), changed atomically. ``IndexError`` for an index past the end."""

    def __new__(cls, count: int) -> Self: ...
    def __len__(self) -> int: ...
    def add(self, index: int, delta: int = 1) -> int:
        """Add ``delta`` to counter ``index``; its new value."""

    def get(self, index: int) -> int: ...
    def set(self, index: int, value: int) -> None: ...

@final
class EtaSchedule(Generic[_T]):
    """Items held until a due time (UNIX seconds): the worker's ETA/countdown timer.
    Earliest due first, first pushed first among equal times. Subscriptable at run
    time (``EtaSchedule[Request]``)."""

    def __new__(cls) -> Self: ...
    def __len__(self) -> int: ...
    def push(self, due: float, item: _T) -> None:
        """Hold ``item`` until ``due``. ``ValueError`` for a NaN or infinite time."""

    def next_due(self) -> float | None:
        """The earliest due time, or None when empty."""

    def pop_due(self, now: float, limit: int | None = None) -> list[_T]:
        """Items due at ``now`` or earlier, earliest first, at most ``limit``
        (``ValueError`` if negative)."""

    def clear(self) -> list[_T]:
        """Remove and return everything still held, earliest first."""

    def remove(self, predicate: Callable[[_T], object]) -> list[_T]:
        """Remove and return the items ``predicate`` is true for, earliest first
        (revoke). It runs with the schedule unlocked, on a snapshot: an item
        ``pop_due`` hands out meanwhile is not removed. Its exception is raised and
        then nothing is removed."""

    def items(self) -> list[_T]:
        """Everything held, earliest first (for remote control's inspect)."""

@final
class EventPublisher:
    """Fire-and-forget broadcasts to a named exchange: Celery events (``celeryev``).
    Redis: one ``PUBLISH`` of the kombu envelope on ``/{db}.<exchange>/<routing_key>``;
    AMQP: ``basic.publish`` to the exchange (declared once with ``exchange_type`` and
    ``durable``), not mandatory; SQLite: a row of the ``broadcast`` log holding the
    Redis envelope. Written by an I/O task; best effort."""

    def __new__(
        cls,
        url: str,
        *,
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> Self:
        """Connect now; same errors as ``Producer`` (``OperationalError``,
        ``ValueError``)."""

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

@final
class EventReceiver:
    """Reads the broadcasts of ``exchange`` on the embedded SQLite broker (from the
    moment it is made); ``ValueError`` for other brokers (Celery's own receiver reads
    celeriac's events there)."""

    def __new__(
        cls,
        url: str,
        *,
        exchange: str = "celeryev",
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> Self: ...
    def receive(self, timeout: float = 1.0) -> tuple[str, Any, Any] | None:
        """``(routing_key, headers, body bytes)``; ``(routing_key, None, reason)`` for a
        broadcast that cannot be read; None after ``timeout``."""

@final
class Mailbox:
    """Remote control's transport (kombu's pidbox) on Redis, AMQP and the embedded
    SQLite broker (requests and replies are rows of its ``broadcast`` log; a bound
    reply queue sees what is sent after the bind). Redis: broadcasts are one ``PUBLISH`` on
    ``/{db}.<exchange>``; a direct publish is an ``LPUSH`` to each queue bound with the
    routing key in ``_kombu.binding.<exchange>``. AMQP: exchanges and exclusive,
    auto-delete queues with Celery 5.7's flags (``queue_expires``/``queue_ttl`` are
    ``control_queue_expires``/``control_queue_ttl``, seconds; None = no argument)."""

    def __new__(
        cls,
        url: str,
        *,
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
        queue_expires: float | None = 10.0,
        queue_ttl: float | None = 300.0,
    ) -> Self: ...
    def subscribe(
        self,
        exchange: str,
        queue: str = "",
        *,
        exchange_type: str = "fanout",
        routing_key: str = "",
        durable: bool = False,
    ) -> None:
        """Start receiving the exchange's broadcasts on a connection of its own
        (Redis: ``PSUBSCRIBE /{db}.<exchange>`` or, with a ``routing_key`` such as
        ``#``, ``/{db}.<exchange>/*``; AMQP: declare ``queue`` (the node's
        ``<node>.celery.pidbox``, or a monitor's ``celeryev.<uuid>``) exclusive and
        auto-delete, bind it with ``routing_key`` to the exchange declared with
        ``exchange_type``/``durable``, and consume it); resubscribes after a lost
        connection; messages wait for ``receive``."""

    def receive(self, timeout: float = 1.0) -> tuple[Any, Any] | None:
        """The next broadcast as ``(headers, body bytes)``; ``(None, reason)`` for one
        that is not a kombu envelope; None after ``timeout``."""

    @property
    def resubscriptions(self) -> int:
        """How many times the subscription was made again after its connection was
        lost (Redis, AMQP): broadcasts sent in between were missed."""

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Any,
        *,
        headers: Mapping[str, Any] | None = None,
        exchange_type: str = "direct",
    ) -> int:
        """Encode ``body`` and send it now (Redis ``fanout``: PUBLISH, else LPUSH to the
        bound queues: the number of receivers/queues reached; AMQP: basic.publish, 1)."""

    def bind(self, exchange: str, routing_key: str, queue: str) -> None:
        """Bind ``queue`` to ``exchange`` under ``routing_key`` (AMQP: declares the
        reply queue and consumes it for ``pop``)."""

    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        """Remove the binding and delete the queue."""

    def pop(self, queue: str, timeout: float = 0.0) -> tuple[Any, Any] | None:
        """The oldest message of ``queue`` (as ``receive``), waiting up to ``timeout``
        seconds for one; None if none came."""

    def purge(self, queue: str) -> int:
        """Remove every waiting message of the task queue ``queue`` (``celeriac
        purge``); the number removed (0 for a queue that does not exist)."""

    def close(self) -> None:
        """Stop receiving and close the connection (AMQP: the exclusive queues go)."""

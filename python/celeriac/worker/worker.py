"""The worker: connect, print the banner, take messages, run them, shut down cleanly.

One thread owns the ``Consumer`` (fetch, ack, reject, restore). The pool runs tasks;
``solo`` inline, ``threads`` on a ``ThreadPoolExecutor``. Message bookkeeping:

- ``reserved``: fetched, not started, unacked (they wait for a free pool slot);
- ``eta``: fetched with an ETA in the future, unacked, held until due;
- ``pool.active()``: running.

The three together never exceed the prefetch window (``concurrency *
worker_prefetch_multiplier``; 0 = unbounded). A task is acked just before it starts
(Celery's default) or after it finishes with ``acks_late``.

Shutdown: the first SIGTERM/SIGINT stops fetching, lets running tasks finish, acks them
and puts every fetched-but-not-started message back (``restore_unacked``). A second one
is a cold shutdown: it restores what it can and exits at once with status 1.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import sys
import time
import urllib.parse
from datetime import datetime, timezone
from types import FrameType
from typing import TYPE_CHECKING, Any

from celeriac import _core, states
from celeriac.exceptions import NotRegistered
from celeriac.result import exception_to_meta, meta_for
from celeriac.worker import banner as banner_mod
from celeriac.worker import pool as pool_mod
from celeriac.worker.eta import EtaSchedule
from celeriac.worker.options import POOLS, WorkerOptions, available_cpus, expand_nodename
from celeriac.worker.request import (
    Disposition,
    InvalidMessage,
    Request,
    execute,
    store_revoked_expired,
)

if TYPE_CHECKING:
    from celeriac._core import Backend, Consumer, Delivery
    from celeriac.app import Celeriac

logger = logging.getLogger("celeriac.worker")

EX_OK = 0
EX_FAILURE = 1

#: Longest wait in one ``fetch`` while idle; bounds how late a warm shutdown starts.
IDLE_WAIT = 1.0
#: ``fetch`` wait while thread-pool tasks run, so finished ones are acked promptly.
BUSY_WAIT = 0.1
#: Most messages taken in one ``fetch`` when the window is unbounded.
UNBOUNDED_BATCH = 100
#: Connection retry backoff: 1, 2, 4, 8, 8, ... seconds.
RETRY_MAX_INTERVAL = 8.0
#: Celery sends prefetch counts above this as 0 (unbounded).
MAX_PREFETCH = 65535


class ColdShutdown(BaseException):
    """Raised in the main thread by the second shutdown signal."""


class _StopFetch(BaseException):
    """Raised by the first shutdown signal when it lands while ``fetch`` waits, so the
    warm shutdown starts at once instead of after the wait."""


class WorkerError(Exception):
    """The worker cannot start with this configuration (message is user-facing)."""


def _setting(app: Celeriac, name: str, default: Any) -> Any:
    try:
        value = app.conf[name]
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def _say(text: str) -> None:
    """Write straight to stdout: safe inside a signal handler."""
    with contextlib.suppress(OSError):
        os.write(sys.__stdout__.fileno() if sys.__stdout__ else 1, f"\n{text}\n".encode())


def _scrub(text: str, url: str, masked: str) -> str:
    """Remove the URL's password from an error text, whatever its origin, and the
    ``cannot connect to <url>:`` prefix the core adds (the log line names the URL)."""
    text = text.replace(url, masked)
    prefix = f"cannot connect to {masked}: "
    if text.lower().startswith(prefix.lower()):
        text = text[len(prefix) :]
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(f":{password}@", ":**@")
        if len(password) >= 4:
            text = text.replace(password, "**")
    return text


class Worker:
    """A worker process for ``app``, configured by ``options``.

    The constructor checks the configuration (``WorkerError``); ``run`` does the work
    and returns the process exit status.
    """

    def __init__(self, app: Celeriac, options: WorkerOptions) -> None:
        self.app = app
        self.options = options
        self.loglevel = options.loglevel
        try:
            self.nodename = expand_nodename(options.hostname)
        except ValueError as exc:
            raise WorkerError(str(exc)) from None

        pool = options.pool
        if pool is None:
            configured = _setting(app, "worker_pool", None)
            pool = configured if configured in POOLS else "solo"
        if pool not in POOLS:
            raise WorkerError(f"pool {pool!r} is not available (choose from {', '.join(POOLS)})")
        self.pool_name: str = pool

        concurrency = options.concurrency
        if concurrency is None:
            configured = _setting(app, "worker_concurrency", None)
            if configured not in (None, "", "auto", 0):
                try:
                    concurrency = int(configured)
                except (TypeError, ValueError):
                    raise WorkerError(
                        f"worker_concurrency must be a positive integer, not {configured!r}"
                    ) from None
            else:
                concurrency = 1 if pool == "solo" else available_cpus()
        if concurrency < 1:
            raise WorkerError(f"concurrency must be at least 1, not {concurrency}")
        self.concurrency: int = concurrency

        multiplier = options.prefetch_multiplier
        if multiplier is None:
            multiplier = _setting(app, "worker_prefetch_multiplier", 4)
        try:
            multiplier = int(multiplier)
        except (TypeError, ValueError):
            raise WorkerError(
                f"worker_prefetch_multiplier must be an integer, not {multiplier!r}"
            ) from None
        if multiplier < 0:
            raise WorkerError(f"the prefetch multiplier must be 0 or more, not {multiplier}")
        window = concurrency * multiplier
        #: Most messages fetched and not finished; 0 = unbounded.
        self.window: int = 0 if window > MAX_PREFETCH else window

        queues = list(options.queues) or [str(_setting(app, "task_default_queue", "celery"))]
        queues = [q for q in queues if q not in options.exclude_queues]
        if not queues:
            raise WorkerError("every queue was excluded (-X): nothing to consume from")
        self.queues: list[str] = queues
        self.task_events = options.task_events or bool(
            _setting(app, "worker_send_task_events", False)
        )

        self.consumer: Consumer | None = None
        self.backend: Backend | None = None
        self.pool: pool_mod.Pool[Request, Disposition] = pool_mod.create(
            self.pool_name, self._job, self.concurrency
        )
        self.reserved: collections.deque[Request] = collections.deque()
        self.eta: EtaSchedule[Request] = EtaSchedule()
        self._stop_requested = False
        self._signals_seen = 0
        self._in_fetch = False
        self._previous_handlers: dict[int, Any] = {}

    # -- setup ---------------------------------------------------------------------

    def banner(self) -> str:
        app = self.app
        version = getattr(sys.modules.get("celeriac"), "__version__", None) or _core.__version__
        info = banner_mod.BannerInfo(
            nodename=self.nodename,
            version=str(version),
            app=f"{app.main or '__main__'}:{id(app):#x}",
            transport=app.broker_url_masked,
            results=app.backend_url_masked,
            concurrency=self.concurrency,
            pool=self.pool_name,
            task_events=False,
            queues=[self._queue_info(q) for q in self.queues],
            tasks=list(app.tasks),
        )
        return banner_mod.render(info, self.loglevel)

    def _queue_info(self, name: str) -> banner_mod.QueueInfo:
        try:
            spec = self.app.queues.get(name)
        except Exception:  # a bad task_queues setting is reported where it is used
            spec = None
        if spec is None:
            return banner_mod.QueueInfo(name, name, "direct", name)
        return banner_mod.QueueInfo(name, spec.exchange, spec.exchange_type, spec.routing_key)

    def _connect(self) -> Consumer | None:
        """The consumer, retrying per ``broker_connection_*``; None after giving up."""
        app = self.app
        url = app.broker_url
        masked = app.broker_url_masked
        retry = _setting(app, "broker_connection_retry_on_startup", None)
        if retry is None:
            retry = _setting(app, "broker_connection_retry", True)
        max_retries = _setting(app, "broker_connection_max_retries", 100) or 0
        timeout = float(_setting(app, "broker_connection_timeout", 4.0))
        options = _setting(app, "broker_transport_options", {}) or {}
        attempt = 0
        while not self._stop_requested:
            try:
                return _core.Consumer(
                    url,
                    self.queues,
                    prefetch_count=self.window,
                    transport_options=options,
                    connect_timeout=timeout,
                )
            except ValueError as exc:
                reason = _scrub(str(exc), url, masked)
                logger.error("consumer: Cannot connect to %s: %s", masked, reason)
                return None
            except _core.OperationalError as exc:
                attempt += 1
                reason = _scrub(str(exc), url, masked)
                if not retry:
                    logger.error(
                        "consumer: Cannot connect to %s: %s. Not retrying "
                        "(broker_connection_retry_on_startup is off).",
                        masked,
                        reason,
                    )
                    return None
                if max_retries and attempt > max_retries:
                    logger.error(
                        "consumer: Cannot connect to %s: %s. Giving up after %d retries.",
                        masked,
                        reason,
                        max_retries,
                    )
                    return None
                delay = min(2.0 ** (attempt - 1), RETRY_MAX_INTERVAL)
                limit = max_retries if max_retries else "unlimited"
                logger.error(
                    "consumer: Cannot connect to %s: %s. Trying again in %.2f seconds... (%d/%s)",
                    masked,
                    reason,
                    delay,
                    attempt,
                    limit,
                )
                self._sleep(delay)
        return None

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when a shutdown is requested."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    # -- signals -------------------------------------------------------------------

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_seen += 1
        if signum == signal.SIGQUIT or self._signals_seen >= 2:
            if self._signals_seen >= 3:
                os._exit(EX_FAILURE)
            _say("worker: Cold shutdown (MainProcess)")
            raise ColdShutdown()
        _say("worker: Warm shutdown (MainProcess)")
        self._stop_requested = True
        if self._in_fetch:
            raise _StopFetch()

    # -- main ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until told to stop; the process exit status."""
        self._install_signals()
        try:
            return self._run()
        except ColdShutdown:
            self._cold_shutdown()
            return EX_FAILURE  # not reached
        finally:
            self._restore_signals()

    def _run(self) -> int:
        print(self.banner(), file=sys.stdout, flush=True)
        if self.task_events:
            logger.warning(
                "-E/--task-events: celeriac does not send task events yet; "
                "monitors (Flower, celery events) will not see this worker's tasks."
            )
        self.consumer = self._connect()
        if self.consumer is None:
            return EX_OK if self._stop_requested else EX_FAILURE
        logger.info("Connected to %s", self.app.broker_url_masked)
        try:
            self.backend = self.app.backend
        except Exception as exc:
            logger.error("Cannot use the result backend %s: %s", self.app.backend_url_masked, exc)
            self.consumer.close()
            return EX_FAILURE
        logger.info("%s ready.", self.nodename)
        try:
            self._loop(self.consumer)
        except _StopFetch:
            pass  # the signal landed at the edge of a fetch: shut down as asked
        except _core.OperationalError as exc:
            logger.critical("consumer: %s; stopping.", exc)
            self._warm_shutdown(self.consumer)
            return EX_FAILURE
        return self._warm_shutdown(self.consumer)

    def _loop(self, consumer: Consumer) -> None:
        while not self._stop_requested:
            self._finish(consumer, self.pool.completed())
            self._release_due_eta()
            self._dispatch(consumer)
            if self._stop_requested:
                break
            wait = self._wait_budget()
            busy = bool(self.reserved) and self.pool.free_slots() == 0
            room = self._room()
            if not busy and room > 0:
                if self.pool.active():
                    wait = min(wait, BUSY_WAIT)
                for delivery in self._fetch(consumer, room, wait):
                    self._on_delivery(consumer, delivery)
            elif self.pool.active():
                self._finish(consumer, self.pool.completed(timeout=wait))
            else:
                self._sleep(wait)

    def _fetch(self, consumer: Consumer, count: int, wait: float) -> list[Delivery]:
        """A batch of deliveries; a lost connection is logged and retried (the consumer
        reconnects by itself), a closed consumer ends the worker."""
        try:
            self._in_fetch = True
            if self._stop_requested:
                return []
            return consumer.fetch(count, wait)
        except _StopFetch:
            return []  # deliveries not handed over stay in the consumer; restored
        except _core.OperationalError as exc:
            self._in_fetch = False
            if "closed" in str(exc):
                raise
            logger.error(
                "consumer: %s. Trying to re-establish the connection...",
                _scrub(str(exc), self.app.broker_url, self.app.broker_url_masked),
            )
            self._sleep(IDLE_WAIT)
            return []
        finally:
            self._in_fetch = False

    def _room(self) -> int:
        held = len(self.reserved) + self.pool.active() + len(self.eta)
        if self.window == 0:
            return max(0, UNBOUNDED_BATCH - len(self.reserved))
        return max(0, self.window - held)

    def _wait_budget(self) -> float:
        due = self.eta.next_due()
        if due is None:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, due - time.time()))

    # -- messages ------------------------------------------------------------------

    def _on_delivery(self, consumer: Consumer, delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        if delivery.error is not None:
            logger.error(
                "Received invalid task message: %s. The message has been dropped. "
                "[delivery_tag=%s%s]",
                delivery.error.rstrip(". "),
                tag,
                f" content_type={delivery.content_type}" if delivery.content_type else "",
            )
            consumer.ack([tag])
            return
        name = delivery.task or ""
        try:
            task = self.app.tasks[name]
        except KeyError:
            self._on_unregistered(consumer, delivery, name)
            return
        try:
            request = Request.from_delivery(delivery, task, self.app.conf, self.nodename)
        except InvalidMessage as exc:
            logger.error(
                "Received invalid task message: %s. The message has been dropped. "
                "[task=%s delivery_tag=%s]",
                str(exc).rstrip(". "),
                name,
                tag,
            )
            consumer.reject(tag, False)
            return
        logger.info("Task %s[%s] received", request.name, request.id)
        if request.expired():
            store_revoked_expired(self.backend, request)
            consumer.ack([tag])
            return
        if request.eta is not None and request.eta.timestamp() > time.time():
            self.eta.push(request.eta.timestamp(), request)
            return
        self.reserved.append(request)

    def _on_unregistered(self, consumer: Consumer, delivery: Delivery, name: str) -> None:
        logger.error(
            "Received unregistered task of type %r.\n"
            "The message has been ignored and discarded.\n\n"
            "Did you remember to import the module containing this task?\n"
            "Or maybe you're using relative imports?",
            name,
        )
        task_id = delivery.id
        if self.backend is not None and task_id:
            reason = exception_to_meta(NotRegistered(name))
            meta = meta_for(task_id, states.FAILURE, reason, None, delivery.headers)
            try:
                self.backend.store(task_id, meta)
            except Exception as exc:
                logger.error("Could not store the failure of task %s: %s", task_id, exc)
        consumer.reject(delivery.delivery_tag, False)

    def _release_due_eta(self) -> None:
        if len(self.eta):
            self.reserved.extend(self.eta.pop_due(time.time()))

    def _dispatch(self, consumer: Consumer) -> None:
        """Start reserved requests while the pool has room."""
        while self.reserved and not self._stop_requested:
            slots = self.pool.free_slots()
            if slots <= 0:
                return
            batch: list[Request] = []
            now = datetime.now(timezone.utc)
            while self.reserved and len(batch) < slots:
                request = self.reserved.popleft()
                if request.expired(now):
                    store_revoked_expired(self.backend, request)
                    consumer.ack([request.delivery_tag])
                    continue
                batch.append(request)
            early = [r.delivery_tag for r in batch if not r.acks_late]
            if early:
                consumer.ack(early)
            for request in batch:
                self.pool.submit(request)
            if self.pool_name == "solo":
                self._finish(consumer, self.pool.completed())

    def _job(self, request: Request) -> Disposition:
        """Runs in the pool. Never raises: a failure here is the worker's, not the task's."""
        try:
            return execute(request, self.backend)
        except ColdShutdown:
            raise
        except BaseException as exc:
            logger.critical(
                "Task %s[%s] INTERNAL ERROR: %r", request.name, request.id, exc, exc_info=True
            )
            return Disposition.ACK if request.acks_late else Disposition.NONE

    def _finish(self, consumer: Consumer, done: list[tuple[Request, Disposition]]) -> None:
        acks: list[str] = []
        for request, disposition in done:
            if disposition is Disposition.ACK:
                acks.append(request.delivery_tag)
            elif disposition is Disposition.REJECT:
                consumer.reject(request.delivery_tag, False)
            elif disposition is Disposition.REQUEUE:
                consumer.reject(request.delivery_tag, True)
        if acks:
            consumer.ack(acks)

    # -- shutdown ------------------------------------------------------------------

    def _warm_shutdown(self, consumer: Consumer) -> int:
        running = self.pool.active()
        if running:
            logger.info("Waiting for %d running task(s) to finish...", running)
        self.pool.join()
        self._finish(consumer, self.pool.completed())
        held = len(self.reserved) + len(self.eta)
        self.reserved.clear()
        self.eta.clear()
        status = EX_OK
        try:
            restored = consumer.restore_unacked()
            if restored or held:
                logger.info("Restored %d unacknowledged message(s) to the queue.", restored)
        except Exception as exc:
            logger.error("Could not restore %d unacknowledged message(s): %s", held, exc)
            status = EX_FAILURE
        try:
            self.app.close()  # flushes results and messages sent by tasks
        except Exception as exc:
            logger.error("Could not write every result or message: %s", exc)
            status = EX_FAILURE
        try:
            consumer.close()
        except Exception as exc:
            logger.warning("Error closing the broker connection: %s", exc)
        logger.info("%s stopped.", self.nodename)
        return status

    def _cold_shutdown(self) -> None:
        """Put back what we can, then leave without waiting for running tasks."""
        consumer = self.consumer
        if consumer is not None:
            try:
                consumer.restore_unacked()
            except BaseException as exc:
                logger.error("Cold shutdown: could not restore unacked messages: %s", exc)
        if self.backend is not None:
            try:  # results of tasks that did finish
                self.backend.flush(2.0)
            except BaseException as exc:
                logger.error("Cold shutdown: results may not have been stored: %s", exc)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EX_FAILURE)

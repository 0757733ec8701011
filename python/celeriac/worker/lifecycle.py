"""Start and stop: connect with retries, the banner, events, signals, warm and cold shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from celeriac import _core, signals
from celeriac.conf import setting
from celeriac.events import EventDispatcher, Heart
from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.transports import AMQP_SCHEMES, scheme_of
from celeriac.worker import banner as banner_mod
from celeriac.worker.base import (
    EX_FAILURE,
    EX_OK,
    RETRY_MAX_INTERVAL,
    ChildContext,
    ColdShutdown,
    StopFetch,
    scrub_error,
)
from celeriac.worker.consume import ConsumeMixin
from celeriac.worker.sigrelay import SignalRelay
from celeriac.worker.slots import State

if TYPE_CHECKING:
    from collections.abc import Callable

    from celeriac._core import Consumer
    from celeriac.worker.worker import Worker

logger = logging.getLogger("celeriac.worker")


def _say(text: str) -> None:
    """Write straight to stdout: safe inside a signal handler."""
    with contextlib.suppress(OSError):
        os.write(sys.__stdout__.fileno() if sys.__stdout__ else 1, f"\n{text}\n".encode())


class LifecycleMixin(ConsumeMixin):
    """Start and stop: connect with retries, the banner, events, signals, warm and cold shutdown."""

    def as_worker(self) -> Worker:
        """This object as the whole ``Worker`` it is a part of, for the supervisor and
        the mailbox, which use every part."""
        return cast("Worker", self)

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
            task_events=self.task_events,
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

    def _consumer_factory(self) -> Callable[[], Consumer]:
        app = self.app
        timeout = float(setting(app.conf, "broker_connection_timeout"))
        options = app.transport_options()
        accept = self.accept_content
        self._warn_direct_exchanges()
        return lambda: _core.Consumer(
            app.broker_url,
            self.queues,
            prefetch_count=self.window,
            transport_options=options,
            connect_timeout=timeout,
            accept_content=accept,
        )

    def _warn_direct_exchanges(self) -> None:
        """Celery's warning at start: with quorum queues (native delayed delivery), a
        queue on a direct exchange is not bound to ``celery_delayed_delivery``."""
        app = self.app
        try:
            if scheme_of(app.broker_url) not in AMQP_SCHEMES or not app.router.quorum:
                return
            specs = [app.queues.get(name) for name in self.queues]
        except Exception:  # a bad task_queues setting is reported where it is used
            return
        for spec in specs:
            if spec is not None and spec.exchange and spec.exchange_type == "direct":
                logger.warning(
                    "Exchange %s is a direct exchange and native delayed delivery do not "
                    "support direct exchanges. ETA tasks published to this exchange will "
                    "block the worker until the ETA arrives.",
                    spec.exchange,
                )

    def probe_factory(self) -> Callable[[], Any]:
        """The supervisor checks the broker with a producer: it consumes nothing."""
        app = self.app
        timeout = float(setting(app.conf, "broker_connection_timeout"))
        options = setting(app.conf, "broker_transport_options") or {}
        return lambda: _core.Producer(
            app.broker_url,
            origin=self.nodename,
            transport_options=options,
            connect_timeout=timeout,
        )

    def connect(self, factory: Callable[[], Any] | None = None) -> Any:
        """The consumer, retrying per ``broker_connection_*``; None after giving up."""
        if factory is None:
            factory = self._consumer_factory()
        app = self.app
        url = app.broker_url
        masked = app.broker_url_masked
        retry = setting(app.conf, "broker_connection_retry_on_startup")
        if retry is None:
            retry = setting(app.conf, "broker_connection_retry")
        max_retries = setting(app.conf, "broker_connection_max_retries") or 0
        attempt = 0
        while not self.stop_requested:
            try:
                return factory()
            except ValueError as exc:
                reason = scrub_error(str(exc), url, masked)
                logger.error("consumer: Cannot connect to %s: %s", masked, reason)
                return None
            except _core.OperationalError as exc:
                attempt += 1
                reason = scrub_error(str(exc), url, masked)
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

    def _install_signals(self) -> None:
        shutdown = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
        for sig in shutdown:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        self._relay = SignalRelay(shutdown)
        self._relay.start()

    def _restore_signals(self) -> None:
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._relay is not None:
            self._relay.handled()
        child = self.child
        if child is not None:
            wanted, task_id = child.table.terminate_request(child.index)
            if wanted == signum:
                # The supervisor stops the running task (revoke, terminate=True):
                # die by the signal if that task still runs, else ignore it.
                child.table.request_terminate(child.index, "", 0)
                if task_id and child.table.read(child.index).task_id == task_id:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
        self._signals_seen += 1
        if signum == signal.SIGQUIT or self._signals_seen >= 2:
            if self._signals_seen >= 3:
                os._exit(EX_FAILURE)
            if self.child is None:
                _say("worker: Cold shutdown (MainProcess)")
                signals.shutting_down(self.nodename, signum, cold=True)
            raise ColdShutdown()
        if self.child is None:
            _say("worker: Warm shutdown (MainProcess)")
            signals.shutting_down(self.nodename, signum, cold=False)
        self.stop_requested = True
        if self._in_fetch:
            raise StopFetch()

    def _on_soft_limit(self, signum: int, frame: FrameType | None) -> None:
        """SIGALRM in a prefork child: the running task's soft time limit passed."""
        if self._in_task:
            self._in_task = False  # raise once
            logger.warning("Soft time limit exceeded for the running task")
            raise SoftTimeLimitExceeded()

    def init_fixups(self) -> None:
        """The frameworks' worker_init (Django's checks), once, in the main process."""
        for fixup in self.app.fixups:
            fixup.on_worker_init(self)

    def run(self) -> int:
        """Serve in this process until told to stop (solo and threads pools, or a prefork
        child: the command line runs the prefork supervisor instead); the exit status."""
        if self.child is None:
            self.init_fixups()
        self._install_signals()
        try:
            return self._run()
        except ColdShutdown:
            self._cold_shutdown()
            return EX_FAILURE  # not reached
        finally:
            self._restore_signals()

    def _run(self) -> int:
        print(self.banner(), file=sys.__stdout__, flush=True)
        self.warn_task_events()
        if self.pool_name == "solo":  # as Celery's solo pool: this process runs tasks
            signals.worker_process_init.send(sender=self.nodename)
        return self._serve()

    def warn_task_events(self) -> None:
        """Kept for callers; events are sent now (``start_events``)."""

    def start_events(self, counts: Callable[[], tuple[int, int]] | None = None) -> None:
        """This process's dispatcher; with ``counts`` (the process that speaks for
        the node) also the heart: worker-online now, a heartbeat every 2 s."""
        if self.events is not None and self.events.pid != os.getpid():
            self.events = self.heart = None  # inherited through fork: not ours
        if self.events is None:
            self.events = EventDispatcher(self.app, self.nodename, enabled=self.task_events)
        if counts is not None and self.heart is None and self.options.heartbeat:
            self.heart = Heart(self.events, counts, self.heartbeat_interval)
            self.heart.start()

    def stop_events(self) -> None:
        """worker-offline (from the heart's owner), then send what is buffered."""
        events, heart = self.events, self.heart
        self.events = self.heart = None
        if events is None or events.pid != os.getpid():
            return
        try:
            if heart is not None:
                heart.stop()
            events.close()
        except Exception as exc:
            logger.warning("Could not send the last events: %s", exc)

    def _serve(self) -> int:
        self.consumer = self.connect()
        if self.consumer is None:
            return EX_OK if self.stop_requested else EX_FAILURE
        if self.child is None:
            logger.info("Connected to %s", self.app.broker_url_masked)
        try:
            self.backend = self.app.backend
        except Exception as exc:
            logger.error("Cannot use the result backend %s: %s", self.app.backend_url_masked, exc)
            self.consumer.close()
            return EX_FAILURE
        if self.child is not None:
            self.start_events()
            self._settle_inherited(self.consumer, self.child)
            self.child.publish(State.IDLE)
        else:
            self.start_events(lambda: (self.pool.active(), self.processed))
            from celeriac.worker.pidbox import Pidbox

            self.pidbox = Pidbox(self.as_worker())
            self.pidbox.start()
            signals.worker_ready.send(sender=self)
            logger.info("%s ready.", self.nodename)
        try:
            self._loop(self.consumer)
        except StopFetch:
            pass  # the signal landed at the edge of a fetch: shut down as asked
        except _core.OperationalError as exc:
            logger.critical("consumer: %s; stopping.", exc)
            self._warm_shutdown(self.consumer)
            return EX_FAILURE
        return self._warm_shutdown(self.consumer)

    def _warm_shutdown(self, consumer: Consumer) -> int:
        running = self.pool.active()
        if running:
            logger.info("Waiting for %d running task(s) to finish...", running)
        self.pool.join()
        self._finish(consumer, self.pool.completed())
        self.settle_joins_in_flight(block=True)
        held = len(self.reserved) + len(self.eta)
        self.reserved.clear()
        self._unhold(consumer, self.eta.clear())
        status = EX_OK
        if self.pidbox is not None:
            self.pidbox.stop()
            self.pidbox = None
        self.stop_events()
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
        if self.child is None:
            signals.worker_shutdown.send(sender=self)
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
        if self.pidfile is not None:
            self.pidfile.release()  # only the process that wrote it removes it
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EX_FAILURE)

    def _settle_inherited(self, consumer: Consumer, ctx: ChildContext) -> None:
        """Ack or requeue the messages of tasks whose child died (the supervisor has
        no broker connection of its own)."""
        for tag, requeue in ctx.pending:
            try:
                if requeue:
                    consumer.reject(tag, True)
                else:
                    consumer.ack([tag])
            except Exception as exc:
                logger.error("Could not settle message %s of a lost worker: %s", tag, exc)
        ctx.pending = []

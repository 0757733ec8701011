"""The consume loop: fetch within the prefetch window, route each message, dispatch to the pool."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from celeriac import _core, _trace, signals, states
from celeriac.exceptions import NotRegistered
from celeriac.result import exception_to_meta, meta_for
from celeriac.signals import task_received
from celeriac.worker import pool as pool_mod
from celeriac.worker.announce import announce_received, prepare_received
from celeriac.worker.base import (
    BUSY_WAIT,
    IDLE_WAIT,
    MAX_PREFETCH,
    QUICK_RUN,
    UNBOUNDED_BATCH,
    ColdShutdown,
    StopFetch,
    scrub_error,
)
from celeriac.worker.held import HeldMixin
from celeriac.worker.request import (
    InvalidMessage,
    Request,
    parse_time,
    store_revoked_expired,
)
from celeriac.worker.revoke import store_revoked
from celeriac.worker.slots import State

if TYPE_CHECKING:
    from celeriac._core import Consumer, Delivery

logger = logging.getLogger("celeriac.worker")


class ConsumeMixin(HeldMixin):
    """The consume loop: fetch within the window, route each message, dispatch it."""

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when a shutdown is requested."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def _loop(self, consumer: Consumer) -> None:
        child = self.child
        while not self.stop_requested:
            if child is not None:
                if os.getppid() != child.parent_pid:
                    logger.error("The supervisor is gone; stopping.")
                    raise ColdShutdown()
                if child.retiring:
                    break
            self._finish(consumer, self.pool.completed())
            if self._revoke_pending:
                self._settle_revoked(consumer)
            self._release_due_eta(consumer)
            self._dispatch(consumer)
            if self.events is not None:
                self.events.flush()
            if self.stop_requested:
                break
            wait = self._wait_budget()
            if self.joins_in_flight:  # settled when nothing else is to be done
                wait = min(wait, BUSY_WAIT)
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
            if self.stop_requested:
                return []
            deliveries: list[Delivery] = []
            if self.joins_in_flight:
                # Chord parts in flight: take what is here already, else settle them
                # (one may send a chord's body) before waiting for more.
                deliveries = consumer.fetch(count, 0.0)
                if not deliveries:
                    self._in_fetch = False  # a shutdown signal must not cut a body's send
                    self.settle_joins_in_flight(block=True)
                    self._in_fetch = True
                    if self.stop_requested:
                        return []
            if not deliveries:
                deliveries = consumer.fetch(count, wait)
            if _trace.ENABLED and deliveries:
                _trace.hop("py.fetched")
            return deliveries
        except StopFetch:
            return []  # deliveries not handed over stay in the consumer; restored
        except _core.ClosedError:
            raise  # the consumer was closed on purpose: the worker ends
        except _core.OperationalError as exc:
            self._in_fetch = False
            logger.error(
                "consumer: %s. Trying to re-establish the connection...",
                scrub_error(str(exc), self.app.broker_url, self.app.broker_url_masked),
            )
            self._sleep(IDLE_WAIT)
            return []
        finally:
            self._in_fetch = False

    def _room(self) -> int:
        # Held messages that widened the window do not take a slot of it. Those revoke
        # took out of ``eta`` are still fetched (and counted in the extras) until
        # ``_settle_revoked`` acks them.
        held_in_window = (
            len(self.eta) + len(self._revoked_held) - self._eta_extra - self._rate_extra
        )
        held = len(self.reserved) + self.pool.active() + held_in_window
        if self.window == 0:
            return max(0, UNBOUNDED_BATCH - len(self.reserved))
        return max(0, self.window - held)

    def _wait_budget(self) -> float:
        due = self.eta.next_due()
        if due is None:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, due - time.time()))

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
            # Rejected, not acked: a RabbitMQ queue with a dead-letter exchange keeps it.
            consumer.reject(tag, False)
            signals.task_rejected.send(
                sender=self, message=delivery, exc=InvalidMessage(delivery.error)
            )
            return
        name = delivery.task or ""
        try:
            task = self.app.tasks[name]
        except KeyError:
            self._on_unregistered(consumer, delivery, name)
            return
        try:
            request = Request.from_delivery(
                delivery, task, self.app.conf, self.nodename, self._policy(name, task)
            )
        except InvalidMessage as exc:
            logger.error(
                "Received invalid task message: %s. The message has been dropped. "
                "[task=%s delivery_tag=%s]",
                str(exc).rstrip(". "),
                name,
                tag,
            )
            consumer.reject(tag, False)
            signals.task_rejected.send(sender=self, message=delivery, exc=exc)
            return
        logger.info("Task %s[%s] received", request.name, request.id)
        if self.events is not None and self.events.enabled:
            prepare_received(request, self.events)
            if not self._gives_back():  # else announced once kept (announce.py)
                announce_received(request)
        if request.expired():
            announce_received(request)
            store_revoked_expired(self.backend, request)
            consumer.ack([tag])
            return
        if self.revoked.ids and request.id in self.revoked:
            announce_received(request)
            store_revoked(self.backend, request)
            consumer.ack([tag])
            return
        if task_received.receivers:
            if self._gives_back():
                request.received_by = self  # sent once kept, as task-received is
            else:
                task_received.send(sender=self, request=request)
        if not self._async_window_open and name in self.async_tasks:
            self._open_async_window(consumer)
        if request.eta is not None and request.eta.timestamp() > time.time():
            self._hold(consumer, request, request.eta.timestamp(), rate=False)
            return
        self.reserved.append(request)

    def _open_async_window(self, consumer: Consumer) -> None:
        """Widen the prefetch window for coroutines, once per process (a consumer made
        after a reconnect starts with the widened window)."""
        self._async_window_open = True
        if self.window:
            extra = min(MAX_PREFETCH, self.window + self.async_concurrency) - self.window
            self.window += extra
            consumer.extend_window(extra)

    def _run_in_child(self, consumer: Consumer, request: Request) -> None:
        """Run a sync task inline in a prefork child. Unless the task is known to be
        quick, the child first gives back what it prefetched (``_make_way``), and takes
        its window up again once the task is done."""
        name = request.task.name or ""
        narrowed = 0 if self._quick.get(name) else self._make_way(consumer)
        if self.events is not None:
            # Out before the task can send its retry: a sibling announces that one, and
            # a monitor must not get this delivery's task-received after it.
            self.events.flush()
        started = time.monotonic()
        try:
            self.pool.submit(request)
        finally:
            self._quick[name] = time.monotonic() - started < QUICK_RUN
            if narrowed:
                self._take_up(consumer, narrowed)

    def _gives_back(self) -> bool:
        """Whether this process may give back messages it fetched (``_make_way``)."""
        return self.child is not None and self.concurrency >= 2 and bool(self.window)

    def _make_way(self, consumer: Consumer) -> int:
        """Celery's ``-O fair``: its parent hands a message only to an idle child. Here
        each child prefetches its own, so before a task that may be long the child puts
        back the messages it holds and has not started (at the front of the queue) and
        closes its window while the task runs: an idle sibling takes them instead of
        them waiting behind this task. Returns how far the window was narrowed."""
        if self.concurrency < 2 or not self.window:
            return 0
        # One past its expiry is settled here (REVOKED, acked), not given back: Celery
        # sends ``expires`` to RabbitMQ as a TTL too, and the broker drops a message it
        # gets back past its TTL, without the worker's record.
        tags: list[str] = []
        for request in self.reserved:
            if request.expired():
                store_revoked_expired(self.backend, request)
                consumer.ack([request.delivery_tag])
            else:
                tags.append(request.delivery_tag)
        self.reserved.clear()
        try:
            # Stop the deliveries themselves while the task runs: a window narrowed to
            # nothing would still let a fetch in flight (a blocked BRPOP, RabbitMQ's
            # basic.qos, which cannot be 0) bring one more message to wait behind it.
            self._paused = [q for q in self.queues if consumer.cancel_queue(q)]
            consumer.extend_window(-self.window)
            # Messages the consumer fetched that Python has not seen yet go back too.
            for delivery in consumer.fetch(MAX_PREFETCH, 0.0):
                try:
                    expires = parse_time(delivery.headers.get("expires"), "expires")
                except InvalidMessage:
                    expires = None  # the sibling that takes it reports the bad header
                if expires is not None and expires.timestamp() <= time.time():
                    self._on_delivery(consumer, delivery)  # REVOKED and acked
                else:
                    tags.append(delivery.delivery_tag)
            if tags:
                consumer.give_back(tags)
        except Exception as exc:  # the broker requeues them when the connection ends
            logger.warning("Could not give back %d prefetched message(s): %s", len(tags), exc)
        return self.window

    def _take_up(self, consumer: Consumer, narrowed: int) -> None:
        """Undo ``_make_way`` once the long task is done."""
        paused, self._paused = self._paused, []
        try:
            consumer.extend_window(narrowed)
            for queue in paused:
                if queue in self.queues:  # not cancelled by remote control meanwhile
                    consumer.add_queue(queue)
        except Exception as exc:
            logger.error("Could not resume consuming after a long task: %s", exc)
            raise _core.OperationalError(f"could not resume consuming: {exc}") from exc

    def _on_unregistered(self, consumer: Consumer, delivery: Delivery, name: str) -> None:
        logger.error(
            "Received unregistered task of type %r.\n"
            "The message has been ignored and discarded.\n\n"
            "Did you remember to import the module containing this task?\n"
            "Or maybe you're using relative imports?",
            name,
        )
        task_id = delivery.id
        if self.events is not None and self.events.enabled and task_id:
            self.events.send_task(
                "task-failed",
                uuid=task_id,
                exception=repr(NotRegistered(name)),
                traceback=None,
            )
        if self.backend is not None and task_id:
            reason = exception_to_meta(NotRegistered(name))
            meta = meta_for(task_id, states.FAILURE, reason, None, delivery.headers)
            try:
                # rpc:// answers the sender's reply queue, as for any other result.
                self.backend.store(
                    task_id,
                    meta,
                    reply_to=delivery.reply_to,
                    correlation_id=delivery.correlation_id or task_id,
                )
            except Exception as exc:
                logger.error("Could not store the failure of task %s: %s", task_id, exc)
        consumer.reject(delivery.delivery_tag, False)
        signals.task_unknown.send(
            sender=self, message=delivery, exc=NotRegistered(name), name=name, id=task_id
        )

    def _dispatch(self, consumer: Consumer) -> None:
        """Start reserved requests whose kind (sync, ``async def``) has a free slot in
        the pool, so each one starts as it is submitted and an early ack lands just
        before it runs. A request of a full kind stays reserved (unacked, in its place)
        and does not hold up the other kind.

        In a prefork child each task counts toward ``--max-tasks-per-child`` here, as
        it is handed over (coroutines too); the last one retires the child: it takes
        nothing more, lets what runs finish and gives the rest back."""
        pool = self.pool
        if isinstance(pool, pool_mod.SoloPool):
            return self._dispatch_inline(consumer)
        child = self.child
        while self.reserved and not self.stop_requested:
            room = pool.free_slots()
            if room <= 0:
                return
            free: dict[str, int] = {}  # slots left per kind in this batch
            batch: list[Request] = []
            sync: list[Request] = []  # submitted last: solo runs it inline
            kept: list[Request] = []  # of a full kind: they stay reserved
            while self.reserved and room > 0:
                request = self.reserved.popleft()
                kind = pool.kind(request)
                left = free.get(kind)
                if left is None:
                    left = free[kind] = pool.free_slots_for(kind)
                if left <= 0:
                    kept.append(request)
                    continue
                announce_received(request)
                if not self._may_start(consumer, request):
                    continue
                free[kind] = left - 1
                room -= 1
                (sync if kind == pool_mod.SYNC else batch).append(request)
                if self._count_for_child(request):
                    break
            if kept:
                self.reserved.extendleft(reversed(kept))
            batch += sync
            if not batch:
                return  # every kind with room was looked at: nothing can start now
            self.processed += len(batch)
            early = [r.delivery_tag for r in batch if not r.acks_late]
            if early:
                if self.disable_prefetch:  # the slots stay taken while they run
                    self._slots_held += len(early)
                    consumer.extend_window(-len(early))
                consumer.ack(early)
            for request in batch:
                if child is not None and pool.kind(request) == pool_mod.SYNC:
                    self._run_in_child(consumer, request)
                else:
                    pool.submit(request)
            if pool.name == "solo":  # also each prefork child: ack at once
                self._finish(consumer, pool.completed())

    def _count_for_child(self, request: Request) -> bool:
        """Count a task handed over in a prefork child toward ``--max-tasks-per-child``
        (sync or coroutine; not a revoked one). True when it is the child's last: the
        child then takes nothing more, lets what runs finish and gives the rest back."""
        child, most = self.child, self.max_tasks_per_child
        if child is None or most is None or self.is_revoked(request.id):
            return False
        child.tasks_done += 1
        if child.tasks_done < most:
            return False
        child.retiring = True  # the supervisor starts the replacement now
        self.stop_requested = True
        child.publish(State.RETIRING)
        return True

    def _may_start(self, consumer: Consumer, request: Request) -> bool:
        """False for a request that expired (REVOKED stored, acked) or must wait for
        its rate limit (held, unacked); True when it may start now."""
        if request.expires is not None and request.expired():
            store_revoked_expired(self.backend, request)
            consumer.ack([request.delivery_tag])
            return False
        if self.rate_limits_enabled:
            wait = self._rate_wait(request)
            if wait > 0:
                self._hold(consumer, request, time.time() + wait, rate=True)
                return False
        return True

    def _dispatch_inline(self, consumer: Consumer) -> None:
        """``_dispatch`` for a process that runs every task in this thread (``solo``,
        a prefork child without coroutines): one task at a time, each early ack just
        before its task; late acks go in one call once the reserved ones are done."""
        child = self.child
        reserved = self.reserved
        while reserved and not self.stop_requested:
            request = reserved.popleft()
            announce_received(request)
            if not self._may_start(consumer, request):
                continue
            self._count_for_child(request)
            self.processed += 1
            if not request.acks_late:
                if self.disable_prefetch:  # the slot stays taken while it runs
                    self._slots_held += 1
                    consumer.extend_window(-1)
                consumer.ack([request.delivery_tag])
            if child is not None:
                self._run_in_child(consumer, request)
            else:
                if _trace.ENABLED:
                    _trace.hop("py.submit")
                self.pool.submit(request)
        self._finish(consumer, self.pool.completed())

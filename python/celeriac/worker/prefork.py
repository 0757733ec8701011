"""The prefork pool: a supervisor process and ``-c`` forked children.

Each child is a complete solo worker with its own broker connection, Rust consumer,
producer and result backend (the Rust runtime is rebuilt per pid). No task traffic
passes between the supervisor and its children: the supervisor only forks them, reads
the shared slot table (``slots.py``) and reacts:

- a child that dies is replaced; the task it was running is marked FAILURE with
  ``WorkerLostError`` (or its message is put back, under ``acks_late`` with
  ``task_reject_on_worker_lost``). The supervisor has no broker connection: the ack or
  requeue of that message is done by the replacement child, and the dead child's
  prefetched messages come back through the broker's heartbeat recovery;
- a task past its hard time limit gets its child killed (SIGKILL) and FAILURE
  ``TimeLimitExceeded`` stored; soft limits are raised inside the child;
- a child that is about to retire (``--max-tasks-per-child``,
  ``--max-memory-per-child``) gets its replacement forked at once;
- the first SIGTERM/SIGINT is a warm shutdown of every child, the second a cold one;
- remote control: the supervisor holds the node's mailbox and reaches its children
  through a socket pair each (``celeriac.worker.pidbox.ChildLinks``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any

from celeriac import signals, states
from celeriac.exceptions import TaskRevokedError, TimeLimitExceeded, WorkerLostError
from celeriac.result import meta_for
from celeriac.worker import canvas_lost
from celeriac.worker.pidbox import ChildLinks, Pidbox
from celeriac.worker.revoke import signal_name
from celeriac.worker.slots import Flag, Slot, SlotTable, State

if TYPE_CHECKING:
    from celeriac.worker.worker import Worker

logger = logging.getLogger("celeriac.worker.prefork")

EX_OK = 0
EX_FAILURE = 1
#: How often the supervisor looks at its children.
TICK = 0.05
#: Children that die before they are ready, in a row, before the worker gives up.
MAX_STARTUP_FAILURES = 5
#: Longest wait for the children to stop in a cold shutdown before SIGKILL.
COLD_WAIT = 10.0
#: How long a child has to die of a terminate revoke's signal before SIGKILL.
TERMINATE_GRACE = 3.0


def describe_exit(status: int) -> str:
    """``exitcode 1`` or ``signal 9 (SIGKILL)``, as Celery words a child's end."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "?"
        return f"signal {number} ({name})"
    return f"exitcode {os.waitstatus_to_exitcode(status)}"


def _reply_options(slot: Slot) -> dict[str, Any]:
    """Where an ``rpc://`` result of the slot's task goes (other backends ignore it)."""
    return {"reply_to": slot.reply_to, "correlation_id": slot.correlation_id or slot.task_id}


class _Child:
    def __init__(self, pid: int, index: int, number: int) -> None:
        self.pid = pid
        self.index = index
        self.number = number
        self.started = time.monotonic()
        self.ever_ready = False
        #: Set when the supervisor killed it for a hard time limit: the limit.
        self.hard_killed: float | None = None
        #: ``(task id, signal, deadline)`` of a revoke that stops its running task;
        #: past the deadline (the signal did not end it) it gets SIGKILL.
        self.terminating: tuple[str, int, float] | None = None


class Supervisor:
    """Runs ``worker`` as a prefork pool; ``run`` returns the exit status."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        worker.supervisor = self
        self.concurrency = worker.concurrency
        self.table = SlotTable(2 * self.concurrency + 2)
        self.children: dict[int, _Child] = {}
        self.pending: list[tuple[str, bool]] = []
        self._numbers = 0
        self._signals = 0
        self._cold = False
        self._ready_logged = False
        self._startup_failures = 0
        self._previous: dict[int, Any] = {}
        self._status = EX_OK
        #: Remote control: the node's mailbox (once ready) and the links to children.
        self.links = ChildLinks()
        self.pidbox: Pidbox | None = None
        #: Pool size changes asked by remote control, applied by the main loop.
        self._resizes: list[int] = []

    # -- signals -------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if signum == signal.SIGQUIT or self._signals >= 2:
            if not self._cold:
                self._say("worker: Cold shutdown (MainProcess)")
                signals.shutting_down(self.worker.nodename, signum, cold=True)
            self._cold = True
            self.worker.stop_requested = True
        else:
            self._say("worker: Warm shutdown (MainProcess)")
            signals.shutting_down(self.worker.nodename, signum, cold=False)
            self.worker.stop_requested = True

    @staticmethod
    def _say(text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(sys.__stdout__.fileno() if sys.__stdout__ else 1, f"\n{text}\n".encode())

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    # -- main ----------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            return self._run()
        finally:
            self._restore_signals()

    def _run(self) -> int:
        worker = self.worker
        print(worker.banner(), file=sys.__stdout__, flush=True)
        worker.warn_task_events()
        probe = worker.connect(worker.probe_factory())
        if probe is None:
            return EX_OK if worker.stop_requested else EX_FAILURE
        with contextlib.suppress(Exception):
            probe.close()
        del probe
        logger.info("Connected to %s", worker.app.broker_url_masked)
        try:
            self.backend = worker.app.backend
        except Exception as exc:
            logger.error("Cannot use the result backend %s: %s", worker.app.backend_url_masked, exc)
            return EX_FAILURE
        sys.stdout.flush()
        sys.stderr.flush()
        while not worker.stop_requested:
            self._reap()
            self._enforce_time_limits()
            self._apply_resizes()
            self._fill()
            if not self._ready_logged and self._all_ready():
                self._ready_logged = True
                # Counted by the children as their tasks start and end (node_stats).
                worker.start_events(self.table.stats.counts)
                self.pidbox = Pidbox(worker, supervisor=self)
                self.pidbox.links = self.links
                self.pidbox.start()
                signals.worker_ready.send(sender=worker)
                logger.info("%s ready.", worker.nodename)
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                logger.critical(
                    "%d worker processes in a row exited before they were ready; stopping.",
                    self._startup_failures,
                )
                self._status = EX_FAILURE
                break
            time.sleep(TICK)
        return self._shutdown()

    def _all_ready(self) -> bool:
        if len(self.children) < self.concurrency:
            return False
        for child in self.children.values():
            if not child.ever_ready:
                state = self.table.read(child.index).state
                if state in (State.FREE, State.STARTING):
                    return False
                child.ever_ready = True
        return True

    # -- children ------------------------------------------------------------------

    def _active(self) -> int:
        """Children that count toward ``-c`` (not retiring)."""
        count = 0
        for child in self.children.values():
            if self.table.read(child.index).state is not State.RETIRING:
                count += 1
        return count

    def _fill(self) -> None:
        missing = self.concurrency - self._active()
        for _ in range(max(0, missing)):
            if self.worker.stop_requested:
                return
            index = self._free_index()
            if index is None:
                return
            self._spawn(index)

    def _free_index(self) -> int | None:
        used = {child.index for child in self.children.values()}
        for index in range(self.table.count):
            if index not in used:
                return index
        return None

    def _spawn(self, index: int) -> None:
        from celeriac.worker.base import ChildContext

        self._numbers += 1
        number = self._numbers
        self.table.clear(index)
        self.table.write(index, Slot(state=State.STARTING))
        pending, self.pending = self.pending, []
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        control_end = self.links.before_fork(index)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the supervisor's stack
            status = EX_FAILURE
            try:
                for sig in (signal.SIGTERM, signal.SIGQUIT):
                    signal.signal(sig, signal.SIG_DFL)
                self.links.after_fork_child(self.worker, control_end)
                ctx = ChildContext(index, number, self.table, parent, pending)
                status = self.worker.run_child(ctx)
            except BaseException:
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        control_end.close()
        self.children[pid] = _Child(pid, index, number)

    def resize(self, delta: int) -> None:
        """Grow (``delta`` > 0) or shrink the pool; called by remote control from its
        thread, applied by the main loop."""
        self._resizes.append(delta)

    def _apply_resizes(self) -> None:
        while self._resizes:
            delta = self._resizes.pop(0)
            # Leave a slot of the table for a child that retires.
            wanted = max(1, min(self.table.count - 1, self.concurrency + delta))
            excess = self.concurrency - wanted
            self.concurrency = wanted
            if excess <= 0:
                continue

            # Warm-stop the extra children, idle ones first; they are not replaced.
            def busy(child: _Child) -> bool:
                return self.table.read(child.index).state is not State.IDLE

            for child in sorted(self.children.values(), key=busy)[:excess]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._on_exit(child, status)

    def _on_exit(self, child: _Child, status: int) -> None:
        self.links.detach(child.index)
        slot = self.table.read(child.index)
        self.table.clear(child.index)
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        name = f"ForkPoolWorker-{child.number}"
        if not clean:
            logger.error(
                "Process '%s' pid:%d exited with '%s'", name, child.pid, describe_exit(status)
            )
            if not child.ever_ready and slot.state in (State.STARTING, State.FREE):
                self._startup_failures += 1
            else:
                self._startup_failures = 0
        else:
            self._startup_failures = 0
        if slot.task_id:
            self._task_lost(slot, child, status)
        canvas_lost.discard(os.getpid(), child.index)

    def running_ids(self) -> list[str] | None:
        """Ids of the tasks the children run now: sync ones from the slot table, and
        with ``async def`` tasks, what the children answer to ``active``; None when a
        child did not answer (what it runs is not known)."""
        children = list(self.children.values())
        ids = []
        for child in children:
            slot = self.table.read(child.index)
            if slot.task_id and slot.state in (State.RUNNING, State.RETIRING):
                ids.append(slot.task_id)
        if self.worker.async_tasks:
            try:
                answers = self.links.ask("active", {})
            except Exception as exc:
                logger.warning("Could not ask the children what they run: %s", exc)
                return None
            if len(answers) < len(children):
                return None
            for part in answers:
                ids += [i["id"] for i in part or () if isinstance(i, dict) and "id" in i]
        return ids

    def terminate(self, ids: list[str], signum: int) -> list[str]:
        """Revoke with terminate: signal each child that runs one of ``ids`` (a sync
        task; the children cancel ``async def`` ones themselves). Called from the
        remote-control thread; the child is replaced and REVOKED stored when it dies
        (``_task_lost``). Returns the ids found running."""
        wanted = set(ids)
        found: list[str] = []
        for child in list(self.children.values()):
            slot = self.table.read(child.index)
            if slot.task_id not in wanted or slot.state not in (State.RUNNING, State.RETIRING):
                continue
            logger.info("Terminating %s (%s)", slot.task_id, signum)
            child.terminating = (slot.task_id, signum, time.monotonic() + TERMINATE_GRACE)
            self.table.request_terminate(child.index, slot.task_id, signum)
            found.append(slot.task_id)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)
        return found

    def _enforce_terminates(self) -> None:
        """SIGKILL a child that a terminate signal did not stop in time (the task
        ignored it, or the signal is one the child ignores), if it still runs the
        revoked task."""
        now = time.monotonic()
        for child in list(self.children.values()):
            request = child.terminating
            if request is None or now < request[2]:
                continue
            if self.table.read(child.index).task_id == request[0]:
                logger.warning(
                    "Task %s did not stop on signal %d; killing its process", *request[:2]
                )
                child.terminating = (request[0], request[1], float("inf"))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            else:
                child.terminating = None

    def _task_terminated(self, slot: Slot, signum: int) -> None:
        """The child running ``slot``'s task died after a terminate revoke: REVOKED
        ('terminated'), as Celery records it; an ``acks_late`` message is acked."""
        logger.warning("Task %s[%s] terminated on request (revoked).", slot.name, slot.task_id)
        if slot.flags & Flag.ACKS_LATE:
            self.pending.append((slot.delivery_tag, False))
        events = self.worker.events
        if events is not None and events.enabled:
            events.send(
                "task-revoked",
                uuid=slot.task_id,
                terminated=True,
                signum=signal_name(signum),
                expired=False,
            )
        signals.slot_revoked(self.worker.app, slot, signum)
        if self.backend is not None and not slot.flags & Flag.IGNORE_RESULT:
            reason = TaskRevokedError("terminated")
            meta = meta_for(slot.task_id, states.REVOKED, reason, None, None)
            try:
                self.backend.store(slot.task_id, meta, **_reply_options(slot))
            except Exception as store_error:
                logger.error("Could not store the revoke of %s: %s", slot.task_id, store_error)

    def _task_lost(self, slot: Slot, child: _Child, status: int) -> None:
        """The child died running ``slot``'s task: decide its fate as Celery does."""
        if child.terminating is not None and child.terminating[0] == slot.task_id:
            self._task_terminated(slot, child.terminating[1])
            return
        timeout = child.hard_killed is not None
        exc: Exception
        if timeout:
            exc = TimeLimitExceeded(child.hard_killed)
        else:
            exc = WorkerLostError(f"Worker exited prematurely: {describe_exit(status)}.")
        requeue = False
        if slot.flags & Flag.ACKS_LATE:
            if timeout:
                requeue = not slot.flags & Flag.ACKS_ON_FAILURE
            else:
                requeue = bool(slot.flags & Flag.REJECT_ON_WORKER_LOST)
            # The replacement child settles the message (see module docstring).
            self.pending.append((slot.delivery_tag, requeue))
        if requeue:
            logger.warning(
                "Task %s[%s] will be retried: %r (message requeued)", slot.name, slot.task_id, exc
            )
            return
        logger.error("Task handler raised error: %r", exc)
        events = self.worker.events
        if events is not None and events.enabled:
            events.send("task-failed", uuid=slot.task_id, exception=repr(exc), traceback=None)
        if self.backend is not None and not slot.flags & Flag.IGNORE_RESULT:
            meta = meta_for(slot.task_id, states.FAILURE, exc, None, None)
            try:
                self.backend.store(slot.task_id, meta, **_reply_options(slot))
            except Exception as store_error:
                logger.error("Could not store the failure of %s: %s", slot.task_id, store_error)
        canvas_lost.after_lost(self.worker.app, self.backend, slot, child.index, exc)

    def _enforce_time_limits(self) -> None:
        self._enforce_terminates()
        now = time.time()
        for child in self.children.values():
            if child.hard_killed is not None:
                continue
            slot = self.table.read(child.index)
            if slot.task_id and slot.hard > 0 and now - slot.started > slot.hard:
                logger.error(
                    "Hard time limit (%ss) exceeded for %s[%s]", slot.hard, slot.name, slot.task_id
                )
                child.hard_killed = slot.hard
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    # -- shutdown ------------------------------------------------------------------

    def _signal_children(self, signum: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _shutdown(self) -> int:
        if self.pidbox is not None:
            self.pidbox.stop()
            self.pidbox = None
        cold_sent = self._cold
        self._signal_children(signal.SIGQUIT if cold_sent else signal.SIGTERM)
        cold_deadline = time.monotonic() + COLD_WAIT if cold_sent else None
        while self.children:
            if self._cold and not cold_sent:
                cold_sent = True
                self._signal_children(signal.SIGQUIT)
                cold_deadline = time.monotonic() + COLD_WAIT
            if cold_deadline is not None and time.monotonic() > cold_deadline:
                self._signal_children(signal.SIGKILL)
                cold_deadline = None
            statuses = self._reap_status()
            for status in statuses:
                if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                    self._status = EX_FAILURE
            self._enforce_time_limits()
            time.sleep(TICK)
        if self._cold:
            self._status = EX_FAILURE
        self.links.close()
        self.worker.stop_events()
        try:
            self.worker.app.close()
        except Exception as exc:
            logger.error("Could not write every result: %s", exc)
            self._status = EX_FAILURE
        logger.info("%s stopped.", self.worker.nodename)
        signals.worker_shutdown.send(sender=self.worker)
        return self._status

    def _reap_status(self) -> list[int]:
        found: list[int] = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            if child is not None:
                found.append(status)
                self._on_exit(child, status)
        return found

"""A prefork child: its place in the supervisor's slot table, and its run."""

from __future__ import annotations

import os
import signal

from celeriac import signals
from celeriac.worker.base import (
    EX_FAILURE,
    ChildContext,
    ColdShutdown,
)
from celeriac.worker.lifecycle import LifecycleMixin
from celeriac.worker.log import setup_child_logging
from celeriac.worker.slots import State


class ChildMixin(LifecycleMixin):
    """A prefork child: its place in the supervisor's slot table, and its run."""

    def run_child(self, ctx: ChildContext) -> int:
        """The body of a prefork child, right after the fork; its exit status."""
        self.child = ctx
        self.slot_stats = ctx.table.stats.for_slot(ctx.index)
        self.supervisor = None  # the fork copied the supervisor's: not ours to drive
        _die_with_parent(ctx.parent_pid)
        import multiprocessing

        multiprocessing.current_process().name = f"ForkPoolWorker-{ctx.number}"
        # -f with %i/%I: this child's own file (Celery numbers children from 1).
        setup_child_logging(self.loglevel, self.options.logfile, self.nodename, ctx.index + 1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
        signal.signal(signal.SIGALRM, self._on_soft_limit)
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signals.worker_process_init.send(sender=self.nodename)
        ctx.publish(State.STARTING)
        status = EX_FAILURE
        try:
            status = self._serve()
            return status
        except ColdShutdown:
            self._cold_shutdown()
            return EX_FAILURE  # not reached
        finally:
            signals.worker_process_shutdown.send(
                sender=self.nodename, pid=os.getpid(), exitcode=status
            )


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so a
    supervisor killed with SIGKILL leaves no orphan consuming messages."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(EX_FAILURE)

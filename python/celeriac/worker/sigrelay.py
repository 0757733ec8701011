"""Make sure the main thread acts on a shutdown signal the moment it arrives.

CPython runs a Python signal handler only in the main thread, between bytecodes; the
C-level handler just marks the signal as caught. Two ways that mark can sit unread
while the main thread blocks in a system call (a task's ``time.sleep(60)``):

- the signal lands after the main thread's last check and before it enters the
  call (it was preempted in between: on a busy machine that is milliseconds): the
  call starts with the signal already consumed, and nothing interrupts it;
- the kernel hands the signal to another thread (the main thread had it blocked at
  that instant, as glibc does around every ``pthread_create``): the main thread's
  call is not interrupted either.

Either way the warm shutdown waited for the task to end by itself. The relay closes
both: the C handler also writes the signal number to a wakeup pipe (whichever thread
it ran in); a thread reading that pipe interrupts the main thread with ``NUDGE``, a
signal sent to that thread alone with a handler that only counts, until a handler
ran in the main thread. An interrupted call checks the caught signals first, so the
worker's handler runs then; a nudge never counts as a shutdown signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from types import FrameType

#: The signal that interrupts the main thread. SIGURG: ignored by default, and
#: neither Celery nor Python use it.
NUDGE = signal.SIGURG
#: The first wait for the main thread to run a handler before the next nudge; it
#: doubles up to ``LAST_WAIT`` while the main thread runs code that does not check.
FIRST_WAIT = 0.01
LAST_WAIT = 1.0


class SignalRelay:
    """Started in the main thread with the signals it relays; ``stop`` undoes it."""

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.signums = frozenset(signums)
        #: How many times a handler ran in the main thread. A plain counter, never a
        #: lock or an Event: a handler that waits on a lock the main thread holds (it
        #: was interrupted inside ``Event.set``) deadlocks the process.
        self._runs = 0
        self._main = threading.main_thread().ident
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = -1
        self._previous_nudge: object = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._previous_nudge = signal.signal(NUDGE, self._on_nudge)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="celeriac-signals", daemon=True)
        self._thread.start()

    def handled(self) -> None:
        """Called by a handler running in the main thread: the caught signals were read."""
        self._runs += 1

    def _on_nudge(self, signum: int, frame: FrameType | None) -> None:
        self._runs += 1

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return  # ``stop`` closed the pipe
            if not self.signums.intersection(data):
                continue
            # A handler that ran before this point may have run before the signal
            # was caught: only one that runs after counts (a nudge's, at least).
            runs = self._runs
            wait = FIRST_WAIT
            while self._runs == runs and self._main is not None:
                try:
                    signal.pthread_kill(self._main, NUDGE)
                except (OSError, ProcessLookupError):
                    return  # the main thread is gone: the process is ending
                time.sleep(wait)
                wait = min(wait * 2, LAST_WAIT)

    def stop(self) -> None:
        """Restore the previous wakeup fd and nudge handler; the thread ends."""
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._previous_fd)
        if self._previous_nudge is not None:
            signal.signal(NUDGE, self._previous_nudge)  # type: ignore[arg-type]
        os.close(self._write)
        if self._thread is not None:
            self._thread.join(2.0)
        os.close(self._read)

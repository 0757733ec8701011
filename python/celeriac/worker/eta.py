"""Messages with an ETA in the future, held until due.

The timer is Rust's (``src/scheduler/eta.rs``): items ordered by due time, first
pushed first among equal times. The messages stay unacked meanwhile (as in Celery), so
a warm shutdown puts them back in the queue with ``Consumer.restore_unacked``.
"""

from __future__ import annotations

from celeriac._core import EtaSchedule

__all__ = ["EtaSchedule"]

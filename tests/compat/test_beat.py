"""``celeriac beat`` with a real Celery 5.7 worker: the periodic messages beat sends
are Celery's, so a Celery worker runs them (Redis, and RabbitMQ with rpc:// results)."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any

from conftest import EVENT_WAIT, WorkerProcess

if TYPE_CHECKING:
    from compat.conftest import CompatDir

SCHEDULE = """
from compat_tasks import app

app.conf.beat_schedule = {
    "echo-every-second": {
        "task": "compat.echo",
        "schedule": 1.0,
        "args": ("from beat", 2),
        "kwargs": {"n": 3},
    },
}
"""


def test_a_celery_worker_runs_what_celeriac_beat_sends(
    compat: CompatDir, start_worker: Any
) -> None:
    compat.write("beat_schedule.py", SCHEDULE)
    celery = start_worker("celery")
    argv = [sys.executable, "-m", "celeriac", "-A", "beat_schedule", "beat", "-l", "info",
            "-s", compat.queue]  # fmt: skip
    beat = WorkerProcess(argv, compat.path, compat.env)
    try:
        beat.wait_for(r"Scheduler: Sending due task echo-every-second \(compat\.echo\)", count=3,
                      timeout=EVENT_WAIT * 2)  # fmt: skip
        done = celery.wait_for(r"Task compat\.echo\[[^\]]+\] succeeded", count=3,
                               timeout=EVENT_WAIT * 2)  # fmt: skip
    finally:
        assert beat.stop() == 0
    result = re.search(r"succeeded in [^:]+: (.*)$", done[0])
    assert result is not None
    assert "'args': ['from beat', 2]" in result.group(1)
    assert "'kwargs': {'n': 3}" in result.group(1)

"""Mingle between celeriac and real Celery 5.7, on Redis and RabbitMQ: a celeriac worker
starting up says ``hello``; a Celery worker that heard a revoke answers with its revoked
ids and the celeriac worker does not run that task.

(The other way round, a Celery worker mingling with a celeriac one, is in
``test_control.py``.)"""

from __future__ import annotations

import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from celeriac import control

from compat.conftest import node_name

if TYPE_CHECKING:
    from conftest import ResultKeys

    from compat.conftest import CompatDir


def test_celeriac_worker_takes_a_celery_workers_revoked_ids(
    compat: CompatDir, start_worker: Any, result_keys: ResultKeys
) -> None:
    celery = start_worker("celery")
    celery_node = celery.argv[celery.argv.index("-n") + 1].replace("%h", socket.gethostname())
    tasks = compat.celeriac_app()
    app = tasks.app
    revoked_id = result_keys.add(str(uuid.uuid4()))
    # Celery's worker subscribes to its pidbox a moment after "ready." on Redis.
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while not replies and time.monotonic() < deadline:
        replies = control.broadcast(
            app, "revoke", {"task_id": revoked_id}, destination=[celery_node], timeout=1
        )
    assert replies == [{celery_node: {"ok": f"tasks {{'{revoked_id}'}} flagged as revoked"}}]

    node = node_name()
    worker = start_worker("celeriac", "-n", node, "-c", "2", pool="prefork")
    worker.wait_for(r"mingle: sync complete", timeout=10)
    assert "mingle: sync with" in worker.log and "failed" not in worker.log, worker.log
    celery.wait_for(rf"sync with {node}")  # Celery's worker heard our hello
    replies = control.broadcast(app, "revoked", destination=[node], timeout=3)
    assert replies and revoked_id in replies[0][node], (replies, worker.log)
    assert celery.stop() == 0  # only the celeriac worker can take the task now

    tasks.add.apply_async((1, 2), task_id=revoked_id)
    worker.wait_for(rf"Discarding revoked task: compat\.add\[{revoked_id}\]", timeout=10)
    after = tasks.add.delay(2, 2)
    result_keys.add(after.id)
    assert after.get(timeout=10) == 4
    assert f"compat.add[{revoked_id}] succeeded" not in worker.log

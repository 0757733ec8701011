"""``inspect stats`` and ``inspect conf`` of a live worker on Redis show no secret of
the transport options: a key naming a secret (``sentinel_kwargs``' ``password``, at any
depth) as Celery's ``inspect conf`` masks it (``********``), a URL with its password
masked. Celery's ``stats()`` echoes ``broker_transport_options`` as they are."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import celery
from conftest import REDIS_URL, app_module

if TYPE_CHECKING:
    from conftest import StartWorker, TasksDir

SENTINEL_SECRET = "sentinelpw-5d1e"
URL_SECRET = "urlpw-c07a"
BACKEND_SECRET = "backendpw-9b44"

MASKING_PY = app_module(
    "tasks",
    f"""
app.conf.broker_transport_options = {{
    "visibility_timeout": 3600,
    "sentinel_kwargs": {{"password": {SENTINEL_SECRET!r}}},
    "fallbacks": ["redis://:{URL_SECRET}@127.0.0.1:6379/0"],
}}
app.conf.result_backend_transport_options = {{
    "sentinel_kwargs": {{"password": {BACKEND_SECRET!r}}},
}}
""",
)


def test_inspect_stats_and_conf_mask_the_secrets_of_the_transport_options(
    worker: StartWorker, tasks_dir: TasksDir
) -> None:
    tasks_dir.write("tasks.py", MASKING_PY)
    node = f"{tasks_dir.queue}@localhost"
    process = worker("-n", node)
    # The real Celery client asks.
    client = celery.Celery("client", broker=REDIS_URL, set_as_current=False)
    inspect = client.control.inspect(destination=[node], timeout=5)
    stats = inspect.stats()
    assert stats, process.log
    reply = stats[node]
    options = reply["broker"]["transport_options"]
    assert options["visibility_timeout"] == 3600
    assert options["sentinel_kwargs"] == {"password": "********"}
    assert options["fallbacks"] == ["redis://:**@127.0.0.1:6379/0"]
    conf = inspect.conf()
    assert conf, process.log
    table = conf[node]
    assert table["broker_transport_options"]["sentinel_kwargs"] == {"password": "********"}
    assert table["result_backend_transport_options"]["sentinel_kwargs"] == {"password": "********"}
    text = json.dumps([stats, conf])
    for secret in (SENTINEL_SECRET, URL_SECRET, BACKEND_SECRET):
        assert secret not in text
    client.close()
    process.stop()

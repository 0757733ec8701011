"""Redis Sentinel over TLS: TLS sentinels, a TLS master and replica, kombu's settings.

As kombu and Celery configure it (redis-py's ``Sentinel``): ``"ssl": True`` and the
``ssl_*`` keys in ``sentinel_kwargs`` are TLS to the sentinels; ``broker_use_ssl`` /
``redis_backend_use_ssl`` with a ``sentinel://`` URL are TLS to the master they name.

The ``sentinels`` fixture starts, with the throw-away CA of ``pki``, a TLS master
(16430), its TLS replica (16431, replicating over TLS) and three TLS sentinels
(16432-16434) on loopback; 16435 is a plain sentinel for the broken-input test. All
are stopped by pid afterwards. The same tasks module runs on celeriac and on the real
Celery, so the settings are checked against kombu's reading of them too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import wait_until, worker_env
from sentinel_servers import (
    MASTER_NAME,
    Cluster,
    Servers,
    Tls,
    drain_through_failover,
    interop,
    listening,
    write_tasks,
)

if TYPE_CHECKING:
    from conftest import Scratch, StartWorker, TasksDir
    from tls_pki import Pki

CLUSTER = Cluster(16430, 16431, (16432, 16433, 16434), "masterpw-tls-41d8", "sentinelpw-tls-0b7e")
#: A plain (no TLS) sentinel.
PLAIN_SENTINEL_PORT = 16435
MASTER_PASSWORD, SENTINEL_PASSWORD = CLUSTER.master_password, CLUSTER.sentinel_password
START_TIMEOUT = 20.0
SENTINEL_URL = CLUSTER.url()
MASKED_URL = CLUSTER.masked()

#: The settings for celeriac and Celery: TLS to the sentinels (``sentinel_kwargs``) and
#: to the master (``broker_use_ssl``, ``redis_backend_use_ssl``), each with its CA.
SETTINGS = f"""
master_tls = {{
    "ssl_cert_reqs": ssl.CERT_REQUIRED,
    "ssl_ca_certs": os.environ["CELERIAC_TEST_MASTER_CA"],
}}
sentinel_kwargs = {{"password": {SENTINEL_PASSWORD!r}}}
if os.environ["CELERIAC_TEST_SENTINEL_CA"]:
    sentinel_kwargs.update(
        ssl=True,
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        ssl_ca_certs=os.environ["CELERIAC_TEST_SENTINEL_CA"],
    )
options = {{
    "master_name": "{MASTER_NAME}",
    "sentinel_kwargs": sentinel_kwargs,
    "visibility_timeout": 10,
}}
app.conf.broker_transport_options = options
app.conf.result_backend_transport_options = options
app.conf.broker_use_ssl = master_tls
app.conf.redis_backend_use_ssl = master_tls
app.conf.task_acks_late = True
app.conf.broker_connection_timeout = 2.0

"""


def tls_client(pki: Pki, port: int, password: str) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=2,
        ssl=True,
        ssl_ca_certs=str(pki.ca),
    )


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Servers]:
    tls = Tls(pki.ca, pki.server_cert, pki.server_key)
    servers = Servers(tmp_path_factory.mktemp("sentinel-tls"), tls)
    try:
        servers.start_cluster(
            CLUSTER, lambda port, password: tls_client(pki, port, password), START_TIMEOUT
        )
        yield servers
    finally:
        servers.stop_all()


def master_port(pki: Pki) -> int:
    """The port the sentinels name as the master now."""
    sentinel = tls_client(pki, CLUSTER.sentinels[0], SENTINEL_PASSWORD)
    _, port = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
    return int(port)


def on_sentinels(
    tasks_dir: TasksDir,
    pki: Pki,
    *,
    broker: str = SENTINEL_URL,
    sentinel_ca: Path | None = None,
    master_ca: Path | None = None,
) -> None:
    """The test's ``tasks`` (celeriac) and ``celery_tasks`` (Celery) modules on the
    sentinels of ``broker``, trusting ``sentinel_ca`` for them and ``master_ca`` for
    the master (``pki.ca`` by default)."""
    tasks_dir.env = worker_env(tasks_dir.queue, broker, broker)
    tasks_dir.env["CELERIAC_TEST_MASTER_CA"] = str(master_ca or pki.ca)
    tasks_dir.env["CELERIAC_TEST_SENTINEL_CA"] = str(sentinel_ca or pki.ca)
    write_tasks(tasks_dir, SETTINGS)


def test_tasks_and_results_go_through_tls_sentinels_to_the_tls_master(
    sentinels: Servers, pki: Pki, worker: StartWorker, tasks_dir: TasksDir, scratch: Scratch
) -> None:
    on_sentinels(tasks_dir, pki)
    process = worker()
    tasks = tasks_dir.import_module()
    try:
        result = tasks.record.delay(scratch("one"), 7, 0)
        assert result.get(timeout=10) == 7
        # The result lives on the TLS master the sentinels name.
        master = tls_client(pki, master_port(pki), MASTER_PASSWORD)
        assert master.exists(f"celery-task-meta-{result.id}")
    finally:
        process.stop()
    CLUSTER.check_masked(process.log)


@pytest.mark.parametrize("client", ["celery", "celeriac"])
def test_celery_and_celeriac_share_the_tls_sentinels_either_way(
    sentinels: Servers,
    pki: Pki,
    worker: StartWorker,
    tasks_dir: TasksDir,
    scratch: Scratch,
    client: str,
) -> None:
    """The real Celery's client to a celeriac worker, and celeriac's client to a Celery
    worker: the same settings mean the same TLS connections to both."""
    on_sentinels(tasks_dir, pki)
    assert interop(tasks_dir, worker, client, scratch(client)) == [1, 2]


def test_beats_store_on_tls_sentinels_keeps_its_state_on_the_tls_master(
    sentinels: Servers, pki: Pki
) -> None:
    from celeriac import _core

    namespace = f"sentinel-tls-{os.getpid()}-{time.monotonic_ns()}"
    tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(pki.ca)}
    options = {
        "master_name": MASTER_NAME,
        "sentinel_kwargs": {"password": SENTINEL_PASSWORD, "ssl": True, **tls},
    }
    store = _core.BeatStore(
        SENTINEL_URL, namespace, timeout=2.0, transport_options=options, ssl=tls
    )
    assert store.register(["every-minute"], 1234) == [1234]
    master = tls_client(pki, master_port(pki), MASTER_PASSWORD)
    try:
        assert master.hget(f"celeriac-beat:{namespace}", "every-minute") is not None
    finally:
        master.delete(f"celeriac-beat:{namespace}")


def publish_error(tasks_dir: TasksDir) -> str:
    """What publishing from the test's celeriac module raises, within a bound."""
    import celeriac

    tasks = tasks_dir.import_module()
    started = time.monotonic()
    with pytest.raises(celeriac.exceptions.OperationalError) as info:
        tasks.record.delay("k", 1, 0)
    # Bounded: the connection timeout per sentinel, not a hang.
    assert time.monotonic() - started < 30
    text = str(info.value)
    assert MASTER_PASSWORD not in text and SENTINEL_PASSWORD not in text, text
    return text


@pytest.mark.parametrize("side", ["sentinels", "master"])
def test_a_wrong_ca_is_a_clear_error(
    sentinels: Servers, pki: Pki, tasks_dir: TasksDir, side: str
) -> None:
    if side == "sentinels":
        on_sentinels(tasks_dir, pki, sentinel_ca=pki.other_ca)
    else:
        on_sentinels(tasks_dir, pki, master_ca=pki.other_ca)
    text = publish_error(tasks_dir)
    assert "no sentinel of" in text and MASKED_URL in text, text
    assert "not signed by a trusted CA" in text, text
    if side == "master":
        assert f'names 127.0.0.1:{master_port(pki)} as master of "{MASTER_NAME}"' in text, text


def test_tls_to_plain_sentinels_is_a_clear_error(
    sentinels: Servers, pki: Pki, tasks_dir: TasksDir
) -> None:
    sentinels.start_sentinel(
        PLAIN_SENTINEL_PORT, CLUSTER.master, MASTER_PASSWORD, SENTINEL_PASSWORD, tls=False
    )
    try:
        assert wait_until(lambda: listening(PLAIN_SENTINEL_PORT), timeout=10)
        broker = CLUSTER.url((PLAIN_SENTINEL_PORT,))
        on_sentinels(tasks_dir, pki, broker=broker)
        text = publish_error(tasks_dir)
    finally:
        sentinels.kill(PLAIN_SENTINEL_PORT)
    assert CLUSTER.masked((PLAIN_SENTINEL_PORT,)) in text, text
    assert "no TLS handshake" in text, text


def test_plain_text_to_tls_sentinels_is_an_error_not_a_silent_fallback(
    sentinels: Servers, pki: Pki, tasks_dir: TasksDir
) -> None:
    on_sentinels(tasks_dir, pki)
    tasks_dir.env["CELERIAC_TEST_SENTINEL_CA"] = ""  # no "ssl" in sentinel_kwargs
    text = publish_error(tasks_dir)
    assert "no sentinel of" in text and MASKED_URL in text, text
    assert '"ssl": True' in text, text


def test_ssl_keys_without_ssl_true_are_refused(pki: Pki, tasks_dir: TasksDir) -> None:
    from celeriac import _core

    options = {
        "master_name": MASTER_NAME,
        "sentinel_kwargs": {"ssl_ca_certs": str(pki.ca)},
    }
    with pytest.raises(ValueError, match=r"ssl_ca_certs.*\"ssl\": True"):
        _core.BeatStore(SENTINEL_URL, "ns", timeout=2.0, transport_options=options)


def test_the_tls_master_killed_during_a_drain_loses_no_task(
    sentinels: Servers,
    pki: Pki,
    worker: StartWorker,
    tasks_dir: TasksDir,
    redis_client: redis.Redis,
    scratch: Scratch,
) -> None:
    on_sentinels(tasks_dir, pki)
    process = worker()
    tasks = tasks_dir.import_module()
    before, after = 80, 20
    drain = drain_through_failover(
        sentinels,
        lambda: master_port(pki),
        tasks,
        process,
        (before, after),
        scratch("ran"),
        redis_client,
    )
    ran_before_kill = {n for n, at in drain.runs if at < drain.killed_at}
    assert len(ran_before_kill) < before, "the kill came during the drain"
    results: list[Any] = [result.get(timeout=20) for result in drain.sent]
    assert results == list(range(before + after))
    process.stop()

# mypy: disable-error-code="no-untyped-call"
"""Redis over TLS (``rediss://``, ``broker_use_ssl``, ``redis_backend_use_ssl``) and
Redis ACL users, against real ``redis-server`` processes started here.

A throw-away CA (``trustme``) signs the servers' certificates and a client
certificate; the servers run on loopback ports 16400-16404 for this module only and
are stopped by pid after it:

- 16400 TLS and 16401 plain, one server: its default user needs a password
  (``ADMIN``) and the ACL user ``worker`` (password ``s3cret``) is the one the tests
  connect as, so a connection that did not authenticate as ``worker`` fails;
- 16402 TLS that requires a client certificate (``--tls-auth-clients yes``);
- 16403 TLS with a certificate that expired yesterday (signed by the same CA, with
  ``cryptography``: trustme makes no expired ones).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celeriac import Celery, _core
from conftest import TASKS_PY, success_meta, worker_env
from tls_pki import Pki

if TYPE_CHECKING:
    from conftest import StartWorker, TasksDir

pytestmark = pytest.mark.redis

HOST = "127.0.0.1"
TLS_PORT, PLAIN_PORT, MTLS_PORT, EXPIRED_PORT = 16400, 16401, 16402, 16403
ADMIN = "admin-pass"
USER, PASSWORD = "worker", "s3cret"
START_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` of this module's own, stopped by its pid."""

    def __init__(self, workdir: Path, port: int, tls_port: int, *args: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            "--bind", HOST,
            "--port", str(port),
            "--tls-port", str(tls_port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            *args,
        ]  # fmt: skip
        self.log = workdir / "redis.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.port = tls_port
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(tls_port):
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server on {tls_port} did not start:\n{self.log.read_text()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.05)  # the pause between two tries, or its exit
            if self.proc.returncode is not None:
                pytest.fail(f"redis-server on {tls_port} exited:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _tls_args(pki: Pki, cert: Path, auth_clients: str) -> tuple[str, ...]:
    key = pki.server_key if cert == pki.server_cert else cert.with_suffix(".key")
    return (
        "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", auth_clients,
    )  # fmt: skip


@pytest.fixture(scope="session")
def servers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = tmp_path_factory.mktemp("redis-servers")
    started: list[RedisServer] = []
    try:
        started.append(
            RedisServer(
                root / "main",
                PLAIN_PORT,
                TLS_PORT,
                "--requirepass",
                ADMIN,
                *_tls_args(pki, pki.server_cert, "optional"),
            )
        )
        started.append(
            RedisServer(root / "mtls", 0, MTLS_PORT, *_tls_args(pki, pki.server_cert, "yes"))
        )
        started.append(
            RedisServer(root / "expired", 0, EXPIRED_PORT, *_tls_args(pki, pki.expired_cert, "no"))
        )
        admin = redis.Redis(host=HOST, port=PLAIN_PORT, password=ADMIN)
        admin.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
        admin.close()
        yield
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def admin(servers: None) -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=PLAIN_PORT, password=ADMIN)
    yield client
    client.close()


def url(
    port: int = TLS_PORT,
    *,
    scheme: str = "rediss",
    password: str = PASSWORD,
    query: str = "",
) -> str:
    return f"{scheme}://{USER}:{password}@{HOST}:{port}/0" + (f"?{query}" if query else "")


def masked(port: int = TLS_PORT, *, scheme: str = "rediss", query: str = "") -> str:
    return f"{scheme}://{USER}:**@{HOST}:{port}/0" + (f"?{query}" if query else "")


def verified(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(pki.ca), **extra}


def roundtrip(backend: Any) -> None:
    """A result stored and read back through ``backend`` (a ``_core.Backend``)."""
    task_id = str(uuid.uuid4())
    backend.store(task_id, {"status": "SUCCESS", "result": 8, "task_id": task_id})
    backend.flush()
    meta = backend.get_meta(task_id)
    assert meta is not None and meta["result"] == 8
    backend.forget(task_id)
    backend.close()


def backend(address: str, ssl_option: Any = None) -> Any:
    return _core.Backend(address, ssl=ssl_option, connect_timeout=CONNECT_TIMEOUT)


def producer(address: str, ssl_option: Any = None) -> Any:
    options = {} if ssl_option is None else {"ssl": ssl_option}
    return _core.Producer(
        address,
        origin="redis-tls-test",
        transport_options=options,
        connect_timeout=CONNECT_TIMEOUT,
    )


def failure(connect: Callable[[], Any]) -> str:
    """The error ``connect()`` raises (it must raise, within the connect timeout)."""
    with pytest.raises((_core.OperationalError, ValueError)) as raised:
        connect()
    return str(raised.value)


TLS_TASKS = """
import ssl
from pathlib import Path

_tls = {
    "ssl_cert_reqs": ssl.CERT_REQUIRED,
    "ssl_ca_certs": Path(os.environ["CELERIAC_TEST_CA"]),
}
app.conf.broker_use_ssl = _tls
app.conf.redis_backend_use_ssl = {**_tls, "ssl_cert_reqs": "CERT_REQUIRED"}
"""


def test_worker_runs_tasks_over_rediss_with_rediss_results(
    servers: None, pki: Pki, admin: redis.Redis, worker: StartWorker, tasks_dir: TasksDir
) -> None:
    tasks_dir.env = worker_env(tasks_dir.queue, url(), url())
    tasks_dir.env["CELERIAC_TEST_CA"] = str(pki.ca)
    tasks_dir.write("tasks.py", TASKS_PY + TLS_TASKS)
    process = worker()
    assert masked() in process.log  # the banner names the URL, password masked
    assert PASSWORD not in process.log
    tasks = tasks_dir.import_module()
    assert tasks.add.delay(4, 4).get(timeout=10) == 8
    with pytest.raises(ValueError, match="boom"):
        tasks.fail.delay().get(timeout=10)
    # Everyone came in on the TLS port as the ACL user: the default user has a
    # password nobody here gives.
    clients = admin.client_list()
    mine = [c for c in clients if c["user"] == USER]
    assert mine and all(c["laddr"].endswith(f":{TLS_PORT}") for c in mine)


def test_url_form_ssl_cert_reqs_for_broker_and_backend(
    servers: None, pki: Pki, worker: StartWorker, tasks_dir: TasksDir
) -> None:
    """Celery's Redis backend reads ``?ssl_cert_reqs=`` (and ``ssl_ca_certs``...) from
    the URL; so do the broker and the backend here, with no setting at all."""
    query = f"ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={pki.ca}"
    tasks_dir.env = worker_env(tasks_dir.queue, url(query=query), url(query=query))
    tasks_dir.write("tasks.py", TASKS_PY)
    worker()
    tasks = tasks_dir.import_module()
    assert tasks.mul.delay(6, 7).get(timeout=10) == 42


@pytest.mark.parametrize("reqs", ["required", "CERT_REQUIRED", "optional", "CERT_OPTIONAL"])
def test_url_spellings_of_ssl_cert_reqs_verify(servers: None, pki: Pki, reqs: str) -> None:
    good = f"ssl_cert_reqs={reqs}&ssl_ca_certs={pki.ca}"
    roundtrip(backend(url(query=good)))
    bad = f"ssl_cert_reqs={reqs}&ssl_ca_certs={pki.other_ca}"
    text = failure(lambda: backend(url(query=bad)))
    assert masked(query=bad) in text
    assert "UnknownIssuer" in text


@pytest.mark.parametrize("reqs", ["none", "CERT_NONE"])
def test_ssl_cert_reqs_none_does_not_check_the_server(servers: None, pki: Pki, reqs: str) -> None:
    """kombu's insecure mode, when asked for: a CA that did not sign the server's
    certificate is not consulted."""
    roundtrip(backend(url(query=f"ssl_cert_reqs={reqs}&ssl_ca_certs={pki.other_ca}")))
    roundtrip(backend(url(), {"ssl_cert_reqs": ssl.CERT_NONE}))


def test_client_certificate_mtls(
    servers: None, pki: Pki, worker: StartWorker, tasks_dir: TasksDir
) -> None:
    address = f"rediss://{HOST}:{MTLS_PORT}/0"
    text = failure(lambda: backend(address, verified(pki)))
    assert address in text
    assert "client certificate" in text
    with_key = verified(pki, ssl_certfile=str(pki.client_cert), ssl_keyfile=str(pki.client_key))
    roundtrip(backend(address, with_key))
    # the key in the certificate's file, as Python's ssl takes it
    roundtrip(backend(address, verified(pki, ssl_certfile=str(pki.client_combined))))
    # and a worker with its results, over mTLS
    tasks_dir.env = worker_env(tasks_dir.queue, address, address)
    tasks_dir.env["CELERIAC_TEST_CA"] = str(pki.ca)
    tasks_dir.write(
        "tasks.py",
        TASKS_PY
        + TLS_TASKS
        + f"""
app.conf.broker_use_ssl["ssl_certfile"] = {str(pki.client_cert)!r}
app.conf.broker_use_ssl["ssl_keyfile"] = {str(pki.client_key)!r}
app.conf.redis_backend_use_ssl["ssl_certfile"] = {str(pki.client_combined)!r}
""",
    )
    worker()
    tasks = tasks_dir.import_module()
    assert tasks.add.delay(2, 3).get(timeout=10) == 5


def test_acl_user_on_plain_redis(servers: None, admin: redis.Redis) -> None:
    """``redis://user:pass@host/0`` authenticates as that user (the default user of
    this server would need another password)."""
    address = url(PLAIN_PORT, scheme="redis")
    app = Celery("redis-acl", broker=address, backend=address)
    app.conf.task_default_queue = queue = f"acl-{uuid.uuid4().hex}"
    try:
        result = app.send_task("tasks.add", args=(1, 2))
        app.backend.store(result.id, success_meta(result.id, 3))
        assert result.get(timeout=10) == 3
        assert admin.llen(queue) == 1
    finally:
        admin.delete(queue, f"celery-task-meta-{result.id}")
        app.close()


@pytest.mark.parametrize(("port", "scheme"), [(TLS_PORT, "rediss"), (PLAIN_PORT, "redis")])
def test_wrong_acl_password_is_a_clear_error(
    servers: None, pki: Pki, port: int, scheme: str
) -> None:
    address = url(port, scheme=scheme, password="wrong-pass")
    option = verified(pki) if scheme == "rediss" else None
    for connect in (lambda: backend(address, option), lambda: producer(address, option)):
        text = failure(connect)
        assert masked(port, scheme=scheme) in text
        assert "wrong-pass" not in text
        assert "authentication failed" in text.lower()


def test_wrong_ca_is_a_clear_error(servers: None, pki: Pki) -> None:
    option = verified(pki, ssl_ca_certs=str(pki.other_ca))
    for connect in (lambda: backend(url(), option), lambda: producer(url(), option)):
        text = failure(connect)
        assert masked() in text and PASSWORD not in text
        assert "UnknownIssuer" in text
        assert "ssl_ca_certs" in text


def test_system_roots_do_not_trust_a_private_ca(servers: None) -> None:
    """``rediss://`` with no setting checks the server (Celery's backend refuses such
    a URL; kombu's broker then checks nothing)."""
    text = failure(lambda: backend(url()))
    assert masked() in text
    assert "UnknownIssuer" in text


def test_rediss_to_the_plain_port_is_a_clear_error(servers: None, pki: Pki) -> None:
    for connect in (
        lambda: backend(url(PLAIN_PORT), verified(pki)),
        lambda: producer(url(PLAIN_PORT), verified(pki)),
    ):
        text = failure(connect)
        assert masked(PLAIN_PORT) in text and PASSWORD not in text
        assert "TLS" in text


def test_expired_server_certificate_is_a_clear_error(servers: None, pki: Pki) -> None:
    address = f"rediss://:{PASSWORD}@{HOST}:{EXPIRED_PORT}/0"
    text = failure(lambda: backend(address, verified(pki)))
    assert f"rediss://:**@{HOST}:{EXPIRED_PORT}/0" in text and PASSWORD not in text
    assert "expired" in text.lower()


def test_unreadable_ca_file_is_a_clear_error(servers: None, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_text("-----BEGIN CERTIFICATE-----\n")
    unreadable.chmod(0)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [(missing, "cannot read ssl_ca_certs"), (junk, "holds no PEM certificate")]
    if os.geteuid() != 0:  # root reads any file
        cases.append((unreadable, "cannot read ssl_ca_certs"))
    for path, words in cases:
        option = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(path)}
        for connect in (backend, producer):
            text = failure(functools.partial(connect, url(), option))
            assert masked() in text and PASSWORD not in text
            assert words in text and str(path) in text
        text = failure(functools.partial(backend, url(query=f"ssl_ca_certs={path}")))
        assert words in text and PASSWORD not in text


@pytest.mark.parametrize("value", ["sometimes", "Required", 7])
def test_bad_ssl_cert_reqs_is_refused(servers: None, value: Any) -> None:
    text = failure(lambda: backend(url(), {"ssl_cert_reqs": value}))
    assert "redis_backend_use_ssl" in text and "ssl_cert_reqs must be" in text
    text = failure(lambda: producer(url(), {"ssl_cert_reqs": value}))
    assert "broker_use_ssl" in text and "ssl_cert_reqs must be" in text
    query = f"ssl_cert_reqs={value}"
    text = failure(lambda: backend(url(query=query)))
    assert masked(query=query) in text and PASSWORD not in text
    assert "ssl_cert_reqs must be" in text


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("yes", "must be True or a dict"),
        ({"ca_certs": "/x.pem"}, 'unknown key "ca_certs"'),
        ({"ssl_ca_certs": 42}, "ssl_ca_certs must be a file path"),
        ({"ssl_keyfile": "/k.pem"}, "ssl_keyfile is given without ssl_certfile"),
    ],
)
def test_tls_settings_of_the_wrong_shape_are_refused(
    servers: None, option: Any, words: str
) -> None:
    assert words in failure(lambda: backend(url(), option))
    assert words in failure(lambda: producer(url(), option))


def test_tls_parameters_on_a_plain_redis_url_are_refused(servers: None, pki: Pki) -> None:
    """As Celery's backend: ``ssl_*`` in the query of a ``redis://`` URL is a mistake
    (the URL says no TLS), not silently ignored."""
    query = "ssl_cert_reqs=required"
    text = failure(lambda: backend(url(PLAIN_PORT, scheme="redis", query=query)))
    assert masked(PLAIN_PORT, scheme="redis", query=query) in text
    assert "not rediss://" in text


def test_a_setting_makes_redis_url_use_tls(servers: None, pki: Pki) -> None:
    """kombu's and Celery's rule: ``broker_use_ssl`` / ``redis_backend_use_ssl`` turn
    TLS on for a ``redis://`` URL too (here to the TLS port: plain would fail)."""
    roundtrip(backend(url(scheme="redis"), verified(pki)))
    producer(url(scheme="redis"), verified(pki)).close()


def test_beat_store_over_rediss(servers: None, pki: Pki, admin: redis.Redis) -> None:
    namespace = f"tls-{uuid.uuid4().hex}"
    store = _core.BeatStore(url(), namespace, ssl=verified(pki), timeout=CONNECT_TIMEOUT)
    try:
        assert store.register(["every-minute"], 123) == [123]
        assert admin.hget(f"celeriac-beat:{namespace}", "every-minute") is not None
    finally:
        admin.delete(f"celeriac-beat:{namespace}")
    text = failure(
        lambda: _core.BeatStore(
            url(),
            namespace,
            ssl=verified(pki, ssl_ca_certs=str(pki.other_ca)),
            timeout=CONNECT_TIMEOUT,
        )
    )
    assert masked() in text and "UnknownIssuer" in text
    text = failure(
        lambda: _core.BeatStore(
            url(), namespace, ssl={"ssl_cert_reqs": "x"}, ssl_setting="broker_use_ssl"
        )
    )
    assert "broker_use_ssl: ssl_cert_reqs must be" in text


def test_app_passes_both_settings(pki: Pki) -> None:
    app = Celery("tls-settings", broker=url(), backend=url())
    app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": pki.ca}
    assert app.transport_options()["ssl"] == {"ssl_cert_reqs": 2, "ssl_ca_certs": str(pki.ca)}
    app.conf.update(CELERY_REDIS_BACKEND_USE_SSL={"ssl_cert_reqs": "none"})
    assert app.conf.redis_backend_use_ssl == {"ssl_cert_reqs": "none"}


def test_worker_with_a_missing_ca_file_stops_at_start(
    servers: None, tmp_path: Path, worker: StartWorker, tasks_dir: TasksDir
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    tasks_dir.env = worker_env(tasks_dir.queue, url(), url())
    tasks_dir.env["CELERIAC_TEST_CA"] = str(missing)
    tasks_dir.write("tasks.py", TASKS_PY + TLS_TASKS)
    process = worker(ready=False, check_exit=False)
    assert process.wait(30) != 0
    assert str(missing) in process.log
    assert masked() in process.log
    assert PASSWORD not in process.log

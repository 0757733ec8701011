# mypy: disable-error-code="no-untyped-call"
"""RabbitMQ over TLS (``amqps://`` and ``broker_use_ssl``), against the real broker.

RabbitMQ on 127.0.0.1:5672 speaks plain AMQP and is not reconfigured: each test runs
a small TLS-terminating proxy on a loopback port of its own (Python's ``ssl``, a
throw-away CA from ``trustme`` and a server certificate for ``localhost`` and
127.0.0.1) that forwards the decrypted bytes to 5672. celeriac's client side is
rustls, in Rust: the tutorial flow (worker, ``delay``, ``get`` through ``rpc://``)
runs over it, and so do the failures: an untrusted server certificate, a CA file
that is not there, settings of the wrong shape.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trustme
from celeriac import Celery, _core
from conftest import AMQP_URL, TASKS_PY, delete_amqp, worker_env
from kombu.connection import Connection

if TYPE_CHECKING:
    from conftest import StartWorker, TasksDir

RABBIT = ("127.0.0.1", 5672)


class TlsProxy:
    """Accepts TLS on a loopback port and relays the plain bytes to RabbitMQ.

    ``handshakes`` counts finished TLS handshakes (so a test can tell the client really
    went through TLS) and ``failures`` keeps why a handshake failed."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.handshakes = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, name="tls-proxy-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            with self._lock:
                self._threads.append(thread)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(10)
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self._lock:
                self.failures.append(str(exc))
            client.close()
            return
        try:
            upstream = socket.create_connection(RABBIT, timeout=5)
        except OSError:
            tls.close()
            return
        tls.settimeout(None)
        upstream.settimeout(None)
        with self._lock:
            self.handshakes += 1
            self._sockets += [tls, upstream]
        back = threading.Thread(target=self._pump, args=(upstream, tls), daemon=True)
        back.start()
        with self._lock:
            self._threads.append(back)
        self._pump(tls, upstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stopping.set()
        self.listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def start_proxy(ca: trustme.CA) -> TlsProxy:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return TlsProxy(context)


@pytest.fixture
def proxy(ca: trustme.CA) -> Iterator[TlsProxy]:
    """A TLS front of RabbitMQ whose certificate our CA signed."""
    server = start_proxy(ca)
    yield server
    server.close()


@pytest.fixture
def stranger() -> Iterator[TlsProxy]:
    """A TLS front of RabbitMQ whose certificate nobody we know signed."""
    server = start_proxy(trustme.CA())
    yield server
    server.close()


@pytest.fixture
def rabbit_queue() -> Iterator[str]:
    name = f"py-amqps-{uuid.uuid4().hex}"
    yield name
    delete_amqp(AMQP_URL, name)


def tls_url(proxy: TlsProxy, scheme: str = "amqps", password: str = "guest") -> str:
    return f"{scheme}://guest:{password}@localhost:{proxy.port}//"


def masked(proxy: TlsProxy, scheme: str = "amqps") -> str:
    return f"{scheme}://guest:**@localhost:{proxy.port}//"


TLS_TASKS = """
import ssl

app.conf.broker_use_ssl = {
    "ca_certs": os.environ["CELERIAC_TEST_CA"],
    "cert_reqs": ssl.CERT_REQUIRED,
}
"""


def test_tutorial_over_amqps_with_rpc_results(
    proxy: TlsProxy, ca_file: Path, worker: StartWorker, tasks_dir: TasksDir
) -> None:
    tasks_dir.env = worker_env(tasks_dir.queue, tls_url(proxy), "rpc://")
    tasks_dir.env["CELERIAC_TEST_CA"] = str(ca_file)
    tasks_dir.write("tasks.py", TASKS_PY + TLS_TASKS)
    try:
        process = worker()
        assert masked(proxy) in process.log  # the banner names the TLS URL
        tasks = tasks_dir.import_module()
        result = tasks.add.delay(4, 4)
        assert result.get(timeout=10) == 8
        assert result.state == "SUCCESS"
        failed = tasks.fail.delay()
        with pytest.raises(ValueError, match="boom"):
            failed.get(timeout=10)
        # worker (consumer, producer for results, ...) and this client all came in
        # through the proxy, in TLS; none failed its handshake.
        assert proxy.handshakes >= 3
        assert proxy.failures == []
    finally:
        delete_amqp(AMQP_URL, tasks_dir.queue)


def test_amqp_url_with_broker_use_ssl_speaks_tls(
    proxy: TlsProxy, ca_file: Path, rabbit_queue: str
) -> None:
    """kombu's rule: ``broker_use_ssl`` turns TLS on for ``amqp://`` too."""
    app = Celery("amqps-test", broker=tls_url(proxy, "amqp"))
    app.conf.broker_use_ssl = {"ca_certs": ca_file}  # a Path, as Python's ssl takes it
    app.conf.task_default_queue = rabbit_queue
    app.conf.broker_transport_options = {"confirm_publish": True}
    try:
        app.send_task("tasks.add", args=(1, 2))
        assert proxy.handshakes == 1
    finally:
        app.close()
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        message = conn.default_channel.basic_get(rabbit_queue, no_ack=True)
    assert message is not None
    assert message.headers["task"] == "tasks.add"


def connect_error(url: str, ssl_option: Any) -> str:
    started = time.monotonic()
    with pytest.raises((_core.OperationalError, ValueError)) as raised:
        _core.Producer(
            url,
            origin="amqps-test",
            transport_options={"ssl": ssl_option},
            connect_timeout=5.0,
        )
    # The TLS failure is the error, not a connect timeout that hides it.
    assert time.monotonic() - started < 5.0
    return str(raised.value)


def test_untrusted_server_certificate_is_a_clear_error(stranger: TlsProxy, ca_file: Path) -> None:
    text = connect_error(tls_url(stranger, password="secret"), {"ca_certs": str(ca_file)})
    assert masked(stranger) in text
    assert "secret" not in text
    assert "certificate is not trusted" in text
    assert "UnknownIssuer" in text
    assert "ca_certs" in text
    assert stranger.handshakes == 0


def test_amqps_to_a_plain_amqp_port_is_a_clear_error() -> None:
    text = connect_error("amqps://guest:guest@localhost:5672//", True)
    assert "amqps://guest:**@localhost:5672//" in text
    assert "TLS" in text


def test_system_roots_do_not_trust_a_private_ca(proxy: TlsProxy) -> None:
    text = connect_error(tls_url(proxy), True)
    assert masked(proxy) in text
    assert "certificate" in text.lower()


def test_untrusted_server_through_the_app(stranger: TlsProxy, ca_file: Path) -> None:
    app = Celery("amqps-test", broker=tls_url(stranger))
    app.conf.broker_use_ssl = {"ca_certs": str(ca_file)}
    try:
        with pytest.raises(_core.OperationalError) as raised:
            app.send_task("tasks.add", args=(1, 2))
    finally:
        app.close()
    assert masked(stranger) in str(raised.value)
    assert "certificate" in str(raised.value).lower()


def test_missing_ca_file_fails_at_start(
    proxy: TlsProxy, tmp_path: Path, worker: StartWorker, tasks_dir: TasksDir
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    tasks_dir.env = worker_env(tasks_dir.queue, tls_url(proxy), "rpc://")
    tasks_dir.env["CELERIAC_TEST_CA"] = str(missing)
    tasks_dir.write("tasks.py", TASKS_PY + TLS_TASKS)
    process = worker(ready=False, check_exit=False)
    status = process.wait(30)
    assert status != 0
    assert "broker_use_ssl" in process.log
    assert str(missing) in process.log
    assert proxy.handshakes == 0
    # and on the client side, at the first send
    app = Celery("amqps-test", broker=tls_url(proxy))
    app.conf.broker_use_ssl = {"ca_certs": str(missing)}
    try:
        with pytest.raises(ValueError, match=r"broker_use_ssl.*no-such-ca\.pem"):
            app.send_task("tasks.add")
    finally:
        app.close()


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("yes", "must be True or a dict"),
        ({"ca_certs": 42}, "ca_certs must be a file path"),
        ({"cert_reqs": "sometimes"}, "cert_reqs must be"),
        ({"cert_reqs": "none"}, "CERT_NONE"),
        ({"keyfile": "/k.pem"}, "keyfile is given without certfile"),
    ],
)
def test_broker_use_ssl_of_the_wrong_shape_is_refused(
    proxy: TlsProxy, option: Any, words: str
) -> None:
    text = connect_error(tls_url(proxy), option)
    assert "broker_use_ssl" in text
    assert words in text
    assert proxy.handshakes == 0


def test_a_ca_file_that_is_not_pem_is_refused(proxy: TlsProxy, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    text = connect_error(tls_url(proxy), {"ca_certs": str(junk)})
    assert "holds no PEM certificate" in text
    assert str(junk) in text


def test_cert_reqs_from_the_ssl_module_reach_the_transport() -> None:
    app = Celery("amqps-test", broker="amqps://guest@localhost//")
    app.conf.broker_use_ssl = {"cert_reqs": ssl.CERT_NONE, "ca_certs": Path("/x.pem")}
    options = app.transport_options()
    assert options["ssl"] == {"cert_reqs": "none", "ca_certs": "/x.pem"}
    app.conf.broker_use_ssl = {"cert_reqs": "CERT_REQUIRED"}
    assert app.transport_options()["ssl"] == {"cert_reqs": "required"}


def test_rpc_backend_takes_the_brokers_tls_settings(proxy: TlsProxy, tmp_path: Path) -> None:
    """The rpc:// backend connects to the broker with broker_use_ssl too: a bad one
    fails there, by name, before any connection is tried."""
    missing = tmp_path / "absent.pem"
    with pytest.raises(ValueError, match=r"broker_use_ssl: cannot read ca_certs"):
        _core.Backend(
            "rpc://",
            broker_url=tls_url(proxy),
            reply_to=str(uuid.uuid4()),
            transport_options={"ssl": {"ca_certs": str(missing)}},
            connect_timeout=5.0,
        )
    assert proxy.handshakes == 0

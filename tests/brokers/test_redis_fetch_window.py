"""kill -9 of a Redis worker whose queue is almost always empty: every fetch is the
blocking one, and no instant of it may lose an ``acks_late`` message. And a Redis too old
for the consumer (< 6.2) is refused by name and version.

A real SIGKILL lands at a random instant, and the instant that matters (Redis has
answered the worker about a new message, the worker's next command has not reached
Redis) lasts one round trip. The worker therefore talks to Redis through a proxy that
holds back everything the worker sends from the moment Redis sends it the message: the
kill lands exactly in that instant, and what the worker wrote after it never arrives
(as when the process dies before writing it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import REDIS_URL, app_module, queue_length, wait_until, worker_env

if TYPE_CHECKING:
    from conftest import StartWorker, TasksDir, WorkerProcess

pytestmark = pytest.mark.redis

WINDOW_PY = app_module(
    "window",
    """
app.conf.broker_transport_options = {
    "celeriac_heartbeat_interval": 0.5,
    "celeriac_heartbeat_ttl": 2.0,
}


@app.task(acks_late=True, ignore_result=True)
def mark(key, n, seconds=0.0):
    time.sleep(seconds)
    client().sadd(key, n)
""",
    imports=("import time",),
    redis_client=True,
)


#: When to kill the worker: right where Redis tells it of task n ("fetch"), or while
#: task n runs ("task").
KILLS = {25: "fetch", 75: "task", 125: "fetch", 175: "task", 225: "fetch", 275: "task"}


def _listen_in_range() -> socket.socket:
    """A listening socket on 127.0.0.1, on a free port of 7200-7299."""
    listener = socket.socket()
    for port in range(7200, 7300):
        try:
            listener.bind(("127.0.0.1", port))
        except OSError:
            continue
        listener.listen(64)
        return listener
    listener.close()
    pytest.fail("no free port in 7200-7299")


class HoldingProxy:
    """A TCP proxy to the test Redis on 127.0.0.1 (a free port of 7200-7299) that,
    once armed with a marker, holds back what clients send from the moment Redis sends
    a client bytes containing the marker; ``drop_all`` then closes every connection
    without forwarding what was held."""

    def __init__(self) -> None:
        self._listener = _listen_in_range()
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self._cond = threading.Condition()
        self._marker: bytes | None = None
        self._holding = False
        self._generation = 0
        self._sockets: list[socket.socket] = []
        self.upstream: set[str] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", 6379))
            except OSError:
                return
            host, port = server.getsockname()[:2]
            with self._cond:
                self._sockets += [client, server]
                self.upstream.add(f"{host}:{port}")
                generation = self._generation
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._up, args=(client, server, generation), daemon=True
            ).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, generation: int) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._cond:
                    while self._holding and self._generation == generation:
                        self._cond.wait()
                    if self._generation != generation:
                        return  # dropped: what was held never reaches Redis
                server.sendall(data)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                with self._cond:
                    if self._marker is not None and self._marker in data:
                        self._holding = True
                        self._cond.notify_all()
                client.sendall(data)

    def hold_after(self, marker: str) -> None:
        with self._cond:
            self._marker = marker.encode()

    def wait_until_holding(self, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._holding, timeout):
                pytest.fail(f"Redis never sent the worker {self._marker!r}", pytrace=False)

    def drop_all(self) -> None:
        """Close every connection, dropping what was held, and disarm."""
        with self._cond:
            self._generation += 1
            self._holding = False
            self._marker = None
            sockets, self._sockets = self._sockets, []
            self._cond.notify_all()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.drop_all()

    def a_client_is_blocked(self, client: redis.Redis) -> bool:
        with self._cond:
            ours = set(self.upstream)
        return any(
            entry["addr"] in ours and "b" in entry["flags"] for entry in client.client_list()
        )


@pytest.fixture
def proxy() -> Any:
    holding = HoldingProxy()
    yield holding
    holding.close()


def test_kill_9_at_a_blocking_fetch_or_mid_task_loses_none_of_300_acks_late_tasks(
    worker: StartWorker,
    tasks_dir: TasksDir,
    scratch: Any,
    redis_client: redis.Redis,
    proxy: HoldingProxy,
) -> None:
    tasks_dir.write("window.py", WINDOW_PY)
    tasks = tasks_dir.import_module("window")  # the test publishes straight to Redis
    tasks_dir.env = worker_env(tasks_dir.queue, proxy.url, REDIS_URL)  # the worker: proxied
    done = scratch("done")

    def start() -> WorkerProcess:
        return worker("-c", "2", pool="prefork", app="window", check_exit=False)

    current = start()
    kills = {"fetch": 0, "task": 0}
    for n in range(300):
        task_id = f"window-{n}-{uuid.uuid4().hex}"
        kill = KILLS.get(n)
        if kill == "fetch":
            # The worker waits on the empty queue; stop it right where Redis tells it
            # of the next message.
            assert wait_until(lambda: proxy.a_client_is_blocked(redis_client), 10)
            proxy.hold_after(task_id)
        tasks.mark.apply_async((done, n, 0.5 if kill == "task" else 0.0), task_id=task_id)
        if kill == "fetch":
            proxy.wait_until_holding()
        elif kill == "task":
            current.wait_for(rf"\[{task_id}\] received")
        if kill:
            current.kill()
            proxy.drop_all()
            kills[kill] += 1
            current = start()
        assert wait_until(lambda n=n: redis_client.sismember(done, n), 30), (
            f"task {n} was lost (kills so far: {kills})"
        )
    assert redis_client.scard(done) == 300
    assert kills == {"fetch": 3, "task": 3}
    assert queue_length(redis_client, tasks_dir.queue) == 0


class OldRedis:
    """A stand-in for a Redis 6.0 server on 127.0.0.1 (a free port of 7200-7299): it
    answers ``INFO`` with ``redis_version:6.0.16`` and every other command with ``+OK``."""

    def __init__(self) -> None:
        self._listener = _listen_in_range()
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _serve(client: socket.socket) -> None:
        info = b"# Server\r\nredis_version:6.0.16\r\n"
        with contextlib.suppress(OSError), client:
            while data := client.recv(65536):
                replies = b""
                for command in data.split(b"\r\n*"):
                    if b"INFO" in command.upper():
                        replies += b"$%d\r\n%s\r\n" % (len(info), info)
                    else:
                        replies += b"+OK\r\n"
                client.sendall(replies)

    def close(self) -> None:
        self._listener.close()


def test_a_worker_refuses_a_redis_older_than_6_2(worker: StartWorker, tasks_dir: TasksDir) -> None:
    old = OldRedis()
    try:
        url = f"redis://:hunter2@127.0.0.1:{old.port}/0"
        tasks_dir.env = worker_env(tasks_dir.queue, url, REDIS_URL)
        process = worker(ready=False, check_exit=False)
        status = process.wait(30)
    finally:
        old.close()
    assert status != 0, process.log
    assert f"redis://:**@127.0.0.1:{old.port}/0 is version 6.0.16" in process.log, process.log
    assert "6.2 or later" in process.log
    assert "hunter2" not in process.log

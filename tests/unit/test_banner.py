"""The startup banner keeps Celery's shape (docs/wire.md §8) with celeriac's own art."""

from __future__ import annotations

import logging
import re
from datetime import datetime

from celeriac import Celeriac
from celeriac.worker import Worker, WorkerOptions
from celeriac.worker.banner import ART, EVENTS_OFF, BannerInfo, QueueInfo, render
from celeriac.worker.options import available_cpus

#: Celery's art, to make sure ours is not a copy.
CELERY_ART_LINE = "--- ***** -----"


def info(**overrides: object) -> BannerInfo:
    fields: dict[str, object] = {
        "nodename": "w1@box",
        "version": "0.1.0",
        "app": "tasks:0x7f0000000000",
        "transport": "redis://:**@localhost:6379/0",
        "results": "disabled://",
        "concurrency": 2,
        "pool": "threads",
        "task_events": False,
        "queues": [QueueInfo("celery", "celery", "direct", "celery")],
        "tasks": ["tasks.mul", "tasks.add", "celery.chord_unlock"],
        "platform": "Linux-6.0-x86_64",
        "timestamp": datetime(2026, 1, 2, 3, 4, 5),
    }
    fields.update(overrides)
    return BannerInfo(**fields)  # type: ignore[arg-type]


def test_art_is_our_own_and_fits() -> None:
    assert len(ART) == 12
    assert all(len(line) == 15 for line in ART)
    assert CELERY_ART_LINE not in ART
    assert not any("*****" in line for line in ART)


def test_shape() -> None:
    text = render(info(), logging.INFO)
    lines = text.split("\n")
    assert lines[0] == " "  # Celery's banner starts with a blank line
    body = lines[1:14]
    for i, line in enumerate(body):
        prefix = ART[i] + " " if i < len(ART) else " " * 16
        assert line.startswith(prefix), (i, line)
    text_part = [line[16:] for line in body]
    assert text_part == [
        "w1@box v0.1.0 (celeriac)",
        "",
        "Linux-6.0-x86_64 2026-01-02 03:04:05",
        "",
        "[config]",
        ".> app:         tasks:0x7f0000000000",
        ".> transport:   redis://:**@localhost:6379/0",
        ".> results:     disabled://",
        ".> concurrency: 2 (threads)",
        f".> task events: {EVENTS_OFF}",
        "",
        "[queues]",
        ".> celery           exchange=celery(direct) key=celery",
    ]
    # Celery's single-queue quirk: an indented empty line, then a blank line, then tasks.
    assert lines[14:] == ["                ", "", "[tasks]", "  . tasks.add", "  . tasks.mul", ""]


def test_queue_padding_and_order() -> None:
    queues = [QueueInfo("zeta", "zeta", "direct", "zeta"), QueueInfo("a", "a", "direct", "a")]
    text = render(info(queues=queues), logging.WARNING)
    assert ".> a                exchange=a(direct) key=a" in text
    assert text.index(".> a ") < text.index(".> zeta ")
    name_width = re.search(r"\.> (a\s+)exchange", text)
    assert name_width is not None and len(name_width.group(1)) == 17  # 16 + one space


def test_tasks_by_loglevel() -> None:
    assert "[tasks]" not in render(info(), logging.WARNING)
    at_info = render(info(), logging.INFO)
    assert "celery.chord_unlock" not in at_info
    at_debug = render(info(), logging.DEBUG)
    assert "  . celery.chord_unlock\n  . tasks.add\n  . tasks.mul" in at_debug


def test_events_on() -> None:
    assert ".> task events: ON\n" in render(info(task_events=True))


def test_worker_banner_masks_passwords_and_disables_results() -> None:
    app = Celeriac("bannerapp", broker="redis://user:hunter22@example.invalid:6390/3")

    @app.task(name="bannerapp.ping")
    def ping() -> str:
        return "pong"

    worker = Worker(app, WorkerOptions(hostname="w9@%h", loglevel=logging.INFO))
    text = worker.banner()
    assert "hunter22" not in text
    assert ".> transport:   redis://user:**@example.invalid:6390/3" in text
    assert ".> results:     disabled://" in text
    # prefork is the default pool, with one child per CPU this process may use
    assert f".> concurrency: {available_cpus()} (prefork)" in text
    assert re.search(r"\.> app:         bannerapp:0x[0-9a-f]+\n", text)
    assert "  . bannerapp.ping" in text
    assert " w9@" in text and "(celeriac)" in text


def test_worker_banner_with_backend_and_threads() -> None:
    app = Celeriac(
        "bannerapp2",
        broker="redis://127.0.0.1:6379/0",
        backend="redis://:s3cr3t!@127.0.0.1:6379/1",
    )
    worker = Worker(
        app,
        WorkerOptions(pool="threads", concurrency=3, queues=["q1", "q2"], loglevel=logging.INFO),
    )
    text = worker.banner()
    assert "s3cr3t" not in text
    assert ".> results:     redis://:**@127.0.0.1:6379/1" in text
    assert ".> concurrency: 3 (threads)" in text
    assert ".> q1               exchange=q1(direct) key=q1" in text
    assert ".> q2               exchange=q2(direct) key=q2" in text
    assert worker.window == 12

"""A broker URL list (failover) and ``broker_failover_strategy``: read, checked, masked."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest
from celeriac import Celeriac
from celeriac.conf import Settings
from celeriac.exceptions import ImproperlyConfigured
from celeriac.worker.banner import BannerInfo, QueueInfo, render
from celeriac.worker.base import scrub_error
from celeriac.worker.control import _broker_info

FIRST = "amqp://alice:firstsecret@rabbit-a:5672//"
SECOND = "amqp://bob:secondsecret@rabbit-b:5673/prod"
MASKED = "amqp://alice:**@rabbit-a:5672//;amqp://bob:**@rabbit-b:5673/prod"


def test_a_list_is_kept_as_one_string_joined_by_semicolons() -> None:
    assert Settings(broker_url=[FIRST, SECOND]).broker_url == f"{FIRST};{SECOND}"
    assert Settings(broker_url=(FIRST, f" {SECOND} ")).broker_url == f"{FIRST};{SECOND}"
    app = Celeriac("x", broker=[FIRST, SECOND])
    assert app.broker_url == f"{FIRST};{SECOND}"


@pytest.mark.parametrize("value", [[], [FIRST, None], [FIRST, ""], [FIRST, 5]])
def test_a_bad_list_is_refused_without_its_passwords(value: object) -> None:
    with pytest.raises(ImproperlyConfigured, match="broker_url") as raised:
        Settings(broker_url=value)
    assert "secret" not in str(raised.value)


def test_failover_strategy_takes_kombus_names_only() -> None:
    assert Settings().broker_failover_strategy is None
    assert Settings(broker_failover_strategy="shuffle").broker_failover_strategy == "shuffle"
    assert Settings(BROKER_FAILOVER_STRATEGY="round-robin")["broker_failover_strategy"] == (
        "round-robin"
    )
    with pytest.raises(ImproperlyConfigured, match="'round-robin' or 'shuffle'"):
        Settings(broker_failover_strategy="random")
    with pytest.raises(ImproperlyConfigured, match="callable strategy is not supported"):
        Settings(broker_failover_strategy=lambda hosts: hosts)


def test_the_strategy_reaches_the_transport_and_a_bad_one_is_a_clear_error() -> None:
    app = Celeriac("x", broker=[FIRST, SECOND], broker_failover_strategy="shuffle")
    assert app.transport_options()["failover_strategy"] == "shuffle"
    # Given in the transport options directly, it is checked by the core.
    app = Celeriac(
        "x",
        broker="amqp://127.0.0.1:1//;amqp://127.0.0.1:2//",
        broker_transport_options={"failover_strategy": "sideways"},
    )
    with pytest.raises(Exception, match='"sideways"'):
        app.send_task("t", args=[1])


def test_the_banner_and_settings_table_mask_every_password() -> None:
    app = Celeriac("x", broker=[FIRST, SECOND])
    assert app.broker_url_masked == MASKED
    info = BannerInfo(
        nodename="w1@box",
        version="0.1.0",
        app="x:0x7f0000000000",
        transport=app.broker_url_masked,
        results="disabled://",
        concurrency=1,
        pool="solo",
        task_events=False,
        queues=[QueueInfo("celery", "celery")],
        tasks=[],
        platform="Linux",
        timestamp=datetime(2026, 1, 2, 3, 4, 5),
    )
    text = render(info, logging.INFO)
    assert MASKED in text
    assert "secret" not in text
    table = app.conf.table()
    assert "secret" not in str(table), table


def test_error_lines_and_stats_mask_every_password() -> None:
    url = f"{FIRST};{SECOND}"
    text = f"lost bob:secondsecret@rabbit-b and alice:firstsecret@rabbit-a in {url}"
    scrubbed = scrub_error(text, url, MASKED)
    assert "secret" not in scrubbed, scrubbed
    app = Celeriac("x", broker=url, broker_failover_strategy="shuffle")
    info = _broker_info(app)
    assert (info["hostname"], info["port"], info["userid"]) == ("rabbit-a", 5672, "alice")
    assert info["alternates"] == MASKED.split(";")
    assert info["failover_strategy"] == "shuffle"

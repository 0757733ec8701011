"""Dramatiq adapter: Redis (``RedisBroker``, namespace = the queue name) or RabbitMQ
(``RabbitmqBroker``), default middleware, no result backend.

Worker: ``dramatiq benches.peers.dramatiq_peer --processes P --threads T`` (one parent
process plus P worker processes of T threads each).
"""

from __future__ import annotations

import time

import dramatiq

from benches.peers.common import (
    AMQP_URL,
    BROKER,
    IO_SLEEP,
    QUEUE,
    REDIS_URL,
    amqp_length,
    bump,
    count_done,
    cpu_task,
    redis_length,
)
from benches.peers.common import mark as _mark

if BROKER == "redis":
    from dramatiq.brokers.redis import RedisBroker

    broker: dramatiq.Broker = RedisBroker(url=REDIS_URL, namespace=QUEUE)  # type: ignore[no-untyped-call]
    QUEUE_NAME = "default"
elif BROKER == "amqp":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=AMQP_URL.rstrip("/") + "/%2F")
    QUEUE_NAME = QUEUE
else:
    raise SystemExit(f"dramatiq has no {BROKER} broker")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE_NAME, max_retries=0)
def noop() -> None:
    bump()


@dramatiq.actor(queue_name=QUEUE_NAME, max_retries=0)
def mark(key: str) -> None:
    _mark(key)


@dramatiq.actor(queue_name=QUEUE_NAME, max_retries=0)
def io(key: str, n: int) -> None:
    time.sleep(IO_SLEEP)
    count_done(key, n)


@dramatiq.actor(queue_name=QUEUE_NAME, max_retries=0)
def cpu(key: str, n: int) -> None:
    cpu_task(key, n)


def start() -> None:
    pass


def send_noop() -> None:
    noop.send()


def send_noops(n: int) -> None:
    for _ in range(n):
        noop.send()


def send_mark(key: str) -> None:
    mark.send(key)


def send_io(key: str, n: int) -> None:
    io.send(key, n)


def send_cpu(key: str, n: int) -> None:
    cpu.send(key, n)


def pending() -> int:
    if BROKER == "redis":
        return redis_length(f"{QUEUE}:{QUEUE_NAME}")
    return amqp_length(QUEUE)


def finish() -> None:
    broker.close()

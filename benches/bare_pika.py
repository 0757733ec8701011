"""The RabbitMQ ceiling in Python: pika alone consumes a filled queue with the worker's window.

    python -m benches.bare_pika --url amqp://guest:guest@127.0.0.1:5672// --queue NAME -n COUNT

One channel, ``basic.qos(window)``, manual acks, one ``basic.ack`` per message; the queue
(durable, persistent messages) must already hold COUNT messages. Prints one JSON object:
how many it consumed and the seconds from the first message received to the last acked
(``benches/ceiling.rs`` does the same with lapin)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pika  # type: ignore[import-untyped]

#: how long the queue may stay empty before the run fails (it was filled beforehand)
IDLE_LIMIT = 10.0


def pika_url(url: str) -> str:
    """kombu's URL (``amqp://guest:guest@host:5672//``: the vhost ``/``) as pika reads it
    (``.../%2F``): the vhost is the path after the first slash, ``/`` when empty."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) or "/"
    return f"amqp://{parts.netloc}/{quote(vhost, safe='')}"


def drain(
    url: str, queue: str, count: int, window: int, idle: float = IDLE_LIMIT
) -> tuple[int, float]:
    """(messages consumed, seconds from the first received to the last acked)"""
    conn = pika.BlockingConnection(pika.URLParameters(pika_url(url)))
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=window)
        done, first = 0, 0.0

        def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
            nonlocal done, first
            if done == 0:
                first = time.perf_counter()
            ch.basic_ack(method.delivery_tag)
            done += 1
            if done == count:
                ch.stop_consuming()

        channel.basic_consume(queue, on_message)
        seen = -1

        def watchdog() -> None:
            nonlocal seen
            if done == seen:
                channel.stop_consuming()
            else:
                seen = done
                conn.call_later(idle, watchdog)

        conn.call_later(idle, watchdog)
        channel.start_consuming()
        if done < count:
            raise SystemExit(f"bare_pika: the queue ran dry after {done} of {count}")
        seconds = time.perf_counter() - first
        channel.close()  # its close-ok comes after the broker has handled every ack
        return done, seconds
    finally:
        if conn.is_open:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.bare_pika")
    p.add_argument("--url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("-n", type=int, required=True, help="messages the queue holds")
    p.add_argument("--window", type=int, default=4, help="basic.qos prefetch_count (4)")
    p.add_argument(
        "--idle", type=float, default=IDLE_LIMIT,
        help=f"seconds without a message before it fails ({IDLE_LIMIT:.0f})",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.n < 1 or args.window < 1 or args.idle <= 0:
        p.error("need -n >= 1, --window >= 1 and --idle > 0")
    consumed, seconds = drain(args.url, args.queue, args.n, args.window, args.idle)
    print(json.dumps({"client": "pika", "consumed": consumed, "window": args.window,
                      "seconds": seconds}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

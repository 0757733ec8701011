"""Seed corpora for the fuzz targets, made from the messages Celery wrote
(tests/fixtures): `python3 fuzz/seeds.py OUT_DIR` writes OUT_DIR/<target>/<name>."""

from __future__ import annotations

import base64
import json
import struct
import sys
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def short_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">B", len(data)) + data


def amqp_value(value: Any) -> bytes:
    """A value as py-amqp writes it in a header table."""
    if value is None:
        return b"V"
    if isinstance(value, bool):
        return b"t" + struct.pack(">B", value)
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + struct.pack(">i", value)
        return b"l" + struct.pack(">q", value)
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode()
        return b"S" + struct.pack(">I", len(data)) + data
    if isinstance(value, list):
        items = b"".join(amqp_value(item) for item in value)
        return b"A" + struct.pack(">I", len(items)) + items
    return b"F" + amqp_table(value)


def amqp_table(table: dict[str, Any]) -> bytes:
    entries = b"".join(short_string(key) + amqp_value(value) for key, value in table.items())
    return struct.pack(">I", len(entries)) + entries


def main(out: Path) -> None:
    for target in ("json", "envelope", "task", "amqp_headers"):
        (out / target).mkdir(parents=True, exist_ok=True)
    for path in sorted(FIXTURES.glob("*.json")):
        raw = path.read_bytes()
        envelope = json.loads(raw)
        body = base64.b64decode(envelope["body"])
        headers = envelope["headers"]
        (out / "envelope" / path.stem).write_bytes(raw)
        (out / "json" / path.stem).write_bytes(body)
        (out / "json" / f"{path.stem}-headers").write_bytes(json.dumps(headers).encode())
        (out / "task" / path.stem).write_bytes(json.dumps(headers).encode() + b"\xff" + body)
        (out / "amqp_headers" / path.stem).write_bytes(amqp_table(headers) + body)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

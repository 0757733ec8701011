"""``celeriac._core.dumps`` / ``loads`` against the real ``kombu.utils.json``.

The encoder must give the exact bytes kombu writes; the decoder must give the objects
kombu's ``loads`` gives (kombu type markers included). Real Celery 5.7 messages captured
from Redis (``tests/fixtures/celery57_redis_*.json``) are decoded and re-encoded too.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import enum
import json
import math
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from celeriac import _core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.utils import json as kjson

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CELERY_FIXTURES = sorted(FIXTURES.glob("celery57_redis_*.json"))

# kombu is untyped: typed handles on the two functions used.
kombu_dumps_text: Callable[[Any], str] = kjson.dumps
kombu_loads: Callable[[bytes | str], Any] = kjson.loads

HYPOTHESIS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def kombu_dumps(value: Any) -> bytes:
    return kombu_dumps_text(value).encode()


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types, NaN equal to NaN, -0.0 distinct from 0.0, same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, Decimal):
        if a.is_nan():
            return bool(b.is_nan())
        return str(a) == str(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (dt.datetime, dt.time)):
        return bool(a == b) and a.utcoffset() == b.utcoffset()
    return bool(a == b)


def kombu_loads_or_error(data: bytes) -> tuple[Any, BaseException | None]:
    try:
        return kombu_loads(data), None
    except (ValueError, TypeError, AttributeError, UnicodeError, ArithmeticError) as exc:
        return None, exc


# ---------------------------------------------------------------------------
# Strategies

offsets = st.just(dt.timezone.utc) | st.builds(
    dt.timezone,
    st.timedeltas(
        min_value=-dt.timedelta(hours=23, minutes=59, seconds=59),
        max_value=dt.timedelta(hours=23, minutes=59, seconds=59),
    ),
)
surrogate_text = st.text(
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(),
    max_size=8,
)
boundary_ints = st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, -(2**64), 10**40, -(10**40)]
)
ints = st.integers() | st.integers(min_value=-(2**200), max_value=2**200) | boundary_ints
special_decimals = st.sampled_from(
    [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal("-0"), Decimal("1E+3")]
)
json_leaves = st.none() | st.booleans() | ints | st.floats() | st.text() | surrogate_text
marker_leaves = (
    st.datetimes(timezones=st.none() | offsets)
    | st.dates()
    | st.times(timezones=st.none() | offsets)
    | st.decimals(allow_nan=False)
    | special_decimals
    | st.uuids()
    | st.binary(max_size=16)
    | st.text(max_size=8).map(str.encode)
)
keys = st.text(max_size=8) | st.integers() | st.floats() | st.booleans() | st.none()


def nest(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.tuples(inner, inner)
            | st.dictionaries(keys, inner, max_size=5)
        ),
        max_leaves=20,
    )


values = nest(json_leaves | marker_leaves)
plain_json = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


# ---------------------------------------------------------------------------
# dumps


@HYPOTHESIS
@given(values)
def test_dumps_is_byte_for_byte_kombu(value: Any) -> None:
    assert _core.dumps(value) == kombu_dumps(value)


@HYPOTHESIS
@given(values)
def test_loads_of_dumps_equals_kombu_loads(value: Any) -> None:
    data = _core.dumps(value)
    expected, error = kombu_loads_or_error(data)
    if error is not None:  # e.g. a time whose offset fromisoformat refuses
        with pytest.raises(_core.DecodeError):
            _core.loads(data)
        return
    assert same(_core.loads(data), expected)
    assert same(_core.loads(data.decode()), expected)


@HYPOTHESIS
@given(plain_json)
def test_loads_reads_any_python_json(value: Any) -> None:
    for text in (
        json.dumps(value),
        json.dumps(value, ensure_ascii=False, separators=(",", ":")),
        json.dumps(value, indent=2),
    ):
        assert same(_core.loads(text.encode()), json.loads(text))


@HYPOTHESIS
@given(st.floats())
def test_floats_round_trip_exactly(value: float) -> None:
    assert _core.dumps(value) == json.dumps(value).encode()
    assert same(_core.loads(_core.dumps(value)), value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": [1, 2.0, None, True, False]}, b'{"a": [1, 2.0, null, true, false]}'),
        ((), b"[]"),
        ({}, b"{}"),
        ("\u00e9\U0001f600\x7f\x00\n", b'"\\u00e9\\ud83d\\ude00\\u007f\\u0000\\n"'),
        ("a\ud800b", b'"a\\ud800b"'),
        (2**64, b"18446744073709551616"),
        (float("nan"), b"NaN"),
        ([float("inf"), float("-inf")], b"[Infinity, -Infinity]"),
        (1e16, b"1e+16"),
        (
            {2: 1, 2.5: 2, True: 3, None: 4, float("nan"): 5, -(2**70): 6},
            b'{"2": 1, "2.5": 2, "true": 3, "null": 4, "NaN": 5, "-1180591620717411303424": 6}',
        ),
        (
            dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
            b'{"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}',
        ),
        (
            uuid.UUID(int=1),
            b'{"__type__": "uuid", "__value__": {"hex": "00000000000000000000000000000001"}}',
        ),
        (b"\xff", b'{"__type__": "base64", "__value__": "/w=="}'),
    ],
)
def test_known_bytes(value: Any, expected: bytes) -> None:
    assert _core.dumps(value) == expected
    assert kombu_dumps(value) == expected


class Color(enum.IntEnum):
    RED = 1


class Mood(str, enum.Enum):
    HAPPY = "happy"


class Ratio(float):
    def __repr__(self) -> str:
        return "Ratio()"


class Digits(int):
    def __repr__(self) -> str:
        return "Digits()"


class Name(str):
    def __str__(self) -> str:
        return "other"


class Point(NamedTuple):
    x: int
    y: int


class Reversed(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return list(reversed(list(super().items())))


class WithJson:
    def __json__(self) -> Any:
        return {"when": dt.date(2020, 1, 1), "n": [1, 2]}


class DictWithJson(dict):  # type: ignore[type-arg]
    def __json__(self) -> Any:
        return "ignored: json writes dict subclasses natively"


class DateTimeSub(dt.datetime):
    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return "overridden"


class DateSub(dt.date):
    def isoformat(self) -> str:
        return "1999-12-31"


class DateTimeWithJson(dt.datetime):
    def __json__(self) -> Any:
        return "from __json__"


class DecimalSub(Decimal):
    def __str__(self) -> str:
        return "7"


class BytesSub(bytes):
    pass


ODD_VALUES: list[Any] = [
    Color.RED,
    Mood.HAPPY,
    Ratio(1.5),
    Digits(2**70),
    Digits(3),
    Name("name"),
    Point(1, 2),
    collections.OrderedDict([("b", 1), ("a", 2)]),
    collections.defaultdict(list, {"x": [1]}),
    collections.Counter("abca"),
    Reversed({"a": 1, "b": 2}),
    WithJson(),
    DictWithJson(a=1),
    DateTimeSub(2020, 1, 1),
    DateSub(2020, 1, 1),
    DateTimeWithJson(2020, 1, 1),
    DecimalSub("1.5"),
    BytesSub(b"abc"),
    {Name("k"): Digits(5), Color.RED: 1, Ratio(0.5): 2},
    [dt.time(1, 2, 3, tzinfo=dt.timezone(dt.timedelta(hours=-3)))],
]


@pytest.mark.parametrize("value", ODD_VALUES, ids=lambda v: type(v).__name__)
def test_subclasses_and_json_hook_match_kombu(value: Any) -> None:
    assert _core.dumps(value) == kombu_dumps(value)


def test_deep_nesting_within_limit_matches_kombu() -> None:
    value: Any = []
    for _ in range(500):
        value = [value]
    assert _core.dumps(value) == kombu_dumps(value)
    assert _core.loads(_core.dumps(value)) == value


def test_bytearray_is_written_like_bytes() -> None:
    # An extension: kombu raises TypeError for bytearray.
    assert _core.dumps(bytearray(b"hi")) == kombu_dumps(b"hi")
    assert _core.dumps(bytearray(b"\xff")) == kombu_dumps(b"\xff")


# ---------------------------------------------------------------------------
# dumps errors


class Unset:
    pass


class Explodes:
    def __json__(self) -> Any:
        raise RuntimeError("no json for you")


class SelfJson:
    def __json__(self) -> Any:
        return self


@pytest.mark.parametrize(
    "value",
    [{1, 2}, frozenset(), object(), Unset(), complex(1, 2), collections.UserDict(a=1), Unset],
    ids=lambda v: type(v).__name__,
)
def test_unserializable_raises_type_error_like_kombu(value: Any) -> None:
    with pytest.raises(TypeError) as theirs:
        kombu_dumps(value)
    with pytest.raises(TypeError) as ours:
        _core.dumps(value)
    assert str(ours.value) == str(theirs.value)


def test_type_error_names_the_path() -> None:
    with pytest.raises(TypeError) as info:
        _core.dumps({"a": [1, {"b": {3}}]})
    assert str(info.value).startswith("Object of type set is not JSON serializable")
    assert '["a"][1]["b"]' in str(info.value)


@pytest.mark.parametrize("key", [(1, 2), frozenset(), dt.date(2020, 1, 1), b"k"])
def test_bad_dict_keys_raise_like_json(key: Any) -> None:
    with pytest.raises(TypeError) as theirs:
        kombu_dumps({key: 1})
    with pytest.raises(TypeError) as ours:
        _core.dumps({key: 1})
    assert str(ours.value) == str(theirs.value)


def test_self_reference_raises_value_error() -> None:
    items: list[Any] = [1]
    items.append(items)
    mapping: dict[str, Any] = {}
    mapping["me"] = [mapping]
    for value in (items, mapping, SelfJson()):
        with pytest.raises(ValueError):
            kombu_dumps(value)
        with pytest.raises(ValueError, match="circular reference or nesting too deep"):
            _core.dumps(value)


def test_too_deep_raises_value_error() -> None:
    value: Any = []
    for _ in range(600):
        value = [value]
    with pytest.raises(ValueError, match="circular reference or nesting too deep"):
        _core.dumps(value)


def test_json_hook_exception_propagates() -> None:
    with pytest.raises(RuntimeError, match="no json for you"):
        _core.dumps([Explodes()])


# ---------------------------------------------------------------------------
# loads errors

BROKEN_JSON = [
    "",
    " ",
    "[1,",
    "[1 2]",
    "[1,]",
    '{"a" 1}',
    '{"a": 1,}',
    "{1: 2}",
    "{",
    '{"a"',
    "1 2",
    '"abc',
    '"a\nb"',
    '"\\x"',
    '"\\u12x4"',
    "nul",
    "tru",
    "01",
    "1.",
    "-",
    ".5",
    "+1",
    "[]]",
    "\ufeff[]",
    '"\u00e9" x',
]


@pytest.mark.parametrize("text", BROKEN_JSON)
def test_broken_json_raises_decode_error_with_pythons_reason(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as theirs:
        json.loads(text)
    for data in (text, text.encode()):
        with pytest.raises(_core.DecodeError) as ours:
            _core.loads(data)
        assert str(ours.value) == str(theirs.value)


def test_every_truncation_of_a_celery_body_fails_like_json() -> None:
    envelope = json.loads(CELERY_FIXTURES[0].read_bytes())
    text = base64.b64decode(envelope["body"]).decode()
    for end in range(len(text)):
        prefix = text[:end]
        try:
            expected = json.loads(prefix)
        except json.JSONDecodeError as exc:
            with pytest.raises(_core.DecodeError) as ours:
                _core.loads(prefix)
            assert str(ours.value) == str(exc)
        else:
            assert same(_core.loads(prefix), expected)


@pytest.mark.parametrize(
    "text",
    [
        '{"__type__": "set", "__value__": [1]}',
        '{"__type__": 5, "__value__": 1}',
        '{"__type__": null, "__value__": 1}',
        '[{"a": {"__type__": "pickle", "__value__": "x"}}]',
        '{"__type__": "datetime", "__value__": "yesterday"}',
        '{"__type__": "datetime", "__value__": 5}',
        '{"__type__": "date", "__value__": "2024-13-01"}',
        '{"__type__": "time", "__value__": "25:00"}',
        '{"__type__": "decimal", "__value__": "one"}',
        '{"__type__": "decimal", "__value__": [1]}',
        '{"__type__": "uuid", "__value__": "0000"}',
        '{"__type__": "uuid", "__value__": {"hex": "zz"}}',
        '{"__type__": "uuid", "__value__": {"nope": 1}}',
        '{"__type__": "bytes", "__value__": 1}',
        '{"__type__": "bytes", "__value__": "\\ud800"}',
        '{"__type__": "base64", "__value__": "abc"}',
        '{"__type__": "base64", "__value__": 1}',
    ],
)
def test_bad_markers_raise_decode_error(text: str) -> None:
    with pytest.raises((ValueError, TypeError, AttributeError, UnicodeError, ArithmeticError)):
        kombu_loads(text)
    with pytest.raises(_core.DecodeError):
        _core.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"__type__": "x", "__value__": 1, "other": 2}',
        '{"__type__": "x"}',
        '{"__value__": 1}',
        '{"__type__": "bytes", "__type__": "x", "__value__": 1, "__value__": 2}',
        '{"__type__": "base64", "__value__": "a-b_c=="}',
        '{"__type__": "uuid", "__value__": {"int": 5}}',
        '{"__type__": "decimal", "__value__": 5}',
        '{"__type__": "datetime", "__value__": "2024-01-02 03:04:05Z"}',
        '{"__type__": "date", "__value__": "2024-01-02T03:04"}',
        '[{"__type__": "bytes", "__value__": "\\u00e9"}, '
        '{"x": {"__type__": "time", "__value__": "01:02"}}]',
    ],
)
def test_marker_edge_cases_match_kombu(text: str) -> None:
    expected, error = kombu_loads_or_error(text.encode())
    if error is not None:
        with pytest.raises(_core.DecodeError):
            _core.loads(text)
    else:
        assert same(_core.loads(text), expected)


def test_invalid_utf8_raises_decode_error() -> None:
    for data in (b'"\xff"', b'["\xed\xa0\x80"]', b"\xc3"):
        with pytest.raises(UnicodeDecodeError):
            kombu_loads(data)
        with pytest.raises(_core.DecodeError):
            _core.loads(data)


def test_python_json_extensions_are_read() -> None:
    text = '[NaN, Infinity, -Infinity, 123456789012345678901234567890, "\\ud800", -0, -0.0]'
    assert same(_core.loads(text), json.loads(text))


def test_loads_input_types() -> None:
    assert _core.loads(b"[1]") == [1]
    assert _core.loads("[1]") == [1]
    with pytest.raises(TypeError):
        _core.loads(123)  # type: ignore[arg-type]
    assert issubclass(_core.DecodeError, _core.CeleriacError)


def test_loads_depth_limit() -> None:
    ok = "[" * 500 + "]" * 500
    assert _core.loads(ok) == json.loads(ok)
    with pytest.raises(_core.DecodeError, match="nesting too deep"):
        _core.loads("[" * 600 + "]" * 600)


# ---------------------------------------------------------------------------
# Real Celery 5.7 messages


def test_fixtures_exist() -> None:
    names = {path.name for path in CELERY_FIXTURES}
    for kind in ("plain_args", "kwargs_types", "countdown_expires", "chain", "link", "priority5"):
        assert f"celery57_redis_{kind}.json" in names


@pytest.mark.parametrize("path", CELERY_FIXTURES, ids=lambda p: p.stem)
def test_celery_envelope_and_body_decode_like_kombu(path: Path) -> None:
    raw = path.read_bytes()
    envelope = _core.loads(raw)
    assert same(envelope, kombu_loads(raw))
    # kombu wrote the envelope with its dumps: ours gives the same bytes back.
    assert _core.dumps(envelope) == raw

    body = base64.b64decode(envelope["body"])
    decoded = _core.loads(body)
    assert same(decoded, kombu_loads(body))
    assert _core.dumps(decoded) == body
    args, kwargs, embed = decoded
    assert isinstance(args, list)
    assert isinstance(kwargs, dict)
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}


def _body(name: str) -> Any:
    envelope = json.loads((FIXTURES / f"celery57_redis_{name}.json").read_bytes())
    return _core.loads(base64.b64decode(envelope["body"])), envelope


def test_celery_kwargs_markers_become_objects() -> None:
    (_, kwargs, _), _ = _body("kwargs_types")
    assert kwargs["naive"] == dt.datetime(2024, 1, 2, 3, 4, 5, 123456)
    assert kwargs["aware"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert kwargs["offset"].utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert kwargs["day"] == dt.date(2024, 2, 29) and type(kwargs["day"]) is dt.date
    assert kwargs["clock"] == dt.time(23, 59, 58, 1)
    assert same(kwargs["price"], Decimal("12.340"))
    assert kwargs["id"] == uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert kwargs["text_bytes"] == b"hello"
    assert kwargs["raw_bytes"] == b"\x00\xff\xfe"
    assert kwargs["unicode"] == "h\u00e9llo \u20ac \U0001f600"
    assert kwargs["big"] == 2**70
    assert same(kwargs["floats"], [0.1, 1e16, -0.0, 1.5e-7])


@pytest.mark.parametrize(
    ("name", "check"),
    [
        (
            "chain",
            lambda embed, env: [s["task"] for s in embed["chain"]] == ["tasks.mul", "tasks.add"],
        ),
        (
            "link",
            lambda embed, env: (
                embed["callbacks"][0]["args"] == [10] and embed["errbacks"][0]["immutable"] is True
            ),
        ),
        (
            "countdown_expires",
            lambda embed, env: (
                env["headers"]["eta"] is not None and env["properties"]["expiration"] == "120000"
            ),
        ),
        ("priority5", lambda embed, env: env["properties"]["priority"] == 5),
    ],
)
def test_celery_message_details(name: str, check: Callable[[Any, Any], bool]) -> None:
    (_, _, embed), envelope = _body(name)
    assert check(embed, envelope)

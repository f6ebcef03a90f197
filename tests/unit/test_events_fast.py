"""The sink's fast decoder agrees with the reference decoder on every input (hypothesis).

``decode_event_fast`` must accept exactly what ``decode_event`` accepts, with the same values,
and refuse with the same error. Its fast path (``_fast``, msgspec + the rules msgspec cannot
state) is checked on its own too: whatever it accepts, the reference accepts with the same
values; and it takes every valid event (so the fallback is for bad input only).

Inputs: generated valid events; the same events with one field replaced by an edge value or
arbitrary JSON, a field removed or an unknown one added, numbers written as raw JSON tokens
(``1e400``, ``-0``, huge integers), keys repeated; valid encodings with bytes flipped, inserted
or cut; and arbitrary JSON and bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from metering.events import (
    MAX_DIMENSION_VALUE,
    MAX_DIMENSIONS,
    MAX_EVENT_BYTES,
    MAX_QUANTITY,
    EventDecodeError,
    decode_event,
)
from metering.events_fast import _fast, decode_event_fast, future_limit

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
SKEW = 300.0
LIMIT = future_limit(NOW, SKEW)
IDENT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)
DIM_KEY = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}", fullmatch=True)


class Raw(str):
    """A JSON token written as is (numbers the json module would not write: 1e400, -0, 01)."""


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object as (key, value) pairs, so that a key may repeat."""


def dump(value: Any, *, ascii_only: bool = True) -> str:
    """JSON text of ``value`` (dicts, :class:`Pairs`, lists, :class:`Raw` tokens, scalars)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        value = Pairs(value.items())
    if isinstance(value, Pairs):
        items = (
            json.dumps(k, ensure_ascii=ascii_only) + ":" + dump(v, ascii_only=ascii_only)
            for k, v in value
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only=ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def rfc3339(t: dt.datetime, style: int) -> str:
    if style == 0:
        return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if style == 1:
        return t.astimezone(dt.UTC).strftime("%Y-%m-%dt%H:%M:%S.%fz")
    if style == 2:
        return t.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))).isoformat(" ")
    return t.astimezone(dt.timezone(dt.timedelta(hours=-8))).isoformat(timespec="milliseconds")


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event as a JSON object (dict), with optional fields present or not."""
    decision = draw(st.sampled_from([None, "allowed", "rejected"]))
    when = draw(
        st.datetimes(
            min_value=dt.datetime(2000, 1, 1),
            max_value=dt.datetime(2026, 3, 1, 12, 4, 59),
            timezones=st.just(dt.UTC),
        )
    )
    data: dict[str, Any] = {
        "meter": draw(IDENT),
        "quantity": draw(
            st.floats(min_value=0, max_value=MAX_QUANTITY)
            | st.integers(min_value=0, max_value=int(MAX_QUANTITY))
        ),
    }
    if draw(st.booleans()):
        data["dimensions"] = draw(
            st.dictionaries(DIM_KEY, st.text(max_size=MAX_DIMENSION_VALUE), max_size=MAX_DIMENSIONS)
        )
    if decision is not None:
        data["decision"] = decision
    elif draw(st.booleans()):
        data["decision"] = None
    doc: dict[str, Any] = {
        "id": draw(st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True)),
        "subject": draw(IDENT),
        "time": rfc3339(when, draw(st.integers(0, 3))),
        "data": data,
    }
    if decision is not None or draw(st.booleans()):
        doc["type"] = "metering.ratelimit" if decision else "metering.usage"
    if draw(st.booleans()):
        doc["specversion"] = "1.0"
    if draw(st.booleans()):
        doc["source"] = draw(st.text(min_size=1, max_size=256))
    if draw(st.booleans()):
        doc["datacontenttype"] = draw(st.sampled_from(["application/json", None]))
    keys = draw(st.permutations(list(doc)))
    return {k: doc[k] for k in keys}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

#: edge values per field: each is just inside or just outside a rule of the reference
EDGES: dict[str, list[Any]] = {
    "id": ["", "a" * 128, "a" * 129, "a b", "a\n", "é", "\x7f", "~!", 5, None, True],
    "subject": ["", "-a", "_a", "a" * 64, "a" * 65, "a\n", "ü", "a{b}", "A.b:c-d_e", 1, None],
    "source": ["", "x", "é" * 256, "é" * 257, "\x00", 1, None],
    "specversion": ["1.0", "1.1", "1", Raw("1.0"), None],
    "type": ["metering.usage", "metering.ratelimit", "metering.other", "", None, 1],
    "datacontenttype": ["application/json", "text/plain", None, 0],
    "time": [
        "2026-03-01T12:00:00Z",
        "2026-03-01T12:05:00Z",  # exactly at the skew limit
        "2026-03-01T12:05:00.000001Z",  # just past it
        "2026-03-01T17:35:00+05:30",
        "2026-03-01T17:35:00.001+05:30",
        "2026-03-01t12:00:00z",
        "2026-03-01 12:00:00+00:00",
        "2026-03-01T12:00:00.123456789Z",
        "2026-03-01T12:00:00.1234567890Z",
        "2026-03-01T12:00:00",
        "2026-03-01T12:00:00+24:00",
        "2026-03-01T12:00:00+00:60",  # 60 minutes: no RFC 3339 offset
        "2026-03-01T12:00:00-23:59",
        "2026-03-01T12:00:00-00:00",
        "2026-02-30T00:00:00Z",
        "2026-03-01T23:59:60Z",
        "2026-03-01T12:00Z",
        "20260301T120000Z",
        "\u0662\u0660\u0662\u0666-03-01T12:00:00Z",
        "2026-03-01T12:00:00Z\n",
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+01:00",
        1772366400,
        None,
    ],
    "meter": ["", "a" * 64, "a" * 65, "_a", "a\n", "é", 1, None],
    "quantity": [
        0,
        -0.0,
        Raw("-0"),
        Raw("-0.0"),
        -1,
        -1e-300,
        Raw("-1e-400"),
        1e15,
        Raw("1000000000000000.0"),
        Raw("1000000000000001"),
        10**30,
        1e308,
        Raw("1e400"),
        Raw("1E2"),
        Raw("1" + "0" * 400),
        Raw("1" + "0" * 60 + "1"),
        Raw("NaN"),
        Raw("Infinity"),
        Raw("01"),
        Raw("1."),
        True,
        "1",
        None,
    ],
    "dimensions": [
        {},
        None,
        [],
        {f"k{i}": "v" for i in range(MAX_DIMENSIONS)},
        {f"k{i}": "v" for i in range(MAX_DIMENSIONS + 1)},
        {"a": "é" * MAX_DIMENSION_VALUE},
        {"a": "é" * (MAX_DIMENSION_VALUE + 1)},
        {"k" * 64: ""},
        {"k" * 65: ""},
        {"_k": "v"},
        {".k": "v"},
        {"k\n": "v"},
        {"": "v"},
        {"k": 1},
        {"k": None},
        {"k": {"n": "v"}},
    ],
    "decision": ["allowed", "rejected", "maybe", None, True, ""],
}
DATA_FIELDS = {"meter", "quantity", "dimensions", "decision"}


@st.composite
def mutated_documents(draw: st.DrawFn) -> bytes:
    """A valid document with one or two fields replaced, removed or added, or keys repeated."""
    doc = draw(valid_documents())
    for _ in range(draw(st.integers(1, 2))):
        field = draw(st.sampled_from(sorted(EDGES)))
        target = doc["data"] if field in DATA_FIELDS and isinstance(doc["data"], dict) else doc
        action = draw(st.sampled_from(["edge", "edge", "json", "remove", "extra"]))
        if action == "edge":
            target[field] = draw(st.sampled_from(EDGES[field]))
        elif action == "json":
            target[field] = draw(json_values)
        elif action == "remove":
            target.pop(field, None)
        else:
            target[draw(st.sampled_from(["extra", "Id", "data2", "meter"]))] = 1
    pairs = Pairs(doc.items())
    if draw(st.booleans()):  # a key repeated: the later value wins in both decoders
        key = draw(st.sampled_from([*sorted(EDGES), "data"]))
        value = draw(st.sampled_from(EDGES.get(key, [{}, {"meter": "m", "quantity": 1}])))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, value))
    return dump(pairs, ascii_only=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    raw = bytearray(dump(draw(valid_documents()), ascii_only=draw(st.booleans())).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if kind == "flip" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        else:
            del raw[at:]
    return bytes(raw)


def values(ev: Any) -> tuple[Any, ...]:
    """Everything the pipeline reads of an event; quantity by its exact bits (-0.0 != 0.0)."""
    q = ev.data.quantity
    assert type(q) is float
    assert ev.time.tzinfo is not None and ev.time.utcoffset() == dt.timedelta(0)
    return (
        ev.specversion,
        ev.id,
        ev.source,
        ev.type,
        ev.subject,
        ev.tenant,
        ev.time,
        ev.datacontenttype,
        ev.data.meter,
        q.hex() if math.isfinite(q) else repr(q),
        math.copysign(1.0, q),
        dict(ev.data.dimensions),
        ev.data.decision,
        ev.billable,
    )


def reference(raw: Any) -> tuple[str, Any]:
    try:
        return "ok", values(decode_event(raw, now=NOW, max_future_skew=SKEW))
    except EventDecodeError as exc:
        return "error", str(exc)


def fast(raw: Any) -> tuple[str, Any]:
    try:
        return "ok", values(decode_event_fast(raw, now=NOW, max_future_skew=SKEW, limit=LIMIT))
    except EventDecodeError as exc:
        return "error", str(exc)


def check_agree(raw: Any) -> tuple[str, Any]:
    """Both decoders agree; and the fast path alone accepts only what the reference accepts."""
    expected = reference(raw)
    assert fast(raw) == expected
    quick = _fast(raw, LIMIT) if isinstance(raw, bytes) else None
    if quick is not None:
        assert expected == ("ok", values(quick))
    if currently_in_test_context():
        event(f"reference {expected[0]}, fast path {'took it' if quick else 'deferred'}")
    return expected


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(valid_documents(), st.booleans())
def test_every_valid_event_takes_the_fast_path_with_the_reference_values(
    doc: dict[str, Any], ascii_only: bool
) -> None:
    raw = dump(doc, ascii_only=ascii_only).encode()
    if len(raw) > MAX_EVENT_BYTES:
        return
    quick = _fast(raw, LIMIT)
    assert quick is not None, raw
    assert reference(raw) == ("ok", values(quick))


@FUZZ
@given(mutated_documents())
def test_mutated_events_get_the_same_verdict_values_and_error(raw: bytes) -> None:
    check_agree(raw)


@FUZZ
@given(byte_mutations())
def test_corrupted_bytes_get_the_same_verdict_values_and_error(raw: bytes) -> None:
    check_agree(raw)


@settings(max_examples=200, deadline=None)
@given(json_values | st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_json_bytes_and_text_get_the_same_verdict(value: Any) -> None:
    if isinstance(value, bytes | str):
        check_agree(value)
    else:
        check_agree(json.dumps(value).encode())


@pytest.mark.parametrize(
    "field, edge",
    [(f, e) for f, edges in EDGES.items() for e in edges],
    ids=lambda v: repr(v)[:30],
)
def test_each_edge_value_gets_the_same_verdict(field: str, edge: Any) -> None:
    doc: dict[str, Any] = {
        "id": "e-1",
        "subject": "acme",
        "time": "2026-03-01T11:59:00Z",
        "data": {"meter": "requests", "quantity": 1.5, "dimensions": {"route": "/x"}},
    }
    if field == "decision" and edge is not None:
        doc["type"] = "metering.ratelimit"
    (doc["data"] if field in DATA_FIELDS else doc)[field] = edge
    check_agree(dump(doc).encode())


def test_inputs_that_are_not_bytes_get_the_same_verdict() -> None:
    good = dump(
        {"id": "e", "subject": "acme", "time": "2026-03-01T11:00:00Z",
         "data": {"meter": "m", "quantity": 2}}
    )  # fmt: skip
    for raw in (good, bytearray(good.encode()), memoryview(good.encode()), 5, None, "\ud800"):
        check_agree(raw)
    assert fast(b" " * (MAX_EVENT_BYTES - len(good)) + good.encode())[0] == "ok"
    too_big = b" " * (MAX_EVENT_BYTES + 1 - len(good)) + good.encode()
    assert fast(too_big) == reference(too_big) == (
        "error", f"event: {MAX_EVENT_BYTES + 1} bytes encoded, at most {MAX_EVENT_BYTES} allowed"
    )  # fmt: skip


def test_a_refusal_is_the_reference_error_naming_the_field() -> None:
    raw = dump(
        {"id": "e", "subject": "acme", "time": "2026-03-01T11:00:00Z",
         "data": {"meter": "m", "quantity": -1}}
    ).encode()  # fmt: skip
    with pytest.raises(
        EventDecodeError, match=r"^data\.quantity: must be finite, >= 0 and <= 1e\+15$"
    ):
        decode_event_fast(raw, now=NOW, max_future_skew=SKEW)


def test_a_naive_now_is_refused_like_the_reference() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decode_event_fast(b"{}", now=dt.datetime(2026, 3, 1), max_future_skew=SKEW)


def test_a_negative_zero_quantity_is_counted_as_zero() -> None:
    """ClickHouse's uniqExact tells -0.0 from 0.0: UNIQUE_COUNT over 0, 0, -0.0 answered 2.
    Both decoders give 0.0 with its sign cleared."""
    doc = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "urn:t",
        "type": "metering.usage",
        "subject": "acme",
        "time": "2026-01-01T00:00:00Z",
        "data": {"meter": "tokens", "quantity": -0.0},
    }
    raw = json.dumps(doc).encode()
    assert b"-0.0" in raw
    assert check_agree(raw)[0] == "ok"
    assert math.copysign(1.0, decode_event(raw, now=NOW, max_future_skew=SKEW).data.quantity) == 1
    assert (
        math.copysign(1.0, decode_event_fast(raw, now=NOW, max_future_skew=SKEW).data.quantity) == 1
    )

"""CloudEvents attributes the model has no field for: ``dataschema`` and extension attributes.

CloudEvents 1.0 lets any producer add extension attributes at the top level (its SDKs with
OpenTelemetry add ``traceparent`` and ``tracestate``), and ``dataschema`` is an optional core
attribute: such an event is valid and must count. Both decoders check them by the same rules
(name: 1-20 lower-case ASCII letters and digits; value: string, 32-bit integer or boolean) and
drop them; ``data`` stays strict. And two boundary messages: an event just past the future skew
or the lateness must not read as if it were within it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering.events import (
    MAX_DATASCHEMA_LENGTH,
    MAX_EXTENSION_VALUE,
    EventDecodeError,
    UsageEvent,
    decode_event,
    encode_event,
    seconds_past,
)
from metering.events_fast import _fast, decode_event_fast
from streams.sink import ClickHouseSink, Record
from tests.unit.test_events_fast import (
    LIMIT,
    NOW,
    SKEW,
    check_agree,
    dump,
    json_values,
    reference,
    valid_documents,
    values,
)
from tests.unit.test_streams_sink import RecordedStorage

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EXTENSIONS: dict[str, Any] = {
    "dataschema": "https://schemas.example.com/usage/v2.json",
    "traceparent": TRACEPARENT,
    "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
    "partitionkey": "acme",
    "sequence": 42,
    "sampled": True,
}


def doc(**extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "ext-1",
        "source": "urn:svc:checkout",
        "type": "metering.usage",
        "subject": "acme",
        "time": "2026-03-01T11:59:00Z",
        "data": {"meter": "requests", "quantity": 2, "dimensions": {"route": "/x"}},
        **extra,
    }


def raw(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def test_dataschema_and_extension_attributes_are_accepted_by_both_decoders_and_dropped() -> None:
    with_them, without = raw(doc(**EXTENSIONS)), raw(doc())
    assert check_agree(with_them) == check_agree(without) == reference(without)
    assert reference(with_them)[0] == "ok"
    quick = _fast(with_them, LIMIT)  # the worker's msgspec path takes it, no pydantic fallback
    assert quick is not None and values(quick) == reference(without)[1]
    again = json.loads(encode_event(decode_event(with_them, now=NOW, max_future_skew=SKEW)))
    assert again == json.loads(encode_event(decode_event(without, now=NOW, max_future_skew=SKEW)))
    assert not EXTENSIONS.keys() & again.keys()  # not stored, not forwarded


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ID": "x"}, "ID: is not a known field (attribute names are lower case: 'id')"),
        ({"Subject": "acme"}, "Subject: is not a known field (attribute names are lower case"),
        ({"DataSchema": "urn:x"}, "DataSchema: is not a known field (attribute names are lower"),
        ({"trace_parent": "x"}, "trace_parent: is not a known field, nor an extension attribute"),
        ({"TraceParent": "x"}, "TraceParent: is not a known field, nor an extension attribute"),
        ({"a" * 21: "x"}, "a" * 21 + ": is not a known field, nor an extension attribute"),
        ({"": "x"}, ": is not a known field, nor an extension attribute name"),
        ({"traceparent": None}, "traceparent: an extension attribute must be a string, an"),
        ({"traceparent": {"v": 1}}, "traceparent: an extension attribute must be a string, an"),
        ({"traceparent": ["x"]}, "traceparent: an extension attribute must be a string, an"),
        ({"sequence": 1.5}, "sequence: an extension attribute must be a string, an integer"),
        ({"sequence": 2**31}, "sequence: an extension attribute's integer must be within"),
        ({"sequence": -(2**31) - 1}, "sequence: an extension attribute's integer must be within"),
        ({"tracestate": "x" * (MAX_EXTENSION_VALUE + 1)}, "tracestate: is 2049 characters, at"),
        ({"dataschema": ""}, "dataschema: must be a URI reference (RFC 3986) of 1-2048"),
        ({"dataschema": "has space"}, "dataschema: must be a URI reference"),
        ({"dataschema": "1a:b"}, "dataschema: must be a URI reference"),
        ({"dataschema": "urn:x%zz"}, "dataschema: must be a URI reference"),
        ({"dataschema": "urn:x#a#b"}, "dataschema: must be a URI reference"),
        ({"dataschema": "urn:é"}, "dataschema: must be a URI reference"),
        ({"dataschema": 5}, "dataschema: must be a URI reference"),
        ({"dataschema": None}, "dataschema: must be a URI reference"),
        ({"dataschema": "/" * (MAX_DATASCHEMA_LENGTH + 1)}, "dataschema: must be a URI"),
    ],
)
def test_a_bad_attribute_name_or_value_is_refused_naming_it_by_both_decoders(
    extra: dict[str, Any], message: str
) -> None:
    verdict = check_agree(raw(doc(**{"traceparent": TRACEPARENT, **extra})))
    assert verdict[0] == "error"
    assert verdict[1].startswith(message), verdict[1]


@pytest.mark.parametrize(
    "dataschema",
    ["urn:x", "https://e.com/s?v=2#frag", "schemas/usage.json", "../s", "//host/p", "a%20b", "#f"],
)
def test_a_uri_reference_is_a_valid_dataschema(dataschema: str) -> None:
    assert check_agree(raw(doc(dataschema=dataschema)))[0] == "ok"
    assert _fast(raw(doc(dataschema=dataschema)), LIMIT) is not None


@pytest.mark.parametrize("value", ["", "x" * MAX_EXTENSION_VALUE, -(2**31), 2**31 - 1, 0, False])
def test_extension_values_at_the_bounds_are_accepted(value: Any) -> None:
    assert check_agree(raw(doc(ext=value)))[0] == "ok"


def test_data_stays_strict_and_errors_of_known_fields_stay_as_they_were() -> None:
    unknown_in_data = doc(traceparent=TRACEPARENT)
    unknown_in_data["data"]["traceparent"] = TRACEPARENT
    assert check_agree(raw(unknown_in_data)) == ("error", "data.traceparent: is not a known field")
    assert check_agree(raw(doc(traceparent=TRACEPARENT, subject=""))) == reference(
        raw(doc(subject=""))
    )
    missing_id = {k: v for k, v in doc(traceparent=TRACEPARENT).items() if k != "id"}
    assert check_agree(raw(missing_id)) == ("error", "id: is required")


def test_an_event_without_extensions_takes_the_one_strict_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot path for events as the pipeline's own producers write them is unchanged: the
    second (lenient) parse is only for an event the strict parse refused."""
    import metering.events_fast as fast_module

    class Refuse:
        def decode(self, raw: bytes) -> Any:
            raise AssertionError("the lenient parse ran for an event without extensions")

    monkeypatch.setattr(fast_module, "_extended_decoder", Refuse())
    monkeypatch.setattr(fast_module, "_object_decoder", Refuse())
    assert _fast(raw(doc()), LIMIT) is not None
    unknown_in_data = doc()
    unknown_in_data["data"]["unit"] = "req"
    assert _fast(raw(unknown_in_data), LIMIT) is None


NAMES = st.sampled_from(
    ["traceparent", "tracestate", "dataschema", "x", "a1", "a" * 20, "a" * 21, "Id", "ID",
     "DATA", "Trace", "trace-parent", "tracé", "", "data2", "meter"]
)  # fmt: skip
ATTRIBUTE_VALUES = (
    json_values
    | st.integers(min_value=-(2**31) - 2, max_value=2**31 + 1)
    | st.text(min_size=MAX_EXTENSION_VALUE - 1, max_size=MAX_EXTENSION_VALUE + 1)
    | st.sampled_from(["urn:x", "https://e.com/a b", "1a:b", "a%2", TRACEPARENT])
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_documents(), st.dictionaries(NAMES, ATTRIBUTE_VALUES, max_size=3), st.booleans())
def test_any_attributes_on_a_valid_event_get_the_same_verdict_from_both_decoders(
    document: dict[str, Any], extra: dict[str, Any], ascii_only: bool
) -> None:
    encoded = dump({**document, **extra}, ascii_only=ascii_only).encode("utf-8", "surrogatepass")
    verdict = check_agree(encoded)
    if verdict[0] == "ok":  # accepted: the same event as without the attributes
        assert verdict == reference(dump(document).encode())


ATTRIBUTES = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}
EXTENSION_NAMES = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
    lambda name: name not in ATTRIBUTES | {"dataschema"}
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    valid_documents(),
    st.dictionaries(
        EXTENSION_NAMES,
        st.text(max_size=64) | st.booleans() | st.integers(-(2**31), 2**31 - 1),
        max_size=4,
    ),
)
def test_every_valid_event_with_valid_extensions_takes_the_fast_path(
    document: dict[str, Any], extra: dict[str, Any]
) -> None:
    encoded = dump({**document, **extra}).encode()
    quick = _fast(encoded, LIMIT)
    assert quick is not None, encoded
    assert reference(encoded) == ("ok", values(quick))


def test_the_worker_counts_an_event_with_extensions() -> None:
    storage = RecordedStorage()
    sink = ClickHouseSink(
        storage,
        topic="usage.events",
        lateness_seconds=3600,
        max_future_skew=SKEW,
        clock=lambda: NOW,
    )
    value = raw(doc(**EXTENSIONS))
    batch = sink.prepare([Record("usage.events", 0, 0, b"acme", value)])
    assert batch.dead_letters == []
    sink.write(batch)
    assert [(r[0], r[3], r[8]) for r in storage.rows] == [("ext-1", "acme", 2.0)]


# --- boundary messages --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ahead", "shown"),
    [(300.001, "300.001"), (300.000001, "300.001"), (300.4, "300.400"), (300.5, "300.500"),
     (300.6, "301"), (301, "301")],
)  # fmt: skip
def test_a_time_just_past_the_future_skew_does_not_read_as_within_it(
    ahead: float, shown: str
) -> None:
    t = (NOW + dt.timedelta(seconds=ahead)).isoformat().replace("+00:00", "Z")
    expected = f"time: is {shown}s in the future (at most 300s allowed)"
    with pytest.raises(EventDecodeError) as info:
        decode_event(raw(doc(time=t)), now=NOW, max_future_skew=300)
    assert str(info.value) == expected
    with pytest.raises(EventDecodeError) as info:
        decode_event_fast(raw(doc(time=t)), now=NOW, max_future_skew=300)
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("age", "shown"),
    [(10800.1, "10800.100"), (10800.000001, "10800.001"), (10800.5, "10800.500"),
     (10801, "10801")],
)  # fmt: skip
def test_an_event_just_past_the_lateness_does_not_read_as_within_it(age: float, shown: str) -> None:
    sink = ClickHouseSink(
        RecordedStorage(),
        topic="usage.events",
        lateness_seconds=10800,
        max_future_skew=SKEW,
        clock=lambda: NOW,
    )
    t = (NOW - dt.timedelta(seconds=age)).isoformat().replace("+00:00", "Z")
    batch = sink.prepare([Record("usage.events", 0, 0, b"acme", raw(doc(time=t)))])
    assert [(d.reason, d.error) for d in batch.dead_letters] == [
        ("late", f"time: {shown}s old, later than the accepted lateness (10800s)")
    ]


@given(
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
)
def test_seconds_past_a_bound_always_read_as_more_than_it(a: float, b: float) -> None:
    seconds, bound = max(a, b), min(a, b)
    if seconds > bound:
        assert float(seconds_past(seconds, bound)) > bound


def test_many_bad_attributes_give_a_bounded_message_from_both_decoders() -> None:
    verdict = check_agree(raw(doc(**{f"Bad{i}": i for i in range(500)})))
    assert verdict[0] == "error"
    problems = verdict[1].split("; ")
    assert problems[0].startswith("Bad0: is not a known field, nor an extension attribute name")
    assert problems[10:] == ["event: and 490 more bad attributes"]


def test_the_json_schema_describes_the_accepted_attributes() -> None:
    """The API's OpenAPI document gives UsageEvent's schema: it must not tell a client that an
    event with ``traceparent`` or ``dataschema`` is invalid."""
    schema = UsageEvent.model_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["dataschema"]["format"] == "uri-reference"
    [(pattern, extension)] = schema["patternProperties"].items()
    for name in ("traceparent", "tracestate", "a", "a" * 20, "x9"):
        assert re.search(pattern, name), name
    for name in [*schema["properties"], "Traceparent", "trace_parent", "a" * 21, ""]:
        assert not re.search(pattern, name), name  # fields keep their own schema only
    assert [alt["type"] for alt in extension["anyOf"]] == ["string", "integer", "boolean"]

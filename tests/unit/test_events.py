"""The usage event model: what it accepts, what it refuses, and how it says why."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from metering.events import (
    MAX_DIMENSION_VALUE,
    MAX_DIMENSIONS,
    MAX_EVENT_BYTES,
    EventDecodeError,
    UsageEvent,
    decision_event,
    decode_event,
    encode_event,
    usage_event,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def valid_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "0b6f0e0c-1f7e-4d55-9c1c-7c0ad1d7c0de",
        "source": "urn:svc:checkout",
        "type": "metering.usage",
        "subject": "acme-corp",
        "time": "2026-03-01T11:59:00.250Z",
        "data": {"meter": "api.calls", "quantity": 3, "dimensions": {"region": "eu"}},
    }
    for key, value in changes.items():
        if key.startswith("data_"):
            doc["data"][key.removeprefix("data_")] = value
        else:
            doc[key] = value
    return doc


def decode_doc(doc: Any, **kw: Any) -> UsageEvent:
    return decode_event(json.dumps(doc).encode(), now=NOW, **kw)


def assert_refused(doc: Any, field: str, fragment: str = "") -> None:
    with pytest.raises(EventDecodeError) as info:
        decode_doc(doc)
    message = str(info.value)
    assert message.startswith(f"{field}:") or f"; {field}:" in message, message
    assert fragment in message


# --- what is accepted ---------------------------------------------------------------------------
def test_a_valid_document_decodes_to_the_tenant_meter_quantity_and_utc_time() -> None:
    ev = decode_doc(valid_doc())
    assert ev.tenant == "acme-corp"
    assert ev.data.meter == "api.calls"
    assert ev.data.quantity == 3.0
    assert ev.data.dimensions == {"region": "eu"}
    assert ev.time == dt.datetime(2026, 3, 1, 11, 59, 0, 250000, tzinfo=dt.UTC)
    assert ev.billable is True


def test_a_time_with_an_offset_is_held_and_written_in_utc() -> None:
    ev = decode_doc(valid_doc(time="2026-03-01T13:30:00+02:00"))
    assert ev.time == dt.datetime(2026, 3, 1, 11, 30, tzinfo=dt.UTC)
    assert json.loads(encode_event(ev))["time"] == "2026-03-01T11:30:00Z"


@pytest.mark.parametrize("offset", ["+00:60", "+24:00", "-99:00", "+1:00"])
def test_an_offset_outside_rfc_3339_is_refused(offset: str) -> None:
    """Python's parser reads ``+00:60`` as an hour; RFC 3339's minutes end at 59, hours at 23."""
    with pytest.raises(EventDecodeError, match="time: must be an RFC 3339 timestamp"):
        decode_doc(valid_doc(time=f"2026-03-01T11:30:00{offset}"))


def test_encode_then_decode_gives_the_same_event() -> None:
    ev = usage_event("t1", "storage.gb", 0.125, {"bucket": "b-1"}, time=NOW)
    assert decode_event(encode_event(ev), now=NOW) == ev
    assert decode_event(encode_event(ev).decode(), now=NOW) == ev


def test_the_encoding_is_cloudevents_structured_json() -> None:
    ev = usage_event("t1", "api.calls", 2, time=NOW)
    doc = json.loads(encode_event(ev))
    assert doc == {
        "specversion": "1.0",
        "id": ev.id,
        "source": "urn:metering",
        "type": "metering.usage",
        "subject": "t1",
        "time": "2026-03-01T12:00:00Z",
        "data": {"meter": "api.calls", "quantity": 2.0, "dimensions": {}},
    }


def test_each_event_gets_its_own_id_once_at_creation() -> None:
    a, b = usage_event("t1", "m", 1), usage_event("t1", "m", 1)
    assert a.id != b.id
    assert decode_event(encode_event(a)).id == a.id  # a resend keeps the id


def test_decision_events_carry_the_decision_route_and_reason_and_rejected_is_not_billable() -> None:
    class Decision:
        allowed = False
        reason = "daily"
        cost = 4
        degraded = False

    ev = decision_event("t1", Decision(), route="/v1/search")
    assert ev.type == "metering.ratelimit"
    assert ev.data.meter == "requests"
    assert ev.data.quantity == 4.0
    assert ev.data.decision == "rejected"
    assert ev.data.dimensions == {"route": "/v1/search", "reason": "daily"}
    assert ev.billable is False
    assert decision_event("t1", True, cost=1).billable is True


def test_a_time_within_the_allowed_skew_is_accepted() -> None:
    ahead = (NOW + dt.timedelta(seconds=299)).isoformat()
    assert decode_doc(valid_doc(time=ahead), max_future_skew=300).time > NOW


# --- what is refused, and the message names the field -------------------------------------------
@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_bad_bytes_and_bad_json_are_refused(raw: bytes, fragment: str) -> None:
    with pytest.raises(EventDecodeError, match=fragment):
        decode_event(raw, now=NOW)


def test_a_non_bytes_input_is_refused() -> None:
    with pytest.raises(EventDecodeError, match="must be bytes or str"):
        decode_event(12345, now=NOW)  # type: ignore[arg-type]


def test_a_huge_payload_is_refused_before_parsing() -> None:
    raw = b'{"x": "' + b"a" * MAX_EVENT_BYTES + b'"}'
    with pytest.raises(EventDecodeError, match=f"at most {MAX_EVENT_BYTES} allowed"):
        decode_event(raw, now=NOW)


@pytest.mark.parametrize("field", ["id", "subject", "time", "data"])
def test_a_missing_required_field_is_named(field: str) -> None:
    doc = valid_doc()
    del doc[field]
    assert_refused(doc, field, "is required")


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"data_quantity": "3"}, "data.quantity", "valid number"),
        ({"data_quantity": True}, "data.quantity", "valid number"),
        ({"data_quantity": -1}, "data.quantity", "must be finite, >= 0"),
        ({"data_quantity": 1.7e308}, "data.quantity", "<= 1e+15"),
        ({"data_quantity": 1e15 + 1}, "data.quantity", "<= 1e+15"),
        ({"data_meter": 7}, "data.meter", "valid string"),
        ({"data_dimensions": ["a"]}, "data.dimensions", "an object"),
        ({"data_dimensions": {"k": 1}}, "data.dimensions.k", "valid string"),
        ({"subject": 42}, "subject", "valid string"),
        ({"time": 1700000000}, "time", ""),
        ({"time": "yesterday"}, "time", "RFC 3339"),
        ({"time": "2026-03-01T11:00:00"}, "time", "timezone"),
        ({"specversion": "0.3"}, "specversion", "'1.0'"),
        ({"type": "metering.other"}, "type", "metering.usage"),
        ({"id": ""}, "id", "printable ASCII"),
        ({"id": "has space"}, "id", "printable ASCII"),
        ({"id": "x" * 129}, "id", "printable ASCII"),
        ({"source": ""}, "source", "at least 1"),
        ({"datacontenttype": "text/xml"}, "datacontenttype", "application/json"),
        ({"Extension": "x"}, "Extension", "not a known field"),  # not an extension name
        ({"data_unit": "x"}, "data.unit", "not a known field"),
    ],
)
def test_a_wrong_type_or_value_is_named(change: dict[str, Any], field: str, fragment: str) -> None:
    assert_refused(valid_doc(**change), field, fragment)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_a_non_finite_quantity_is_refused(literal: bytes) -> None:
    raw = json.dumps(valid_doc(data_quantity=12345)).encode().replace(b"12345", literal)
    with pytest.raises(EventDecodeError, match=r"data\.quantity: must be finite, >= 0"):
        decode_event(raw, now=NOW)


@pytest.mark.parametrize("tenant", ["", "-leading-dash", "has space", "a{b}", "x" * 65, "ünï"])
def test_an_invalid_tenant_id_is_refused(tenant: str) -> None:
    assert_refused(valid_doc(subject=tenant), "subject", "tenant id")


@pytest.mark.parametrize("meter", ["", "bad meter", "m" * 65])
def test_an_invalid_meter_name_is_refused(meter: str) -> None:
    assert_refused(valid_doc(data_meter=meter), "data.meter", "meter name")


def test_a_time_further_ahead_than_the_skew_is_refused() -> None:
    ahead = (NOW + dt.timedelta(seconds=301)).isoformat()
    with pytest.raises(EventDecodeError, match=r"^time: is 301s in the future \(at most 300s"):
        decode_doc(valid_doc(time=ahead), max_future_skew=300)


def test_the_skew_follows_the_injected_clock() -> None:
    doc = valid_doc(time="2030-01-01T00:00:00Z")
    later = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert decode_event(json.dumps(doc), now=later, max_future_skew=0).tenant == "acme-corp"


def test_too_many_dimensions_are_refused() -> None:
    dims = {f"k{i}": "v" for i in range(MAX_DIMENSIONS + 1)}
    assert_refused(valid_doc(data_dimensions=dims), "data.dimensions", f"at most {MAX_DIMENSIONS}")


def test_a_dimension_value_too_long_is_refused() -> None:
    dims = {"route": "x" * (MAX_DIMENSION_VALUE + 1)}
    assert_refused(valid_doc(data_dimensions=dims), "data.dimensions", "'route'")


@pytest.mark.parametrize("key", ["", "has space", "-dash", "k" * 65])
def test_a_bad_dimension_key_is_refused(key: str) -> None:
    assert_refused(valid_doc(data_dimensions={key: "v"}), "data.dimensions", "key")


def test_a_usage_event_with_a_decision_and_a_decision_event_without_one_are_refused() -> None:
    assert_refused(valid_doc(data_decision="allowed"), "data.decision", "only allowed")
    assert_refused(valid_doc(type="metering.ratelimit"), "data.decision", "required")
    assert_refused(
        valid_doc(type="metering.ratelimit", data_decision="maybe"), "data.decision", "allowed"
    )


def test_every_problem_is_reported_not_just_the_first() -> None:
    with pytest.raises(EventDecodeError) as info:
        decode_doc(valid_doc(subject="", data_quantity=-2))
    assert "subject:" in str(info.value)
    assert "data.quantity:" in str(info.value)


def test_the_helpers_refuse_bad_values_with_the_same_error_type() -> None:
    with pytest.raises(EventDecodeError, match="subject:"):
        usage_event("bad tenant", "m", 1)
    with pytest.raises(EventDecodeError, match=r"data\.quantity:"):
        usage_event("t1", "m", float("nan"))
    with pytest.raises(EventDecodeError, match="time:"):
        usage_event("t1", "m", 1, time=dt.datetime(2026, 1, 1))  # naive


def test_events_are_immutable() -> None:
    ev = usage_event("t1", "m", 1)
    with pytest.raises(ValueError, match="frozen"):
        ev.subject = "t2"  # type: ignore[misc]


def test_a_limiter_decision_made_without_redis_is_marked_degraded() -> None:
    from limiter import Decision

    decision = Decision(
        allowed=True,
        limit=10,
        remaining=9,
        retry_after=0.0,
        daily_limit=100,
        daily_used=1,
        daily_remaining=99,
        reset_at=NOW,
        reason="redis_down",
        tenant="t1",
        cost=1,
        day=NOW.date(),
        degraded=True,
    )
    ev = decision_event("t1", decision, route="/v1/items")
    assert ev.data.decision == "allowed"
    assert ev.data.quantity == 1.0
    assert ev.data.dimensions == {"route": "/v1/items", "reason": "redis_down", "degraded": "true"}


def test_the_helpers_refuse_a_time_beyond_the_future_skew_too() -> None:
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    with pytest.raises(EventDecodeError, match="time: is 86400s in the future"):
        usage_event("t1", "m", 1, time=ahead)


def test_the_largest_quantity_is_accepted() -> None:
    assert decode_event(json.dumps(valid_doc(data_quantity=1e15)).encode(), now=NOW)

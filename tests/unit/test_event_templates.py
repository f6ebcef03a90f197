"""EventTemplates: a spliced event is byte for byte what msgspec writes for the same event."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.events import MAX_DIMENSION_VALUE, MAX_DIMENSIONS, decode_event
from metering.events_fast import (
    _ID_SLOT,
    EventTemplates,
    FastUsageData,
    WireEvent,
    decode_event_fast,
    encode_wire,
)

IDENT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)
DIM_KEY = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}", fullmatch=True)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def at(ns: int) -> dt.datetime:
    """The datetime of ``ns`` nanoseconds since the epoch, to the microsecond (floored)."""
    return EPOCH + dt.timedelta(microseconds=ns // 1000)


@st.composite
def events(draw: st.DrawFn) -> WireEvent:
    decision = draw(st.sampled_from(["allowed", "rejected"]))
    data = FastUsageData(
        draw(IDENT),
        draw(st.floats(min_value=0, max_value=1e12, allow_nan=False)),
        draw(
            st.dictionaries(DIM_KEY, st.text(max_size=MAX_DIMENSION_VALUE), max_size=MAX_DIMENSIONS)
        ),
        decision,
    )
    return WireEvent(
        "1.0",
        "placeholder",
        draw(st.text(min_size=1, max_size=256)),  # any text: quotes, controls, non-ASCII
        "metering.ratelimit",
        draw(IDENT),
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        data,
    )


# 2000-01-01 .. 2100-01-01, with a fraction of a second that is not zero at the microsecond
TIMES_NS = st.integers(946_684_800 * 10**9, 4_102_444_800 * 10**9).filter(
    lambda ns: ns // 1000 % 10**6 != 0
)


@settings(max_examples=300, deadline=None)
@given(event=events(), time_ns=TIMES_NS, event_id=st.uuids(version=4).map(str))
def test_a_spliced_event_is_msgspecs_encoding_byte_for_byte(
    event: WireEvent, time_ns: int, event_id: str
) -> None:
    templates = EventTemplates()
    parts = templates.learn("k", event)
    assert parts is not None or b"2000-01-01T00:00:00.000001Z" in encode_wire(event)
    if parts is None:
        return
    spliced = templates.splice(parts, event_id, time_ns)
    expected = encode_wire(
        WireEvent(
            event.specversion,
            event_id,
            event.source,
            event.type,
            event.subject,
            at(time_ns),
            event.data,
        )
    )
    assert spliced == expected
    assert templates.get("k") is parts


@settings(max_examples=100, deadline=None)
@given(event=events(), second=st.integers(946_684_800, 4_102_444_799))
def test_a_whole_second_reads_back_as_the_same_time(event: WireEvent, second: int) -> None:
    """msgspec leaves out a zero fraction; the splice writes .000000: the same instant."""
    templates = EventTemplates()
    parts = templates.learn("k", event)
    if parts is None:
        return
    raw = templates.splice(parts, str(uuid.uuid4()), second * 10**9)
    assert raw.count(b".000000Z") >= 1
    decoded = decode_event_fast(raw, max_future_skew=10**10)
    assert decoded.time == EPOCH + dt.timedelta(seconds=second)


def small(subject: str = "acme", source: str = "urn:t") -> WireEvent:
    data = FastUsageData("m", 1.0, {}, "allowed")
    return WireEvent("1.0", "x", source, "metering.ratelimit", subject, EPOCH, data)


def test_the_second_changes_in_the_time_it_writes() -> None:
    templates = EventTemplates()
    parts = templates.learn("k", small())
    assert parts is not None
    base = 1_764_000_000 * 10**9
    for offset_ns in (999_999_999, 1_000_000_000, 1_000_000_001, 61 * 10**9 + 5000):
        raw = templates.splice(parts, "id-1", base + offset_ns)
        assert decode_event(raw, max_future_skew=10**10).time == at(base + offset_ns)


def test_a_placeholder_in_the_events_own_fields_never_misplaces_a_splice() -> None:
    """A source holding the time placeholder's text comes before the time field and would move
    the split: such an event is not kept (the caller encodes it whole). The id placeholder's
    text after the id field is harmless: the split is at the first one."""
    templates = EventTemplates()
    assert templates.learn("t", small(source="2000-01-01T00:00:00.000001Z")) is None
    assert templates.get("t") is None
    event = small(source=f"a{_ID_SLOT}b")
    parts = templates.learn("i", event)
    assert parts is not None
    ns = 1_764_000_000_000_001_000
    expected = encode_wire(
        WireEvent("1.0", "id-2", event.source, event.type, "acme", at(ns), event.data)
    )
    assert templates.splice(parts, "id-2", ns) == expected


def test_the_templates_are_bounded() -> None:
    templates = EventTemplates(max_entries=3)
    for i in range(7):
        assert templates.learn(i, small(subject=f"t{i}")) is not None
        assert len(templates._parts) <= 3
    with pytest.raises(ValueError, match="max_entries"):
        EventTemplates(max_entries=0)

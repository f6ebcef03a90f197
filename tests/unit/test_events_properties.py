"""Properties of the decoder, over generated input (hypothesis).

1. Every valid event survives encode -> decode unchanged (same meaning, same id).
2. No input, however malformed, makes the decoder fail with anything but EventDecodeError.
3. A decoded event always satisfies the model's invariants.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from metering.events import (
    MAX_DIMENSION_VALUE,
    MAX_DIMENSIONS,
    MAX_EVENT_BYTES,
    MAX_QUANTITY,
    EventDecodeError,
    UsageEvent,
    decode_event,
    encode_event,
)
from metering.ids import is_valid_tenant_id

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
IDENT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)
DIM_KEY = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}", fullmatch=True)

valid_events = st.builds(
    lambda eid, src, tenant, when, meter, qty, dims, decision: UsageEvent(
        id=eid,
        source=src,
        type="metering.ratelimit" if decision else "metering.usage",
        subject=tenant,
        time=when,
        data={"meter": meter, "quantity": qty, "dimensions": dims, "decision": decision},
    ),
    eid=st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True),
    src=st.text(min_size=1, max_size=256),
    tenant=IDENT,
    when=st.datetimes(
        min_value=dt.datetime(2000, 1, 1),
        max_value=dt.datetime(2026, 3, 1, 12, 5),
        timezones=st.just(dt.UTC),
    ),
    meter=IDENT,
    qty=st.floats(min_value=0, max_value=MAX_QUANTITY),
    dims=st.dictionaries(DIM_KEY, st.text(max_size=MAX_DIMENSION_VALUE), max_size=MAX_DIMENSIONS),
    decision=st.sampled_from([None, "allowed", "rejected"]),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def assert_invariants(ev: UsageEvent) -> None:
    assert is_valid_tenant_id(ev.subject)
    assert math.isfinite(ev.data.quantity) and 0 <= ev.data.quantity <= MAX_QUANTITY
    assert len(ev.data.dimensions) <= MAX_DIMENSIONS
    assert ev.time.utcoffset() == dt.timedelta(0)
    assert ev.time <= NOW + dt.timedelta(seconds=300)
    assert (ev.data.decision is None) == (ev.type == "metering.usage")
    assert len(encode_event(ev)) <= MAX_EVENT_BYTES


@settings(max_examples=300)
@given(valid_events)
def test_every_valid_event_round_trips_unchanged(ev: UsageEvent) -> None:
    again = decode_event(encode_event(ev), now=NOW, max_future_skew=300)
    assert again == ev
    assert encode_event(again) == encode_event(ev)


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_either_decode_validly_or_raise_the_one_error(raw: bytes) -> None:
    try:
        ev = decode_event(raw, now=NOW, max_future_skew=300)
    except EventDecodeError as exc:
        assert str(exc)
    else:
        assert_invariants(ev)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_either_decodes_validly_or_raises_a_message_naming_a_field(
    value: Any,
) -> None:
    try:
        ev = decode_event(json.dumps(value), now=NOW, max_future_skew=300)
    except EventDecodeError as exc:
        assert ":" in str(exc)  # "<field>: <what is wrong>"
    else:
        assert_invariants(ev)


FIELDS = ["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"]
DATA_FIELDS = ["meter", "quantity", "dimensions", "decision"]


@settings(max_examples=400)
@given(
    valid_events,
    st.sampled_from([*FIELDS, *(f"data.{f}" for f in DATA_FIELDS)]),
    json_values,
)
def test_a_valid_event_with_one_field_replaced_still_decodes_validly_or_names_that_field(
    ev: UsageEvent, field: str, replacement: Any
) -> None:
    doc = json.loads(encode_event(ev))
    if field.startswith("data."):
        doc["data"][field.removeprefix("data.")] = replacement
    else:
        doc[field] = replacement
    try:
        again = decode_event(json.dumps(doc), now=NOW, max_future_skew=300)
    except EventDecodeError as exc:
        named = {part.split(":", 1)[0].split(".")[0] for part in str(exc).split("; ")}
        top = field.split(".")[0]
        # the replaced field is blamed; a type/decision mismatch may blame data.decision too
        assert top in named or (field == "type" and "data" in named), str(exc)
    else:
        assert_invariants(again)

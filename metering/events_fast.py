"""The sink's hot-path event decoder: msgspec, with :func:`metering.events.decode_event` as judge.

:func:`decode_event_fast` accepts exactly what :func:`~metering.events.decode_event` accepts,
with the same values, at a fraction of the cost (one msgspec parse into typed Structs, then the
few rules msgspec cannot state, checked in Python with the very same compiled patterns, the
same timestamp parser, and string methods for the event id's character set). Whenever the fast
path has any doubt (a msgspec error, a failed rule, input that is not ``bytes``), it hands the
input to ``decode_event``: a refusal therefore carries exactly the reference
:class:`~metering.events.EventDecodeError` naming the field, and the fast path can only ever
refuse less than the reference (never more). The one-way property that matters, "accepted fast
=> accepted by the reference, same values", is what
``tests/unit/test_events_fast.py`` checks over generated valid, mutated and garbage input.

Rules mirrored (see :mod:`metering.events`): required ``id``, ``subject``, ``time``, ``data``
(``meter``, ``quantity``); defaults ``specversion`` "1.0", ``source`` ``urn:metering``, ``type``
``metering.usage``; unknown fields refused in ``data``; at the top level, ``dataschema`` and
extension attributes checked by the reference's own rules and dropped; strict JSON types (no
bool as a number, no number as a string); id, tenant and meter patterns; source 1-256
characters; quantity finite, >= 0 and at most ``MAX_QUANTITY``; at most 16 dimensions, key
pattern, values of at most 256 characters; decision present iff type is
``metering.ratelimit``; time RFC 3339 with an offset, held in UTC, at most ``max_future_skew``
s ahead of ``now``; at most :data:`MAX_EVENT_BYTES` encoded bytes.

An event without extension attributes costs one strict msgspec parse, as it did before they
were accepted. One with them (the strict parse refuses an unknown top-level field) is parsed
twice more, leniently and as a plain object whose extra attributes get the reference's own
checks: still msgspec, and cheaper than falling back to the reference.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Hashable
from math import copysign
from typing import Any, Literal

import msgspec

from metering.events import (
    _DIMENSION_KEY_RE,  # the same compiled patterns as the reference, so the rules cannot drift
    DEFAULT_SOURCE,
    MAX_DIMENSION_VALUE,
    MAX_DIMENSIONS,
    MAX_EVENT_BYTES,
    MAX_ID_LENGTH,
    MAX_QUANTITY,
    MAX_SOURCE_LENGTH,
    TYPE_USAGE,
    UsageEvent,
    _attribute_problems,
    _default_skew,
    decode_event,
    parse_rfc3339,
)
from metering.ids import _METER_RE, _TENANT_RE

_UTC = dt.UTC


class FastUsageData(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """``data`` of a usage event, as decoded by msgspec (the same fields as ``UsageData``)."""

    meter: str
    quantity: float
    dimensions: dict[str, str] = {}
    decision: Literal["allowed", "rejected"] | None = None


class _WireEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The event as it is on the wire: ``time`` still the RFC 3339 text."""

    id: str
    subject: str
    time: str
    data: FastUsageData
    specversion: Literal["1.0"] = "1.0"
    source: str = DEFAULT_SOURCE
    type: Literal["metering.usage", "metering.ratelimit"] = TYPE_USAGE
    datacontenttype: Literal["application/json"] | None = None


class _ExtendedWireEvent(_WireEvent, forbid_unknown_fields=False, gc=False):
    """:class:`_WireEvent` ignoring unknown top-level fields (``data`` still refuses them), for
    an event with extension attributes: :func:`_attribute_problems` judges those."""


class WireEvent(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """A usage event as it goes on the wire (compact structured-mode CloudEvents JSON, what
    :func:`metering.events.encode_event` writes), for a producer that builds events from parts
    it has already validated: :func:`encode_wire` costs ~1 us where a pydantic model and its
    ``model_dump_json`` cost ~14 us. ``time`` must be aware; the decoder reads it back."""

    specversion: str
    id: str
    source: str
    type: str
    subject: str
    time: dt.datetime
    data: FastUsageData
    datacontenttype: str | None = None


class FastUsageEvent(WireEvent, frozen=True, gc=False):
    """A decoded, valid usage event with ``UsageEvent``'s read interface; ``time`` in UTC."""

    @property
    def tenant(self) -> str:
        return self.subject

    @property
    def billable(self) -> bool:
        """False iff this is a rejected limiter decision (rejections are never billed)."""
        return self.data.decision != "rejected"

    @classmethod
    def from_model(cls, ev: UsageEvent) -> FastUsageEvent:
        d = ev.data
        return cls(
            ev.specversion,
            ev.id,
            ev.source,
            ev.type,
            ev.subject,
            ev.time,
            FastUsageData(d.meter, d.quantity, dict(d.dimensions), d.decision),
            ev.datacontenttype,
        )


_decoder = msgspec.json.Decoder(_WireEvent)
_extended_decoder = msgspec.json.Decoder(_ExtendedWireEvent)
_object_decoder = msgspec.json.Decoder(dict[str, Any])
_UNKNOWN_TOP_LEVEL = "Object contains unknown field"  # msgspec's words; " - at `$...`" if nested


encode_wire = msgspec.json.Encoder().encode

# The placeholders an event is encoded with once, to find where its id and time go. Both are
# printable ASCII that JSON writes as is.
_ID_SLOT = "~~event-id~~"
_TIME_SLOT = dt.datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=_UTC)
_TIME_SLOT_TEXT = b"2000-01-01T00:00:00.000001"  # then "Z"
_SAMPLE_ID = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
# A time with a non-zero fraction, in nanoseconds and as a datetime:
_SAMPLE_NS = 1_764_000_000_123_456_789
_SAMPLE_TIME = dt.datetime.fromtimestamp(_SAMPLE_NS // 10**9, _UTC).replace(
    microsecond=_SAMPLE_NS // 1000 % 10**6
)

#: ``(head, middle, tail)``: an encoded event is ``head + id + middle + time + tail``
EventParts = tuple[bytes, bytes, bytes]


class EventTemplates:
    """Encoded events, byte for byte what ``encode_wire(event)`` writes, for a request path
    that sends many events differing only in their id and time (the limiter middleware's
    decision events: one per request, with the same tenant, meter, cost, route, reason and
    outcome as many before).

    :meth:`learn` encodes an event once with msgspec, with placeholders for the id and the time,
    and keeps the JSON around them (at most ``max_entries`` keys; the caller's key names what
    the event is made of besides its id and time). :meth:`splice` puts an id and a time in,
    cheaper than building the structs and encoding them (on a served request 15-16 us of CPU
    instead of 19-20 for the whole event, its id included). The id must be printable ASCII
    without ``"`` or ``\\`` (JSON writes it as is); the time is written as RFC 3339 UTC with
    microseconds (``2026-11-28T21:00:00.123456Z``: msgspec leaves the fraction out when it is
    zero; the value read back is the same). :meth:`learn` checks a splice against msgspec's own
    encoding before it keeps anything, so a template that would differ is never used.
    """

    def __init__(self, max_entries: int = 16_384) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._parts: dict[Hashable, EventParts] = {}
        self._stamp: tuple[int, bytes] = (-1, b"")  # (second, its text): replaced whole

    def get(self, key: Hashable) -> EventParts | None:
        return self._parts.get(key)

    def learn(self, key: Hashable, event: WireEvent) -> EventParts | None:
        """The parts of ``event`` around its id and time, kept under ``key``; ``None`` (nothing
        kept) if splicing would not give msgspec's bytes for this event."""
        raw = encode_wire(msgspec.structs.replace(event, id=_ID_SLOT, time=_TIME_SLOT))
        head, sep, rest = raw.partition(_ID_SLOT.encode())
        middle, sep2, tail = rest.partition(_TIME_SLOT_TEXT + b"Z")
        if not sep or not sep2:
            return None
        parts = (head, middle, tail)
        expected = encode_wire(msgspec.structs.replace(event, id=_SAMPLE_ID, time=_SAMPLE_TIME))
        if self.splice(parts, _SAMPLE_ID, _SAMPLE_NS) != expected:
            return None
        if len(self._parts) >= self.max_entries:
            self._parts.clear()
        self._parts[key] = parts
        return parts

    def splice(self, parts: EventParts, event_id: str, time_ns: int) -> bytes:
        """The event of ``parts`` with this id and time (nanoseconds since the epoch, UTC)."""
        second, ns = divmod(time_ns, 1_000_000_000)
        stamp = self._stamp
        if stamp[0] != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)).encode()
            stamp = self._stamp = (second, text)
        head, middle, tail = parts
        return b"".join((head, event_id.encode(), middle, stamp[1], b"%06dZ" % (ns // 1000), tail))


#: Identifiers already found valid (tenants, meters, dimension keys recur in every batch): a set
#: lookup instead of a regex match. Bounded: cleared when it reaches _KNOWN_MAX entries.
_KNOWN_MAX = 100_000
_known_tenants: set[str] = set()
_known_meters: set[str] = set()
_known_keys: set[str] = set()


def _known(value: str, known: set[str], pattern: re.Pattern[str]) -> bool:
    if value in known:
        return True
    if pattern.fullmatch(value) is None:
        return False
    if len(known) >= _KNOWN_MAX:
        known.clear()
    known.add(value)
    return True


def _valid_dimensions(dims: dict[str, str]) -> bool:
    if len(dims) > MAX_DIMENSIONS:
        return False
    for key, value in dims.items():
        if len(value) > MAX_DIMENSION_VALUE or not (
            key in _known_keys or _known(key, _known_keys, _DIMENSION_KEY_RE)
        ):
            return False
    return True


def _fast(raw: bytes, limit: dt.datetime) -> FastUsageEvent | None:
    """The event if every rule holds, else None (the caller then asks the reference)."""
    try:
        w = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        if not _extended(exc):
            return None
        try:
            w = _extended_decoder.decode(raw)
            if _attribute_problems(_object_decoder.decode(raw)):
                return None
        except (msgspec.MsgspecError, UnicodeDecodeError, ValueError, RecursionError):
            return None
    except (msgspec.MsgspecError, UnicodeDecodeError, ValueError):
        return None
    d = w.data
    q = d.quantity
    subject, meter = w.subject, d.meter
    event_id = w.id
    if not (
        # events._ID_RE ([\x21-\x7e]{1,128}) by string methods, a third of the regex's cost:
        # ASCII and printable is \x20-\x7e; without the space, \x21-\x7e
        0 < len(event_id) <= MAX_ID_LENGTH
        and event_id.isascii()
        and event_id.isprintable()
        and " " not in event_id
        and (subject in _known_tenants or _known(subject, _known_tenants, _TENANT_RE))
        and (meter in _known_meters or _known(meter, _known_meters, _METER_RE))
        and 0 < len(w.source) <= MAX_SOURCE_LENGTH
        and 0 <= q <= MAX_QUANTITY  # finite, >= 0, bounded (NaN fails both comparisons)
        and (q or copysign(1.0, q) > 0)  # -0.0: the reference decoder makes it 0.0
        and (d.decision is None) == (w.type == TYPE_USAGE)
        and (not d.dimensions or _valid_dimensions(d.dimensions))
    ):
        return None
    parsed = parse_rfc3339(w.time)
    if parsed is None or parsed.utcoffset() is None:
        return None
    try:
        t = parsed.astimezone(_UTC)
    except OverflowError:
        return None
    if t > limit:
        return None
    return FastUsageEvent(
        w.specversion, event_id, w.source, w.type, subject, t, d, w.datacontenttype
    )


def _extended(exc: msgspec.ValidationError) -> bool:
    """Whether the strict parse refused only for an unknown top-level field (an extension
    attribute, maybe): msgspec names the first error only, so others show in the next parse."""
    text = str(exc)
    return text.startswith(_UNKNOWN_TOP_LEVEL) and " - at `" not in text


def future_limit(now: dt.datetime | None, max_future_skew: float | None) -> dt.datetime:
    """The latest event time accepted at ``now`` (aware) with ``max_future_skew`` seconds."""
    skew = _default_skew() if max_future_skew is None else max_future_skew
    at = dt.datetime.now(_UTC) if now is None else now.astimezone(_UTC)
    return at + dt.timedelta(seconds=skew)


def batch_decoder(
    now: dt.datetime, max_future_skew: float | None
) -> Callable[[bytes | bytearray | memoryview | str], FastUsageEvent]:
    """:func:`decode_event_fast` for a batch decoded at one ``now``: the checks of ``now`` and
    the future limit are made once here instead of once per event."""
    _check_now(now)
    limit = future_limit(now, max_future_skew)

    def decode(raw: bytes | bytearray | memoryview | str) -> FastUsageEvent:
        return _decode(raw, limit, now, max_future_skew)

    return decode


def decode_event_fast(
    raw: bytes | bytearray | memoryview | str,
    *,
    now: dt.datetime | None = None,
    max_future_skew: float | None = None,
    limit: dt.datetime | None = None,
) -> FastUsageEvent:
    """Decode like :func:`~metering.events.decode_event` (same acceptance, values and errors).

    ``limit`` (from :func:`future_limit`) may be passed instead of recomputing it from ``now``
    and ``max_future_skew``; it must come from the same two values.
    """
    _check_now(now)
    if limit is None:
        limit = future_limit(now, max_future_skew)
    return _decode(raw, limit, now, max_future_skew)


def _check_now(now: dt.datetime | None) -> None:
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be timezone-aware")


def _decode(
    raw: bytes | bytearray | memoryview | str,
    limit: dt.datetime,
    now: dt.datetime | None,
    max_future_skew: float | None,
) -> FastUsageEvent:
    """The fast path; the reference decides every doubtful input (it raises the error naming
    the field)."""
    if type(raw) is bytes and len(raw) <= MAX_EVENT_BYTES:
        ev = _fast(raw, limit)
        if ev is not None:
            return ev
    return FastUsageEvent.from_model(decode_event(raw, now=now, max_future_skew=max_future_skew))


__all__ = [
    "EventParts",
    "EventTemplates",
    "FastUsageData",
    "FastUsageEvent",
    "WireEvent",
    "batch_decoder",
    "decode_event_fast",
    "encode_wire",
    "future_limit",
]

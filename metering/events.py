"""The usage event: CloudEvents 1.0 structured JSON, validated at every boundary.

An event is what the pipeline counts. Its invariants, enforced here and nowhere else:

- ``subject`` is a valid tenant id and ``data.meter`` a valid meter name (:mod:`metering.ids`);
- ``data.quantity`` is finite, ``>= 0`` and at most :data:`MAX_QUANTITY` (1e15);
- ``data.dimensions`` is a flat map of at most :data:`MAX_DIMENSIONS` string pairs, keys of
  1-64 characters ``[A-Za-z0-9._:-]``, values of at most :data:`MAX_DIMENSION_VALUE` characters;
- ``type`` is ``metering.usage`` (``data.decision`` absent) or ``metering.ratelimit``
  (``data.decision`` is ``allowed`` or ``rejected``);
- ``time`` is timezone-aware, held and written in UTC (RFC 3339, ``Z``), and when decoded is at
  most ``max_future_skew`` seconds ahead of the decoder's clock;
- ``id`` is 1-128 printable ASCII characters, set once when the event is made: a resend carries
  the same id, which is how the pipeline recognises a duplicate;
- the encoded event is at most :data:`MAX_EVENT_BYTES` bytes;
- unknown fields inside ``data`` are refused; at the top level, the optional CloudEvents
  attribute ``dataschema`` (a URI reference of at most :data:`MAX_DATASCHEMA_LENGTH`
  characters) and extension attributes (names of 1-20 lower-case ASCII letters and digits,
  values a string of at most :data:`MAX_EXTENSION_VALUE` characters, an integer in the
  32-bit signed range, or a boolean: e.g. ``traceparent``) are validated and then dropped:
  nothing stores them (there is no column), and an event is encoded without them.

Everything that fails raises :class:`EventDecodeError`, whose message names the field
(``data.quantity: must be finite, >= 0 and <= 1e+15``). Tests: ``tests/unit/test_events*.py``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time as _time
import uuid
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from limiter.clock import time_in_day_ns, utc_from_ns
from metering.ids import InvalidIdentifier, validate_meter, validate_tenant_id
from metering.settings import get_settings

SPECVERSION: Final = "1.0"
TYPE_USAGE: Final = "metering.usage"
TYPE_RATELIMIT: Final = "metering.ratelimit"
DEFAULT_SOURCE = "urn:metering"
DEFAULT_DECISION_METER = "requests"

MAX_EVENT_BYTES = 32 * 1024
MAX_DIMENSIONS = 16
MAX_DIMENSION_VALUE = 256
MAX_ID_LENGTH = 128
MAX_SOURCE_LENGTH = 256
#: The largest quantity one event may carry. Far above any real unit count (a petabyte in bytes
#: is 1e15), and low enough that no number of events can sum to infinity in ClickHouse's Float64
#: rollups, the quota DB's totals or a JSON answer (an event at 1.7e308 could, and stalled them).
MAX_QUANTITY = 1e15
DEFAULT_MAX_FUTURE_SKEW = 300.0
MAX_DATASCHEMA_LENGTH = 2048
#: The longest string value of an extension attribute (a W3C ``tracestate`` may be 512+).
MAX_EXTENSION_VALUE = 2048
_EXTENSION_INT_MIN, _EXTENSION_INT_MAX = -(2**31), 2**31 - 1  # CloudEvents' Integer
_MAX_PROBLEMS_SHOWN = 10

_DIMENSION_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}")
_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_LENGTH}}}")
_EXTENSION_NAME_RE = re.compile(r"[a-z0-9]{1,20}", re.ASCII)
#: RFC 3986 URI-reference, checked by character set: a scheme (letter first) or, for a relative
#: reference, no ``:`` in the first segment; ``%`` only as ``%HH``; ``#`` at most once.
_URI_REFERENCE_RE = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.-]*:|(?![^/?#]*:))"
    r"(?:[A-Za-z0-9._~:/?@!$&'()*+,;=\[\]-]|%[0-9A-Fa-f]{2})*"
    r"(?:#(?:[A-Za-z0-9._~:/?@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)?",
    re.ASCII,
)
#: An RFC 3339 date and time up to the seconds, and its offset (hours 00-23, minutes 00-59:
#: Python's parser alone reads ``+00:60`` as an hour): the query parameters use them too.
RFC3339_SECONDS = r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}"
RFC3339_OFFSET = r"(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_RFC3339_RE = re.compile(rf"{RFC3339_SECONDS}(\.\d{{1,9}})?{RFC3339_OFFSET}", re.ASCII)

EventType = Literal["metering.usage", "metering.ratelimit"]
DecisionOutcome = Literal["allowed", "rejected"]


class EventDecodeError(ValueError):
    """An event is malformed or invalid; the message names the field and what is wrong."""


def seconds_past(seconds: float, bound: float) -> str:
    """``seconds`` (more than ``bound``) as text that reads as more than ``bound``: whole
    seconds, unless they round to the bound or below (300.001 is not "300s" when 300 s is the
    most allowed), then milliseconds rounded up."""
    text = f"{seconds:.0f}"
    if float(text) > bound:
        return text
    text = f"{math.ceil(seconds * 1000) / 1000:.3f}"
    return text if float(text) > bound else repr(seconds)


def _attribute_problems(attributes: dict[str, Any]) -> list[str]:
    """What is wrong with the top-level attributes of an event (``attributes``: its JSON
    object) that are not fields of :class:`UsageEvent`: ``dataschema`` and extension
    attributes. Both decoders use it, so they cannot disagree on an attribute."""
    problems = []
    for name, value in attributes.items():
        if name in _FIELDS:
            continue
        if name == "dataschema":
            if not (
                isinstance(value, str)
                and 0 < len(value) <= MAX_DATASCHEMA_LENGTH
                and _URI_REFERENCE_RE.fullmatch(value)
            ):
                problems.append(
                    f"dataschema: must be a URI reference (RFC 3986) of 1-"
                    f"{MAX_DATASCHEMA_LENGTH} characters"
                )
            continue
        shown = name if len(name) <= 40 else name[:37] + "..."
        if name.lower() in _ATTRIBUTES:
            problems.append(
                f"{shown}: is not a known field (attribute names are lower case: {name.lower()!r})"
            )
        elif not _EXTENSION_NAME_RE.fullmatch(name):
            problems.append(
                f"{shown}: is not a known field, nor an extension attribute name "
                "(1-20 lower-case ASCII letters and digits)"
            )
        elif type(value) is str:
            if len(value) > MAX_EXTENSION_VALUE:
                problems.append(
                    f"{name}: is {len(value)} characters, at most {MAX_EXTENSION_VALUE} allowed "
                    "for an extension attribute"
                )
        elif type(value) is int:
            if not _EXTENSION_INT_MIN <= value <= _EXTENSION_INT_MAX:
                problems.append(
                    f"{name}: an extension attribute's integer must be within "
                    f"{_EXTENSION_INT_MIN} and {_EXTENSION_INT_MAX}"
                )
        elif type(value) is not bool:
            problems.append(
                f"{name}: an extension attribute must be a string, an integer or a boolean, "
                f"not {_json_kind(value)}"
            )
    return problems


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, float):
        return "a number with a fraction or an exponent"
    return type(value).__name__


def _schema_attributes(schema: dict[str, Any]) -> None:
    """The accepted attributes the model has no field for, in its JSON schema."""
    schema["properties"]["dataschema"] = {
        "type": "string",
        "format": "uri-reference",
        "minLength": 1,
        "maxLength": MAX_DATASCHEMA_LENGTH,
        "description": "CloudEvents dataschema: accepted, not stored",
    }
    # Not the names of fields: a property matching both would have to meet both schemas.
    known = "|".join(sorted({*schema["properties"], "dataschema"}))
    schema["patternProperties"] = {
        f"^(?!(?:{known})$)[a-z0-9]{{1,20}}$": {
            "anyOf": [
                {"type": "string", "maxLength": MAX_EXTENSION_VALUE},
                {"type": "integer", "minimum": _EXTENSION_INT_MIN, "maximum": _EXTENSION_INT_MAX},
                {"type": "boolean"},
            ],
            "description": "a CloudEvents extension attribute (e.g. traceparent): accepted, "
            "not stored",
        }
    }


def parse_rfc3339(text: str) -> dt.datetime | None:
    """``text`` as an aware datetime if it is an RFC 3339 timestamp with an offset, else None.

    The one parser of event times: :func:`decode_event` and the sink's fast decoder
    (:mod:`metering.events_fast`) both use it, so they cannot disagree on a timestamp.
    """
    if _RFC3339_RE.fullmatch(text):
        try:
            return dt.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1] in "Zz" else text)
        except ValueError:
            return None
    return None


def _check_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError(f"must be 1-{MAX_ID_LENGTH} printable ASCII characters without spaces")
    return value


def _check_tenant(value: str) -> str:
    try:
        return validate_tenant_id(value)
    except InvalidIdentifier as exc:
        raise ValueError(str(exc)) from None


def _check_meter(value: str) -> str:
    try:
        return validate_meter(value)
    except InvalidIdentifier as exc:
        raise ValueError(str(exc)) from None


class UsageData(BaseModel):
    """The ``data`` of a usage event: what was used, how much, and along which dimensions."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    meter: Annotated[str, AfterValidator(_check_meter)]
    quantity: float
    dimensions: dict[str, str] = Field(default_factory=dict)
    decision: DecisionOutcome | None = None

    @field_validator("quantity")
    @classmethod
    def _finite_non_negative(cls, v: float) -> float:
        if not 0 <= v <= MAX_QUANTITY:  # NaN fails too
            raise ValueError(f"must be finite, >= 0 and <= {MAX_QUANTITY:g}")
        return float(v) + 0.0  # -0.0 becomes 0.0: UNIQUE_COUNT would count them apart

    @field_validator("dimensions")
    @classmethod
    def _bounded_dimensions(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_DIMENSIONS:
            raise ValueError(f"at most {MAX_DIMENSIONS} dimensions, got {len(v)}")
        for key, value in v.items():
            if not _DIMENSION_KEY_RE.fullmatch(key):
                shown = key if len(key) <= 40 else key[:37] + "..."
                raise ValueError(
                    f"key {shown!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -, "
                    "starting with a letter, digit or _"
                )
            if len(value) > MAX_DIMENSION_VALUE:
                raise ValueError(
                    f"value of {key!r} is {len(value)} characters, at most "
                    f"{MAX_DIMENSION_VALUE} allowed"
                )
        return v


class UsageEvent(BaseModel):
    """A CloudEvents 1.0 usage event; ``subject`` is the tenant. Immutable once made.

    ``dataschema`` and extension attributes (``traceparent``, ``tracestate``, ...) are accepted
    at the top level, checked, and not kept: nothing downstream stores them (there is no column
    for them), so the model has no field for them and :func:`encode_event` does not write them.
    Its JSON schema (the API's OpenAPI document) describes them all the same.
    """

    model_config = ConfigDict(
        strict=True, frozen=True, extra="forbid", json_schema_extra=_schema_attributes
    )

    specversion: Literal["1.0"] = SPECVERSION
    id: Annotated[str, AfterValidator(_check_id)]
    source: str = Field(DEFAULT_SOURCE, min_length=1, max_length=MAX_SOURCE_LENGTH)
    type: EventType = TYPE_USAGE
    subject: Annotated[str, AfterValidator(_check_tenant)]
    time: dt.datetime
    datacontenttype: Literal["application/json"] | None = None
    data: UsageData

    @model_validator(mode="before")
    @classmethod
    def _drop_extension_attributes(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.keys() <= _FIELDS:
            return data
        problems = _attribute_problems(data)
        if len(problems) > _MAX_PROBLEMS_SHOWN:  # 32 KiB of bad attributes: a bounded message
            more = len(problems) - _MAX_PROBLEMS_SHOWN
            problems[_MAX_PROBLEMS_SHOWN:] = [f"event: and {more} more bad attributes"]
        if problems:
            raise ValueError("; ".join(problems))
        return {k: v for k, v in data.items() if k in _FIELDS}

    @field_validator("time", mode="before")
    @classmethod
    def _parse_time(cls, v: Any) -> Any:
        # Strict mode accepts RFC 3339 strings from JSON but not from Python; accept both.
        if isinstance(v, str):
            parsed = parse_rfc3339(v)
            if parsed is None:
                raise ValueError("must be an RFC 3339 timestamp with a timezone")
            return parsed
        return v

    @field_validator("time")
    @classmethod
    def _utc_not_in_future(cls, v: dt.datetime, info: ValidationInfo) -> dt.datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("must carry a timezone (RFC 3339, e.g. 2026-01-01T00:00:00Z)")
        try:
            v = v.astimezone(dt.UTC)  # held in UTC, so pydantic writes RFC 3339 with "Z"
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: before year 1 in UTC
            raise ValueError("is outside the years 1-9999 once converted to UTC") from None
        ctx = info.context or {}
        skew = ctx.get("max_future_skew")
        if skew is not None:
            now = ctx.get("now") or dt.datetime.now(dt.UTC)
            if v > now + dt.timedelta(seconds=skew):
                ahead = seconds_past((v - now).total_seconds(), skew)
                raise ValueError(f"is {ahead}s in the future (at most {skew:g}s allowed)")
        return v

    @model_validator(mode="after")
    def _decision_matches_type(self) -> UsageEvent:
        if self.type == TYPE_RATELIMIT and self.data.decision is None:
            raise ValueError("data.decision: required for type metering.ratelimit")
        if self.type == TYPE_USAGE and self.data.decision is not None:
            raise ValueError("data.decision: only allowed for type metering.ratelimit")
        return self

    @property
    def tenant(self) -> str:
        return self.subject

    @property
    def billable(self) -> bool:
        """False iff this is a rejected limiter decision (rejections are never billed)."""
        return self.data.decision != "rejected"


#: The fields of an event; with ``dataschema``, the CloudEvents attributes it may carry
_FIELDS: Final = frozenset(UsageEvent.model_fields)
_ATTRIBUTES: Final = _FIELDS | {"dataschema"}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "extra_forbidden":
            msg = "is not a known field"
        if not loc and ": " in msg:  # model-level checks already name their field
            parts.append(msg)
        else:
            parts.append(f"{loc or 'event'}: {msg}")
    return "; ".join(parts)


def _default_skew() -> float:
    try:
        return float(get_settings().event_max_future_skew)
    except Exception:  # settings unreadable: the documented default still protects the pipeline
        return DEFAULT_MAX_FUTURE_SKEW


def decode_event(
    raw: bytes | bytearray | memoryview | str,
    *,
    now: dt.datetime | None = None,
    max_future_skew: float | None = None,
) -> UsageEvent:
    """Parse and validate one structured-mode CloudEvents JSON document.

    ``now`` (default: the current UTC time) and ``max_future_skew`` (default: the setting
    ``EVENT_MAX_FUTURE_SKEW``) bound how far ahead ``time`` may be. Raises
    :class:`EventDecodeError` for bad bytes, bad JSON, a bad shape or an invalid value.
    """
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise EventDecodeError("event: is not valid UTF-8 text") from None
    elif not isinstance(raw, bytes | bytearray | memoryview):
        raise EventDecodeError(f"event: must be bytes or str, not {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_EVENT_BYTES:
        raise EventDecodeError(
            f"event: {len(raw)} bytes encoded, at most {MAX_EVENT_BYTES} allowed"
        )
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be timezone-aware")
    skew = _default_skew() if max_future_skew is None else max_future_skew
    try:
        return UsageEvent.model_validate_json(
            raw, context={"now": now.astimezone(dt.UTC) if now else None, "max_future_skew": skew}
        )
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            detail = exc.errors()[0]["msg"]
            raise EventDecodeError(f"event: is not valid JSON ({detail})") from None
        if any(e["type"] == "model_type" and not e["loc"] for e in exc.errors()):
            raise EventDecodeError("event: must be a JSON object") from None
        raise EventDecodeError(_describe(exc)) from None


def encode_event(ev: UsageEvent) -> bytes:
    """The event as compact structured-mode CloudEvents JSON (UTF-8), ``decode_event``'s inverse."""
    out = ev.model_dump_json(exclude_none=True).encode("utf-8")
    if len(out) > MAX_EVENT_BYTES:
        raise EventDecodeError(
            f"event: {len(out)} bytes encoded, at most {MAX_EVENT_BYTES} allowed"
        )
    return out


def new_event_id() -> str:
    """A fresh, unique event id (the idempotency key of the pipeline)."""
    return str(uuid.uuid4())


def _build(fields: dict[str, Any]) -> UsageEvent:
    try:
        return UsageEvent.model_validate(fields, context={"max_future_skew": _default_skew()})
    except ValidationError as exc:
        raise EventDecodeError(_describe(exc)) from None


def usage_event(
    tenant: str,
    meter: str,
    quantity: float,
    dimensions: dict[str, str] | None = None,
    source: str = DEFAULT_SOURCE,
    time: dt.datetime | None = None,
    *,
    id: str | None = None,
) -> UsageEvent:
    """A ``metering.usage`` event with a fresh id (unless given) and ``time`` = now (UTC)."""
    return _build(
        {
            "id": id or new_event_id(),
            "source": source,
            "type": TYPE_USAGE,
            "subject": tenant,
            "time": time or dt.datetime.now(dt.UTC),
            "data": {
                "meter": meter,
                "quantity": float(quantity) if isinstance(quantity, int) else quantity,
                "dimensions": dict(dimensions or {}),
            },
        }
    )


def decision_event(
    tenant: str,
    decision: Any,
    *,
    meter: str = DEFAULT_DECISION_METER,
    cost: float | None = None,
    route: str | None = None,
    source: str = DEFAULT_SOURCE,
    dimensions: dict[str, str] | None = None,
    time: dt.datetime | None = None,
) -> UsageEvent:
    """A ``metering.ratelimit`` event for one limiter decision.

    ``decision`` is a :class:`limiter.Decision`-like object (``allowed``, ``reason``, ``cost``)
    or a plain bool ``allowed``. ``quantity`` is the request's cost; dimensions carry ``route``
    and ``reason`` where known. Without ``time`` the event is stamped now, kept within the UTC
    day the decision was counted in (``decision.day``, the Redis server's day): see
    :func:`limiter.clock.time_in_day_ns`.
    """
    if isinstance(decision, bool):
        allowed, reason = decision, None
    else:
        allowed = bool(decision.allowed)
        reason = getattr(decision, "reason", None)
        if cost is None:
            cost = getattr(decision, "cost", None)
    dims = dict(dimensions or {})
    if route is not None:
        dims["route"] = route
    if reason is not None:
        dims["reason"] = str(reason)
    if getattr(decision, "degraded", False):
        dims["degraded"] = "true"
    return _build(
        {
            "id": new_event_id(),
            "source": source,
            "type": TYPE_RATELIMIT,
            "subject": tenant,
            "time": time
            or utc_from_ns(time_in_day_ns(_time.time_ns(), getattr(decision, "day", None))),
            "data": {
                "meter": meter,
                "quantity": float(1 if cost is None else cost),
                "dimensions": dims,
                "decision": "allowed" if allowed else "rejected",
            },
        }
    )


__all__ = [
    "DEFAULT_MAX_FUTURE_SKEW",
    "MAX_DATASCHEMA_LENGTH",
    "MAX_DIMENSIONS",
    "MAX_DIMENSION_VALUE",
    "MAX_EVENT_BYTES",
    "MAX_EXTENSION_VALUE",
    "TYPE_RATELIMIT",
    "TYPE_USAGE",
    "EventDecodeError",
    "UsageData",
    "UsageEvent",
    "decision_event",
    "decode_event",
    "encode_event",
    "new_event_id",
    "parse_rfc3339",
    "seconds_past",
    "usage_event",
]

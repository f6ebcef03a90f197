"""``POST /v1/events``: HTTP ingest of usage events.

The body is a JSON array of CloudEvents 1.0 structured events (``application/json`` or
``application/cloudevents-batch+json``), or one event (``application/cloudevents+json``). The
batch is all or nothing: every event is validated (:func:`metering.events.decode_event`, with
the future-time bound) and checked against the caller first, and only a fully valid batch goes to
the emitter. Errors are reported per event by index. Invariants:

- a tenant may only send events whose ``subject`` is itself, of type ``metering.usage`` (limiter
  decisions come from the limiter); an admin may send any tenant's events of either type;
- at most ``API_MAX_BATCH`` events and ``API_MAX_BODY_BYTES`` bytes (413 beyond);
- no event is accepted that the worker would not count (202 means every event counts): one
  older than ``EVENT_MAX_LATENESS`` less ``API_INGEST_LATENESS_MARGIN`` (the worker judges the
  lateness when it reads the event, and dead-letters it as late), or one repeating the
  (subject, id) of an earlier event of the batch (the worker keeps the first of an id only),
  or one further ahead than ``EVENT_MAX_FUTURE_SKEW`` less ``API_INGEST_FUTURE_MARGIN`` (the
  worker checks the skew again by its own clock, which may be behind this host's);
- 202 only once the events are out of the process's memory: acknowledged by Kafka or synced to
  the emitter's spool (``Emitter.wait_durable``, at most ``API_INGEST_ACK_TIMEOUT``); else 503,
  and the caller sends the batch again (repeated ids count once).
  Tests: ``tests/integration/test_api_ingest.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import anyio.to_thread
import msgspec
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from metering.api.auth import CurrentPrincipal, Principal, bearer_scheme
from metering.api.context import ApiContext, api_context
from metering.api.problems import Problem, StoreFailureRoute
from metering.events import (
    TYPE_USAGE,
    EventDecodeError,
    UsageEvent,
    decode_event,
    seconds_past,
)
from metering.settings import Settings

router = APIRouter(tags=["events"], route_class=StoreFailureRoute)

BATCH_TYPES = {"application/json", "application/cloudevents-batch+json"}
SINGLE_TYPES = {"application/cloudevents+json"}


class IngestAccepted(BaseModel):
    accepted: int
    ids: list[str]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


_SPLIT_BATCH = msgspec.json.Decoder(list[msgspec.Raw])


def _loads(raw: bytes) -> Any:
    """The body parsed by Python's JSON parser, or the 400 naming where it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Problem(400, f"request body is not valid JSON: {exc}", slug="bad-json") from None


def _parse_body(raw: bytes, media_type: str, max_batch: int) -> list[Any]:
    """The batch's items, each the raw JSON of one event, once the batch is known to be a
    non-empty array of at most ``max_batch`` items.

    The array is only split here (msgspec: no Python object per value), and the items are
    parsed one by one by the caller: a body of a million empty objects was parsed whole before
    its size was refused, holding the event loop for ~0.17 s per request."""
    if not raw.strip():
        raise Problem(400, "request body is empty: send a JSON array of events", slug="bad-json")
    if media_type in SINGLE_TYPES:
        body = _loads(raw)
        if not isinstance(body, dict):
            raise Problem(422, "application/cloudevents+json carries one event (a JSON object)")
        return [body]
    try:
        items: list[Any] = _SPLIT_BATCH.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        # Not a well-formed JSON array: Python's parser gives the verdict and the message it
        # always gave (it also reads NaN and Infinity, then refused event by event).
        body = _loads(raw)
        if not isinstance(body, list):
            raise Problem(
                422, "request body must be a JSON array of events", slug="invalid-batch"
            ) from None
        items = body
    if not items:
        raise Problem(422, "the batch is empty", slug="invalid-batch")
    if len(items) > max_batch:
        raise Problem(
            413,
            f"the batch has {len(items)} events, at most {max_batch} allowed",
            slug="batch-too-large",
        )
    return items


def _check_event(
    item: Any,
    principal: Principal,
    max_future_skew: float,
    max_age: float,
    now: dt.datetime,
) -> UsageEvent:
    """The validated event, or :class:`EventDecodeError` / :class:`PermissionError`.
    ``item``: a parsed JSON value, or the raw JSON of one (``msgspec.Raw``).

    ``max_age`` (``Settings.ingest_max_age``) is the worker's lateness less a margin: the
    worker judges lateness when it reads the event, later than now by the pipeline's delay
    (the emitter's linger, the worker's batching and lag), so an event accepted at the
    lateness itself would reach it late and be dead-lettered after its 202. Likewise
    ``max_future_skew`` (``Settings.ingest_max_ahead``) is the worker's skew less a margin for
    the worker's clock being behind this host's."""
    if isinstance(item, msgspec.Raw):
        try:
            item = json.loads(bytes(item))
        except RecursionError:
            raise EventDecodeError("event: nested too deeply") from None
        except ValueError:  # valid JSON (msgspec read it): an integer Python will not convert
            raise EventDecodeError(
                f"event: holds a number of more than {sys.get_int_max_str_digits()} digits"
            ) from None
    if not isinstance(item, dict):
        raise EventDecodeError("event: must be a JSON object")
    event = decode_event(json.dumps(item), now=now, max_future_skew=max_future_skew)
    if event.time < now - dt.timedelta(seconds=max_age):
        age = (now - event.time).total_seconds()
        raise EventDecodeError(
            f"time: is {seconds_past(age, max_age)}s old; this API takes events at most"
            f" {max_age:g}s old "
            "(EVENT_MAX_LATENESS less API_INGEST_LATENESS_MARGIN, left for the pipeline)"
        )
    if not principal.is_admin:
        if event.subject != principal.tenant_id:
            raise PermissionError(
                f"subject: {event.subject!r} is not your tenant ({principal.tenant_id!r})"
            )
        if event.type != TYPE_USAGE:
            raise PermissionError(f"type: tenants may only send {TYPE_USAGE!r} events")
    return event


def _checked_batch(
    body: bytes, media_type: str, settings: Settings, principal: Principal
) -> list[UsageEvent]:
    """The batch's events, all valid and the caller's to send, or the :class:`Problem` that
    refuses the whole batch (errors by index)."""
    items = _parse_body(body, media_type, settings.api_max_batch)
    now = dt.datetime.now(dt.UTC)
    events: list[UsageEvent] = []
    errors: list[dict[str, Any]] = []
    first_of: dict[tuple[str, str], int] = {}  # (subject, id) -> index of its first event
    forbidden = False
    for index, item in enumerate(items):
        try:
            event = _check_event(
                item, principal, settings.ingest_max_ahead, settings.ingest_max_age, now
            )
        except EventDecodeError as exc:
            errors.append({"index": index, "message": str(exc)})
            continue
        except PermissionError as exc:
            forbidden = True
            errors.append({"index": index, "message": str(exc)})
            continue
        first = first_of.setdefault((event.subject, event.id), index)
        if first != index:
            errors.append({"index": index, "message": f"id: repeats the id of event {first}"})
            continue
        events.append(event)
    if errors:
        shown = "; ".join(f"[{e['index']}] {e['message']}" for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise Problem(
            403 if forbidden else 422,
            f"{len(errors)} of {len(items)} events refused, none accepted: {shown}{more}",
            slug="forbidden-events" if forbidden else "invalid-events",
            errors=errors,
        )
    return events


@router.post(
    "/v1/events",
    status_code=202,
    response_model=IngestAccepted,
    summary="Ingest a batch of usage events",
    dependencies=[Depends(bearer_scheme)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {
                    "schema": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"$ref": "#/components/schemas/UsageEvent"},
                    }
                }
                for media in sorted(BATCH_TYPES)
            }
            | {
                "application/cloudevents+json": {
                    "schema": {"$ref": "#/components/schemas/UsageEvent"}
                }
            },
        }
    },
    responses={
        403: {"description": "an event names another tenant or a type the caller may not send"},
        413: {"description": "body or batch too large"},
        415: {"description": "unsupported content type"},
        422: {"description": "invalid events, reported by index"},
        503: {
            "description": "the pipeline cannot take the events now, or could not confirm "
            "them kept in time; send the batch again (repeated ids count once)"
        },
    },
)
async def ingest_events(request: Request, principal: CurrentPrincipal) -> IngestAccepted:
    ctx = api_context(request)
    media_type = _media_type(request)
    if media_type not in BATCH_TYPES | SINGLE_TYPES:
        raise Problem(
            415,
            f"content type {media_type or '(none)'!r} is not accepted; send "
            + ", ".join(sorted(BATCH_TYPES | SINGLE_TYPES)),
            slug="unsupported-media-type",
        )
    settings = ctx.settings
    # One event loop: no other request runs between the check and the count.
    if ctx.ingest_in_flight >= settings.api_ingest_max_concurrent:
        raise Problem(
            503,
            f"the API is taking {ctx.ingest_in_flight} batches of events already (at most "
            f"{settings.api_ingest_max_concurrent} at once); none of this one accepted, send "
            "it again",
            slug="ingest-busy",
            headers={"Retry-After": "1"},
        )
    ctx.ingest_in_flight += 1
    try:
        return await _ingest(request, principal, ctx, media_type)
    finally:
        ctx.ingest_in_flight -= 1


async def _ingest(
    request: Request, principal: Principal, ctx: ApiContext, media_type: str
) -> IngestAccepted:
    settings = ctx.settings
    body = await request.body()
    # Parsing and checking a large batch takes tens of ms of Python: in a thread, the event
    # loop keeps serving meanwhile (the GIL is handed over every few ms).
    events = await anyio.to_thread.run_sync(_checked_batch, body, media_type, settings, principal)
    has_room = getattr(ctx.emitter, "has_room", None)
    if has_room is not None and not has_room(len(events), len(body)):
        # Accepting would mean dropping: the caller keeps the events and retries.
        raise Problem(
            503,
            f"the event pipeline cannot take {len(events)} events now (its queue or, while "
            "Kafka is away, its disk spool is full); none accepted, send them again",
            slug="ingest-backpressure",
            headers={"Retry-After": "1"},
        )
    # 202 promises the events count: the answer waits until they are out of this process's
    # memory (acknowledged by Kafka, or synced to the spool), so a crash after it loses none.
    wait_durable = getattr(ctx.emitter, "wait_durable", None)
    dropped_before = ctx.emitter.dropped_total if wait_durable is not None else None
    for event in events:
        ctx.emitter.emit(event)
    if wait_durable is not None and not await wait_durable(
        settings.api_ingest_ack_timeout, dropped_before
    ):
        raise Problem(
            503,
            f"the {len(events)} events were not confirmed kept within "
            f"{settings.api_ingest_ack_timeout:g}s (Kafka slow and the spool unavailable, or "
            "events dropped); send the same batch again: the worker counts a repeated id once",
            slug="ingest-unconfirmed",
            headers={"Retry-After": "1"},
        )
    return IngestAccepted(accepted=len(events), ids=[e.id for e in events])

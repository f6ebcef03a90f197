"""RateLimitMiddleware's logic against a scripted limiter: which fields a decision turns into,
when a request is answered 429/503, shadow mode, exemptions and per-route cost and meter.
(The same behaviour against the real limiter and Redis: tests/integration/test_api_ratelimit.py.)
"""

from __future__ import annotations

import datetime as dt
import math
import os
import uuid
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from limiter.clock import ServerClock
from limiter.core import MAX_COST
from limiter.decision import Decision
from limiter.middleware import (
    DAY_SECONDS,
    RateLimitMiddleware,
    _int,
    _seconds_until,
    build_route_rules,
    new_decision_event_id,
    ratelimit_headers,
    retry_after_seconds,
)
from limiter.quota import Quota
from limiter.quota_provider import UnknownTenant
from metering.events import (
    MAX_DIMENSION_VALUE,
    UsageEvent,
    decision_event,
    decode_event,
    encode_event,
)

NOW = 1_800_000_000.0  # a fixed Unix time
RESET_AT = dt.datetime.fromtimestamp(NOW + 3600, dt.UTC)  # the day ends in an hour
QUOTA = Quota(rate_per_sec=5.0, burst=10, daily_limit=1000)


def decision(**over: Any) -> Decision:
    fields: dict[str, Any] = dict(
        allowed=True,
        limit=10,
        remaining=7,
        retry_after=0.0,
        daily_limit=1000,
        daily_used=10,
        daily_remaining=990,
        reset_at=RESET_AT,
        reason="ok",
        tenant="acme",
        cost=1,
        day=dt.datetime.now(dt.UTC).date(),  # the events made of it keep to this day
        quota=QUOTA,
    )
    fields.update(over)
    return Decision(**fields)


def test_allowed_decision_fields() -> None:
    headers = dict(ratelimit_headers(decision(), now=NOW))
    assert headers[b"ratelimit-policy"] == b'"burst";q=10;w=2, "daily";q=1000;w=86400'
    # 3 tokens missing at 5/s: whole again in 1 s; the day resets in 3600 s.
    assert headers[b"ratelimit"] == b'"burst";r=7;t=1, "daily";r=990;t=3600'
    # The binding policy is the bucket (7 left < 990 left).
    assert headers[b"x-ratelimit-limit"] == b"10"
    assert headers[b"x-ratelimit-remaining"] == b"7"
    assert headers[b"x-ratelimit-reset"] == str(int(NOW) + 1).encode()


def test_daily_rejection_describes_the_day() -> None:
    d = decision(
        allowed=False,
        reason="daily",
        remaining=10,
        daily_used=1000,
        daily_remaining=0,
        retry_after=3600.0,
    )
    headers = dict(ratelimit_headers(d, now=NOW, quota=QUOTA))
    assert headers[b"x-ratelimit-limit"] == b"1000"
    assert headers[b"x-ratelimit-remaining"] == b"0"
    assert headers[b"x-ratelimit-reset"] == str(int(NOW) + 3600).encode()
    assert retry_after_seconds(d) == 3600


def test_window_policy_appears_when_the_tenant_has_one() -> None:
    quota = Quota(rate_per_sec=5.0, burst=10, daily_limit=1000, window_limit=50, window_seconds=60)
    d = decision(
        quota=quota,
        window_limit=50,
        window_remaining=0,
        allowed=False,
        reason="window",
        retry_after=12.2,
    )
    headers = dict(ratelimit_headers(d, now=NOW))
    assert headers[b"ratelimit-policy"].endswith(b', "window";q=50;w=60')
    assert headers[b"x-ratelimit-limit"] == b"50"
    assert headers[b"x-ratelimit-remaining"] == b"0"
    assert retry_after_seconds(d) == 13


@st.composite
def decisions(draw: st.DrawFn) -> tuple[Decision, float]:
    """A limiter decision of any shape (allowed or not, any reason, with or without a rolling
    window, counts at and past their bounds) and the time it is described at."""
    windowed = draw(st.booleans())
    quota = Quota(
        rate_per_sec=draw(st.floats(min_value=0.001, max_value=1e6)),
        burst=draw(st.integers(1, 10**6)),
        daily_limit=draw(st.integers(0, 10**9)),
        window_limit=draw(st.integers(1, 10**6)) if windowed else None,
        window_seconds=draw(st.integers(1, 31 * 86400)) if windowed else None,
    )
    now = draw(st.floats(min_value=1e9, max_value=4e9))
    reasons = [
        "ok",
        "bucket",
        "daily",
        "window",
        "cost_exceeds_burst",
        "cost_exceeds_window",
        "cost_exceeds_daily",
    ]
    d = decision(
        quota=quota,
        allowed=draw(st.booleans()),
        reason=draw(st.sampled_from([*reasons, "redis_down", "local_ceiling"])),
        limit=quota.burst,
        remaining=draw(st.integers(-3, quota.burst + 3)),
        retry_after=draw(st.floats(min_value=0, max_value=1e6)),
        daily_limit=quota.daily_limit,
        daily_remaining=draw(st.integers(-3, quota.daily_limit + 3)),
        reset_at=dt.datetime.fromtimestamp(now + draw(st.floats(-100, 2 * 86400)), dt.UTC),
        window_limit=quota.window_limit,
        window_remaining=(
            draw(st.none() | st.integers(-3, quota.window_limit + 3)) if windowed else None
        ),
        degraded=draw(st.booleans()),
    )
    return d, now


@settings(max_examples=2000, deadline=None)
@given(decisions())
def test_a_decisions_own_quota_and_the_same_quota_given_write_the_same_fields(
    case: tuple[Decision, float],
) -> None:
    """The fields of a decision described with its own quota (every request's case) and with
    that quota passed explicitly are the same bytes, over decisions of every shape."""
    d, now = case
    assert ratelimit_headers(d, now=now) == ratelimit_headers(d, now=now, quota=d.quota)


def general_ratelimit_headers(
    d: Decision, *, now: float, quota: Quota | None = None
) -> list[tuple[bytes, bytes]]:
    """The fields as the middleware wrote them before they became plain numbers: a list of
    policies (name, quota, window, remaining, reset), the binding one chosen from it, each
    field formatted from the list. The reference the product's single path is held to."""
    quota = quota if quota is not None else d.quota
    limit, left = _int(d.limit), _int(d.remaining)
    rate = getattr(quota, "rate_per_sec", None)
    if rate:
        window: int | None = math.ceil(limit / rate) or 1
        reset = math.ceil((limit - left) / rate) if left < limit else 0
    else:
        window, reset = None, math.ceil(d.retry_after) if d.retry_after > 0 else 0
    states = [
        ("burst", limit, window, left, reset),
        (
            "daily",
            _int(d.daily_limit),
            DAY_SECONDS,
            _int(d.daily_remaining),
            _seconds_until(d.reset_at, now),
        ),
    ]
    if d.window_limit:
        length = getattr(quota, "window_seconds", None)
        states.append(
            (
                "window",
                _int(d.window_limit),
                _int(length) or None,
                _int(d.window_remaining),
                _int(length) if length else retry_after_seconds(d),
            )
        )
    of_reason = {
        "bucket": "burst",
        "cost_exceeds_burst": "burst",
        "daily": "daily",
        "window": "window",
        "cost_exceeds_window": "window",
        "cost_exceeds_daily": "daily",
    }
    named = [s for s in states if not d.allowed and s[0] == of_reason.get(d.reason)]
    bind = named[0] if named else states[0]
    for s in states if not named else ():
        if s[3] < bind[3]:
            bind = s
    return [
        (
            b"ratelimit-policy",
            ", ".join(
                f'"{n}";q={q}' + (f";w={w}" if w else "") for n, q, w, _, _ in states
            ).encode(),
        ),
        (b"ratelimit", ", ".join(f'"{n}";r={r};t={t}' for n, _, _, r, t in states).encode()),
        (b"x-ratelimit-limit", str(bind[1]).encode()),
        (b"x-ratelimit-remaining", str(bind[3]).encode()),
        (b"x-ratelimit-reset", str(math.ceil(now) + bind[4]).encode()),
    ]


@settings(max_examples=3000, deadline=None)
@given(decisions(), st.booleans())
def test_the_fields_are_what_the_general_path_writes(
    case: tuple[Decision, float], ints_as_floats: bool
) -> None:
    """ratelimit_headers (plain numbers, one formatting per field) and the general path through
    a list of policies give the same bytes for decisions of every shape, including counts below
    zero or past their bounds and counts that are not ints."""
    d, now = case
    if ints_as_floats:  # not plain ints: the general path's rounding must decide
        d = d._replace(remaining=float(d.remaining) + 0.5)
    assert ratelimit_headers(d, now=now) == general_ratelimit_headers(d, now=now)
    assert ratelimit_headers(d, now=now, quota=d.quota) == general_ratelimit_headers(
        d, now=now, quota=d.quota
    )


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after_seconds(decision(allowed=False, retry_after=0.01)) == 1
    assert retry_after_seconds(decision(allowed=False, retry_after=1.2)) == 2


def test_route_rules_refuse_nonsense_costs() -> None:
    with pytest.raises(ValueError, match="integer >= 1"):
        build_route_rules(costs={"/v1/x": 0})
    with pytest.raises(ValueError, match="starting with '/'"):
        build_route_rules(costs={"v1/x": 2})


def test_route_rules_refuse_costs_the_limiter_cannot_take() -> None:
    """Past the limiter's MAX_COST (2**53) every request on the route would fail with
    InvalidCost (a 500): such a cost is refused when the rules are made, naming the route."""
    assert build_route_rules(costs={"/v1/x": MAX_COST})[0].cost == MAX_COST
    with pytest.raises(ValueError, match=r"cost of route 'POST /v1/x' must be .* <= 2\*\*53"):
        build_route_rules(costs={"POST /v1/x": MAX_COST + 1})
    with pytest.raises(ValueError, match=r"default cost must be .* <= 2\*\*53"):
        RateLimitMiddleware(inner(), ScriptedLimiter(), default_cost=MAX_COST + 1)


# --- the middleware against a scripted limiter -------------------------------------------------
class ScriptedLimiter:
    """Answers from a list of decisions and records what it was asked."""

    def __init__(self, *decisions: Decision) -> None:
        self.decisions = list(decisions)
        self.calls: list[tuple[str, int]] = []

    async def acquire(self, tenant: str, cost: int = 1, quota: Any = None) -> Decision:
        self.calls.append((tenant, cost))
        return self.decisions.pop(0)


class ModelListEmitter:
    """An emitter with ``emit`` only: the middleware hands it event models."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)


class ListEmitter(ModelListEmitter):
    """Like the real Emitter, it has ``emit_encoded``: the middleware hands it bytes, which are
    kept decoded by the strict decoder (so every test below also proves them valid)."""

    def emit(self, event: Any) -> None:
        raise AssertionError("the middleware should use emit_encoded")

    def emit_encoded(self, key: bytes, value: bytes) -> None:
        event = decode_event(value)
        assert key == event.subject.encode()
        self.events.append(event)


async def ok(_: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def tenant_from_token(app: Any, tenant: str | None) -> Any:
    """Stands in for the auth layer: puts a verified tenant into the request state."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if tenant is not None and scope["type"] == "http":
            scope.setdefault("state", {})["token_payload"] = {"sub": tenant}
        await app(scope, receive, send)

    return wrapped


def client(mw: RateLimitMiddleware, tenant: str | None = "acme") -> httpx.AsyncClient:
    app = tenant_from_token(mw, tenant)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def inner() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/things/{id}", ok, methods=["GET", "POST"]),
            Route("/healthz", ok),
        ]
    )


async def test_rejection_is_429_problem_with_retry_after_and_fields() -> None:
    limiter = ScriptedLimiter(
        decision(allowed=False, reason="bucket", remaining=0, retry_after=0.4)
    )
    emitter = ListEmitter()
    mw = RateLimitMiddleware(inner(), limiter, emitter=emitter, routes=["/v1/things/{id}"])
    async with client(mw) as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "1"
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert r.json()["status"] == 429
    (event,) = emitter.events
    assert event.data.decision == "rejected"
    assert event.data.dimensions["route"] == "/v1/things/{id}"
    assert event.data.meter == "requests"


@pytest.mark.parametrize(
    ("reason", "limit", "field"),
    [
        ("cost_exceeds_burst", "burst of 10", "10"),
        ("cost_exceeds_window", "rolling window of 4", "4"),
        ("cost_exceeds_daily", "daily limit of 1000", "1000"),
    ],
)
async def test_a_cost_that_can_never_fit_is_429_without_retry_after(
    reason: str, limit: str, field: str
) -> None:
    """The limiter answers a cost above the burst (or the window's limit) with retry_after 0:
    no wait ever lets it pass, so no Retry-After, and the detail says so."""
    quota = Quota(rate_per_sec=5.0, burst=10, daily_limit=1000, window_limit=4, window_seconds=60)
    rejected = decision(
        allowed=False, reason=reason, cost=12, retry_after=0.0, quota=quota, window_limit=4
    )
    mw = RateLimitMiddleware(inner(), ScriptedLimiter(rejected), costs={"/v1/things/{id}": 12})
    async with client(mw) as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 429 and "retry-after" not in r.headers
    body = r.json()
    assert body["type"] == "urn:metering:problem:cost-exceeds-limit"
    assert body["detail"] == (
        f"this request costs 12, more than the {limit} of tenant 'acme': it can never fit the"
        " tenant's limit, whenever it is retried"
    )
    assert r.headers["x-ratelimit-limit"] == field  # the policy that refused


async def test_allowed_request_passes_with_fields_and_an_allowed_event() -> None:
    emitter = ListEmitter()
    mw = RateLimitMiddleware(inner(), ScriptedLimiter(decision()), emitter=emitter)
    async with client(mw) as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 200
    assert r.text == "ok"
    assert r.headers["ratelimit"].startswith('"burst";r=7')
    assert [e.data.decision for e in emitter.events] == ["allowed"]


async def test_an_emitter_without_emit_encoded_gets_the_event_model() -> None:
    emitter = ModelListEmitter()
    mw = RateLimitMiddleware(inner(), ScriptedLimiter(decision()), emitter=emitter)
    async with client(mw) as c:
        assert (await c.get("/v1/things/1")).status_code == 200
    (event,) = emitter.events
    assert isinstance(event, UsageEvent)
    assert decode_event(encode_event(event)) == event


async def test_redis_down_with_fail_closed_is_503() -> None:
    limiter = ScriptedLimiter(
        decision(allowed=False, reason="redis_down", degraded=True, retry_after=1.0)
    )
    async with client(RateLimitMiddleware(inner(), limiter)) as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"


async def test_shadow_mode_never_blocks_but_emits_the_rejection() -> None:
    limiter = ScriptedLimiter(*[decision(allowed=False, reason="bucket", remaining=0)] * 3)
    emitter = ListEmitter()
    mw = RateLimitMiddleware(inner(), limiter, emitter=emitter, shadow=True)
    async with client(mw) as c:
        statuses = [(await c.get("/v1/things/1")).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert len(limiter.calls) == 3
    assert [e.data.decision for e in emitter.events] == ["rejected"] * 3
    assert all(e.data.dimensions["shadow"] == "true" for e in emitter.events)


class RefusingLimiter(ScriptedLimiter):
    """Knows no tenant (a quota provider with QUOTA_UNKNOWN_TENANT=reject)."""

    async def acquire(self, tenant: str, cost: int = 1, quota: Any = None) -> Decision:
        self.calls.append((tenant, cost))
        raise UnknownTenant(f"unknown tenant {tenant!r}")


async def test_an_unknown_tenant_is_403_but_shadow_mode_passes_it_on_with_an_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With unknown tenants rejected, a tenant the quota DB does not know gets 403; in shadow
    mode, which never blocks, the request is passed on, the would-be refusal logged and emitted
    as a rejected decision (reason ``unknown_tenant``)."""
    emitter = ListEmitter()
    mw = RateLimitMiddleware(inner(), RefusingLimiter(), emitter=emitter)
    async with client(mw, tenant="stranger") as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 403 and r.json()["type"] == "urn:metering:problem:unknown-tenant"
    assert emitter.events == []

    limiter = RefusingLimiter()
    mw = RateLimitMiddleware(inner(), limiter, emitter=emitter, shadow=True)
    async with client(mw, tenant="stranger") as c:
        statuses = [(await c.get("/v1/things/1")).status_code for _ in range(2)]
    assert statuses == [200, 200] and len(limiter.calls) == 2
    assert [(e.subject, e.data.decision, e.data.quantity) for e in emitter.events] == [
        ("stranger", "rejected", 1.0)
    ] * 2
    assert all(
        e.data.dimensions == {"route": "/v1/things/1", "reason": "unknown_tenant", "shadow": "true"}
        for e in emitter.events
    )
    assert any("stranger" in m and "unknown" in m for m in caplog.messages)


async def test_exempt_paths_and_anonymous_requests_never_reach_the_limiter() -> None:
    limiter = ScriptedLimiter()
    mw = RateLimitMiddleware(inner(), limiter)
    async with client(mw) as c:
        assert (await c.get("/healthz")).status_code == 200
    async with client(mw, tenant=None) as c:
        assert (await c.get("/v1/things/1")).status_code == 200
    assert limiter.calls == []


async def test_route_cost_and_meter_follow_the_configuration() -> None:
    limiter = ScriptedLimiter(decision(), decision())
    emitter = ListEmitter()
    mw = RateLimitMiddleware(
        inner(),
        limiter,
        emitter=emitter,
        costs={"POST /v1/things/{id}": 5},
        meters={"/v1/things/{id}": "things"},
    )
    async with client(mw) as c:
        await c.post("/v1/things/9")
        await c.get("/v1/things/9")
    assert limiter.calls == [("acme", 5), ("acme", 1)]
    assert [(e.data.meter, e.data.quantity) for e in emitter.events] == [
        ("things", 5.0),
        ("things", 1.0),
    ]


async def test_an_invalid_tenant_is_400_never_a_key() -> None:
    limiter = ScriptedLimiter()
    async with client(RateLimitMiddleware(inner(), limiter), tenant="a{b}") as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 400
    assert limiter.calls == []


@pytest.mark.parametrize("shadow", [False, True])
@pytest.mark.parametrize(
    "d",
    [
        decision(),
        decision(allowed=False, reason="daily", daily_remaining=0),
        decision(allowed=True, reason="redis_down", degraded=True),
    ],
)
def test_the_fast_decision_event_is_what_decision_event_makes(d: Decision, shadow: bool) -> None:
    """The middleware builds its events without re-validation; the strict decoder accepts them
    and they equal metering.events.decision_event's, field for field."""
    mw = RateLimitMiddleware(inner(), ScriptedLimiter(), shadow=shadow, source="urn:test")
    fast = mw.decision_event("acme", d, 3, "requests", "/v1/things/{id}")
    decoded = decode_event(encode_event(fast))
    reference = decision_event(
        "acme",
        d,
        meter="requests",
        cost=3,
        route="/v1/things/{id}",
        source="urn:test",
        dimensions={"shadow": "true"} if shadow else None,
    )
    assert decoded == fast
    assert decoded.model_dump(exclude={"id", "time"}) == reference.model_dump(
        exclude={"id", "time"}
    )
    assert fast.time.tzinfo is not None
    encoded = decode_event(mw.decision_bytes("acme", d, 3, "requests", "/v1/things/{id}"))
    assert encoded.model_dump(exclude={"id", "time"}) == reference.model_dump(
        exclude={"id", "time"}
    )
    assert abs((encoded.time - fast.time).total_seconds()) < 5


def test_decision_event_ids_differ_across_a_fork() -> None:
    """Two workers forked from one parent never produce the same event ids."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, new_decision_event_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 100).decode()
    os.waitpid(pid, 0)
    parent_id = new_decision_event_id()
    assert child_id and child_id != parent_id
    assert uuid.UUID(parent_id).version == 4


def test_decision_event_ids_are_canonical_version_4_uuids() -> None:
    ids = [new_decision_event_id() for _ in range(2000)]
    for event_id in ids:
        parsed = uuid.UUID(event_id)
        assert str(parsed) == event_id  # canonical: lower-case hex, dashes where they belong
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("source", ["urn:test", "2000-01-01T00:00:00.000001Z"])
def test_each_encoded_decision_has_its_own_id_and_the_time_it_was_made(source: str) -> None:
    """decision_bytes splices an id and a time into a kept template; a source that would move
    the splice (it holds the template's time placeholder) is encoded whole instead."""
    mw = RateLimitMiddleware(inner(), ScriptedLimiter(), source=source)
    before = dt.datetime.now(dt.UTC)
    d = decision(day=before.date())  # counted today: the event keeps to its counted day
    events = [decode_event(mw.decision_bytes("acme", d, 1, "requests", "/x")) for _ in range(3)]
    after = dt.datetime.now(dt.UTC)
    assert len({e.id for e in events}) == 3
    for e in events:
        assert e.source == source and e.subject == "acme" and e.data.decision == "allowed"
        assert before - dt.timedelta(microseconds=1) <= e.time <= after


class SkewedLimiter(ScriptedLimiter):
    """A scripted limiter with an estimate of the Redis server's clock (limiter.clock)."""

    def __init__(self, offset: float, *decisions: Decision) -> None:
        super().__init__(*decisions)
        self.clock = ServerClock()
        self.clock.offset = offset


def event_times(mw: RateLimitMiddleware, d: Decision) -> list[dt.datetime]:
    """The decision's event time by each of the three ways an event is made."""
    args = ("acme", d, 1, "requests", "/x")
    day_after = dt.datetime.combine(d.day, dt.time(), dt.UTC) + dt.timedelta(days=1)
    return [
        decode_event(mw.decision_bytes(*args), now=day_after).time,
        mw.decision_event(*args).time,
        mw.wire_event(*args).time,
    ]


@pytest.mark.parametrize("days", [-1, 1])
def test_a_decision_event_keeps_to_the_day_the_limiter_counted_it_in(days: int) -> None:
    """Redis counted the cost on its own UTC day; a host clock on the other side of midnight
    (skewed, or the event made a few ms after the decision) must not move the event, and so
    ClickHouse's day, the Faust daily table and the quota DB's backfill, to another day."""
    mw = RateLimitMiddleware(inner(), ScriptedLimiter())
    today = dt.datetime.now(dt.UTC).date()
    counted = today + dt.timedelta(days=days)
    edge = dt.datetime.combine(counted, dt.time(), dt.UTC)
    if days < 0:  # counted yesterday: the day's last microsecond
        edge += dt.timedelta(days=1, microseconds=-1)
    d = decision(day=counted)
    assert event_times(mw, d) == [edge] * 3
    if days < 0:  # (the validating builder refuses tomorrow's start: hours in its future)
        assert decision_event("acme", d).time == edge


def test_a_decision_event_on_its_counted_day_keeps_the_hosts_time() -> None:
    mw = RateLimitMiddleware(inner(), ScriptedLimiter())
    before = dt.datetime.now(dt.UTC)
    times = event_times(mw, decision(day=before.date()))
    after = dt.datetime.now(dt.UTC)
    for t in times:
        assert before - dt.timedelta(microseconds=1) <= t <= after


@pytest.mark.parametrize(("offset", "moved"), [(30.0, True), (-30.0, True), (0.4, False)])
async def test_a_host_clock_known_off_the_servers_goes_by_the_servers(
    offset: float, moved: bool
) -> None:
    """The limiter's estimate of the Redis server's clock is within about a second; a host
    known off by more stamps events and computes the daily reset by the server's clock."""
    shift = offset if moved else 0.0
    server_day = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=shift)).date()
    limiter = SkewedLimiter(offset, decision(day=server_day))
    mw = RateLimitMiddleware(inner(), limiter, clock=lambda: NOW)
    before = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=shift)
    times = event_times(mw, decision(day=server_day))
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=shift)
    for t in times:
        # (kept within the server's day: across midnight a time may sit on the day's edge)
        assert before - dt.timedelta(microseconds=1) <= t <= after or t.date() == server_day
    async with client(mw) as c:
        r = await c.get("/v1/things/1")
    day_reset = round(RESET_AT.timestamp() - (NOW + shift))  # the day ends an hour after NOW
    assert f'"daily";r=990;t={day_reset}' in r.headers["ratelimit"]


async def test_a_limiter_whose_clock_is_something_else_is_served_by_the_hosts_clock() -> None:
    """Any limiter may stand behind the middleware; a ``clock`` attribute that is not an
    estimate of the Redis server's (a function, here) is not taken for one."""
    limiter = ScriptedLimiter(decision())
    limiter.clock = time_of_day  # type: ignore[attr-defined]
    emitter = ListEmitter()
    mw = RateLimitMiddleware(inner(), limiter, emitter=emitter, clock=lambda: NOW)
    async with client(mw) as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 200
    assert '"daily";r=990;t=3600' in r.headers["ratelimit"]
    assert len(emitter.events) == 1


def time_of_day() -> float:
    return NOW


async def test_without_route_templates_a_long_path_still_makes_a_valid_event() -> None:
    """Without ``routes`` the path names the route dimension; one longer than a dimension value
    may be (256) made an event the worker dead-letters, so an allowed request's usage was lost.
    The route is the path cut to that length (``ListEmitter`` decodes it strictly)."""
    emitter = ListEmitter()
    mw = RateLimitMiddleware(inner(), ScriptedLimiter(decision()), emitter=emitter)
    path = "/v1/things/" + "x" * 300
    async with client(mw) as c:
        assert (await c.get(path)).status_code == 200
    (event,) = emitter.events
    assert event.data.dimensions["route"] == path[:MAX_DIMENSION_VALUE]


@pytest.mark.parametrize("present", ["", None, False, 0, 42])
async def test_a_token_payload_whose_tenant_id_is_empty_or_not_a_string_is_400_not_its_sub(
    present: object,
) -> None:
    """The security audit: the middleware took ``sub`` for a ``tenant_id`` present but empty
    (a user bound to no tenant, limited and billed as a tenant named by the user's id), and
    ``str()`` of a non-string claim (42 became tenant "42")."""
    limiter = ScriptedLimiter(decision(allowed=True), decision(allowed=True))
    mw = RateLimitMiddleware(inner(), limiter, emitter=ListEmitter())

    def with_payload(payload: dict[str, Any]) -> Any:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("state", {})["token_payload"] = payload
            await mw(scope, receive, send)

        return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t")

    async with with_payload({"tenant_id": present, "sub": "user-42"}) as c:
        r = await c.get("/v1/things/1")
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    assert "'tenant_id'" in r.json()["detail"] or "invalid tenant id ''" in r.json()["detail"]
    assert limiter.calls == []
    async with with_payload({"sub": "user-42"}) as c:  # no tenant_id at all: sub is the tenant
        assert (await c.get("/v1/things/1")).status_code == 200
    async with with_payload({"scope": "read"}) as c:  # no caller known: the app's own concern
        assert (await c.get("/v1/things/1")).status_code == 200
    assert limiter.calls == [("user-42", 1)]

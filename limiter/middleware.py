"""``RateLimitMiddleware``: per-tenant limits for any ASGI application.

Pure ASGI (no framework needed). For each HTTP request outside the exempt paths it:

1. takes the tenant from ``scope["state"]["tenant_id"]`` (what ``request.state.tenant_id`` reads),
   else from a verified token payload in ``scope["state"]["token_payload"]`` (claim
   ``tenant_id``, else ``sub``), as put there by an authentication layer running first; a request
   with neither is passed on unlimited (authentication is not this layer's job). Request headers
   are never read for the tenant;
2. asks the limiter for the route's cost (default 1) and emits the decision as a
   ``metering.ratelimit`` usage event on the route's meter (default ``requests``), never
   blocking: the emitter only enqueues;
3. answers a rejection with ``429`` (``503`` when the limiter failed closed because Redis is
   down), ``application/problem+json`` and ``Retry-After``, or passes the request on; either way
   the response carries the rate-limit fields (:func:`ratelimit_headers`). A request that costs
   more than the tenant's burst, rolling window or daily limit can never pass: its ``429`` has no
   ``Retry-After`` and says so.

Shadow mode decides, counts and emits exactly as above but never blocks and adds no fields, so a
limit can be tried on live traffic first; its decision events carry ``shadow=true``. A tenant the
quota provider refuses (``QUOTA_UNKNOWN_TENANT=reject``) is answered ``403``, except in shadow
mode: then it is logged (once per tenant) and emitted as a rejected decision with reason
``unknown_tenant``, and the request is passed on.

:meth:`RateLimitMiddleware.from_settings` makes it as the ``RATE_LIMIT_*`` settings say (route
costs and meters, shadow mode, whether decisions are emitted), as the HTTP API does; the
constructor reads no settings.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import operator
import os
import random
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from limiter.async_limiter import AsyncRateLimiter
from limiter.clock import time_in_day_ns, utc_from_ns
from limiter.core import MAX_COST, check_tenant
from limiter.decision import (
    COST_EXCEEDS_BURST,
    COST_EXCEEDS_DAILY,
    COST_EXCEEDS_WINDOW,
    UNKNOWN_TENANT,
)
from limiter.sync import RateLimiter
from metering.events import (
    MAX_DIMENSION_VALUE,
    MAX_SOURCE_LENGTH,
    SPECVERSION,
    TYPE_RATELIMIT,
    UsageData,
    UsageEvent,
)
from metering.events_fast import EventTemplates, FastUsageData, WireEvent, encode_wire
from metering.ids import InvalidIdentifier, tenant_claim, validate_meter

if TYPE_CHECKING:
    from metering.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_METER = "requests"
DEFAULT_EXEMPT_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/favicon.ico",
    }
)
#: Reason the limiter gives when it decided without Redis and refused (fail mode ``closed``).
REASON_REDIS_DOWN = "redis_down"
DAY_SECONDS = 86_400


class _RefusedTenant(NamedTuple):
    """The decision event's view of a tenant the quota provider refused (shadow mode)."""

    allowed: bool = False
    reason: str = UNKNOWN_TENANT
    degraded: bool = False


_REFUSED_TENANT = _RefusedTenant()


class AsyncLimiter(Protocol):
    async def acquire(self, tenant: str, cost: int = 1) -> Any: ...


class DecisionEmitter(Protocol):
    def emit(self, event: Any) -> None: ...


# Decision-event ids: random UUIDs (version 4) from a process-local generator seeded from the OS,
# reseeded in a forked child so two workers never share a sequence. uuid.uuid4() would read
# os.urandom per request, a system call that gives up the GIL on the request path; ids only need
# to be unique (they are the pipeline's idempotency key), not unpredictable.
_event_ids = random.Random()
os.register_at_fork(after_in_child=_event_ids.seed)


_UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)  # clear version, variant
_UUID4_SET = (4 << 76) | (0x8000 << 48)  # version 4, RFC 4122 variant


def new_decision_event_id() -> str:
    """A random version-4 UUID string, formatted directly (``uuid.UUID(...)`` costs ~3x)."""
    h = "%032x" % (_event_ids.getrandbits(128) & _UUID4_KEEP | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- the header fields (pure functions of a decision) -------------------------------------------
def _int(value: Any, default: int = 0) -> int:
    """A count for a header: a non-negative whole number (the limiter's are ints already)."""
    if type(value) is int:
        return value if value > 0 else 0
    try:
        return max(0, math.floor(float(value)))
    except (TypeError, ValueError):
        return default


def _seconds_until(when: Any, now: float) -> int:
    if when is None:
        return 0
    ts = when.timestamp() if isinstance(when, dt.datetime) else float(when)
    return max(0, math.ceil(ts - now))


_LEFT = operator.itemgetter(2)  # of a (name, quota, remaining, reset) policy

_POLICY_OF_REASON = {
    "bucket": "burst",
    "cost_exceeds_burst": "burst",
    "daily": "daily",
    "window": "window",
    "cost_exceeds_window": "window",
    "cost_exceeds_daily": "daily",
}


def ratelimit_headers(
    decision: Any, *, now: float | None = None, quota: Any = None
) -> list[tuple[bytes, bytes]]:
    """The response fields for ``decision``.

    IETF draft-ietf-httpapi-ratelimit-headers (-11): ``RateLimit-Policy`` lists each policy as a
    Structured-Field item (``"daily";q=1000;w=86400``) and ``RateLimit`` its live state
    (``"daily";r=42;t=3600``). The de-facto ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset``
    describe the binding policy: the one that rejected, else the one with the fewest units left
    (the first on a tie). ``X-RateLimit-Reset`` is a Unix time in seconds, as GitHub and most
    APIs send it.

    The policies are the token bucket (``burst``), the UTC day (``daily``) and, when the tenant
    has one, the rolling window (``window``). ``quota`` (the tenant's :class:`limiter.Quota`;
    default: the one the decision carries) gives the bucket's refill rate and the window's
    length. This runs on every limited response: plain numbers and one formatting per field.
    """
    now = time.time() if now is None else now
    if quota is None:
        quota = getattr(decision, "quota", None)
    limit, left = _int(decision.limit), _int(decision.remaining)
    rate = getattr(quota, "rate_per_sec", None)
    if rate:
        # The bucket's "window" is the time it takes to refill from empty; it is whole again
        # after (limit - left) / rate seconds.
        window: int | None = math.ceil(limit / rate) or 1
        reset = math.ceil((limit - left) / rate) if left < limit else 0
    else:
        retry = getattr(decision, "retry_after", 0)
        window, reset = None, math.ceil(retry) if retry and retry > 0 else 0
    day_limit, day_left = _int(decision.daily_limit), _int(decision.daily_remaining)
    day_reset = _seconds_until(decision.reset_at, now)
    window_limit = getattr(decision, "window_limit", None)
    if window_limit:
        length = getattr(quota, "window_seconds", None)
        seconds = _int(length)
        win = (
            _int(window_limit),
            seconds or None,
            _int(getattr(decision, "window_remaining", 0)),
            # Whole again at the latest one window length from now.
            seconds if length else retry_after_seconds(decision),
        )
    else:
        win = None

    # The binding policy: the one that rejected, else the first of the fewest left.
    policies = [("burst", limit, left, reset), ("daily", day_limit, day_left, day_reset)]
    if win is not None:
        policies.append(("window", win[0], win[2], win[3]))
    bind = None
    if not decision.allowed:
        name = _POLICY_OF_REASON.get(str(getattr(decision, "reason", "")))
        bind = next((p for p in policies if p[0] == name), None)
    if bind is None:
        bind = min(policies, key=_LEFT)

    current = b'"burst";r=%d;t=%d, "daily";r=%d;t=%d' % (left, reset, day_left, day_reset)
    if win is not None:
        current += b', "window";r=%d;t=%d' % (win[2], win[3])
    return [
        (b"ratelimit-policy", _policy_field(limit, window, day_limit, win)),
        (b"ratelimit", current),
        (b"x-ratelimit-limit", b"%d" % bind[1]),
        (b"x-ratelimit-remaining", b"%d" % bind[2]),
        (b"x-ratelimit-reset", b"%d" % (math.ceil(now) + bind[3])),
    ]


_POLICY_FIELDS: dict[tuple[int, int | None, int, int | None, int | None], bytes] = {}


def _policy_field(
    limit: int, window: int | None, day_limit: int, win: tuple[int, int | None, int, int] | None
) -> bytes:
    """``RateLimit-Policy``: the same for every response under one quota, so made once."""
    key = (limit, window, day_limit, *((win[0], win[1]) if win is not None else (None, None)))
    field = _POLICY_FIELDS.get(key)
    if field is None:
        if len(_POLICY_FIELDS) >= 4096:
            _POLICY_FIELDS.clear()
        items = [("burst", limit, window), ("daily", day_limit, DAY_SECONDS)]
        if win is not None:
            items.append(("window", win[0], win[1]))
        field = ", ".join(
            f'"{name}";q={q}' + (f";w={w}" if w else "") for name, q, w in items
        ).encode()
        _POLICY_FIELDS[key] = field
    return field


def retry_after_seconds(decision: Any) -> int:
    """``Retry-After`` for a rejection: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(float(getattr(decision, "retry_after", 0) or 0)))


#: Rejections no wait can turn into an allowance: the cost is more than the policy holds.
_NEVER_FITS = {
    COST_EXCEEDS_BURST: "burst",
    COST_EXCEEDS_WINDOW: "rolling window",
    COST_EXCEEDS_DAILY: "daily limit",
}


def _never_fits(tenant: str, cost: int, reason: str, decision: Any) -> str:
    """The detail of a rejection whose cost exceeds the tenant's burst, rolling window or daily
    limit."""
    if reason == COST_EXCEEDS_BURST:
        limit = decision.limit
    elif reason == COST_EXCEEDS_DAILY:
        limit = decision.daily_limit
    else:
        limit = getattr(decision, "window_limit", 0)
    return (
        f"this request costs {cost}, more than the {_NEVER_FITS[reason]} of {_int(limit)} of "
        f"tenant {tenant!r}: it can never fit the tenant's limit, whenever it is retried"
    )


async def send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    slug: str = "",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """An RFC 9457 ``application/problem+json`` answer (same shape as the HTTP API's errors)."""
    body = {
        "type": f"urn:metering:problem:{slug}" if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# --- which route costs what ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RouteRule:
    """``pattern`` is a path template (``/v1/tenants/{tenant}/quota``), optionally preceded by
    a method (``POST /v1/events``)."""

    pattern: str
    method: str | None
    regex: re.Pattern[str]
    cost: int
    meter: str


def _parse_route_key(key: str) -> tuple[str | None, str]:
    method, _, path = key.strip().partition(" ")
    if path:
        return method.upper(), path.strip()
    return None, method


def _check_route_cost(name: str, cost: object) -> int:
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= MAX_COST:
        raise ValueError(f"{name} must be an integer >= 1 and <= 2**53, got {cost!r}")
    return cost


def build_route_rules(
    routes: Iterable[str] = (),
    costs: Mapping[str, int] | None = None,
    meters: Mapping[str, str] | None = None,
    *,
    default_cost: int = 1,
    default_meter: str = DEFAULT_METER,
) -> list[RouteRule]:
    """Rules from route templates plus per-route ``costs`` / ``meters`` (keys ``"/path"`` or
    ``"METHOD /path"``). More specific keys (with a method) are tried first. A cost is an
    integer from 1 to the limiter's ``MAX_COST`` (2**53), checked here: past it every request on
    the route would fail."""
    _check_route_cost("default cost", default_cost)
    costs, meters = dict(costs or {}), dict(meters or {})
    keys = list(dict.fromkeys([*costs, *meters, *routes]))
    rules = []
    for key in keys:
        method, path = _parse_route_key(key)
        if not path.startswith("/") or len(path) > MAX_DIMENSION_VALUE:
            raise ValueError(
                f"route {key!r} must be a path starting with '/', "
                f"at most {MAX_DIMENSION_VALUE} characters"
            )
        cost = _check_route_cost(
            f"cost of route {key!r}", costs.get(key, costs.get(path, default_cost))
        )
        meter = validate_meter(meters.get(key, meters.get(path, default_meter)))
        regex, _, _ = compile_path(path)
        rules.append(RouteRule(path, method, regex, cost, meter))
    rules.sort(key=lambda r: r.method is None)
    return rules


def tenant_from_scope(scope: Scope) -> str | None:
    """The tenant an authentication layer put into the request state, or ``None`` (no caller
    known: the app's own authentication answers for it).

    From a verified token payload: its ``tenant_id`` claim, or ``sub`` when the token has no
    ``tenant_id`` at all. A ``tenant_id`` that is present but empty, null or not a string is
    not a tenant, and is not replaced by ``sub`` (a user's id is not a tenant):
    :class:`InvalidIdentifier` is raised."""
    state = scope.get("state")
    if not state:
        return None
    tenant = state.get("tenant_id")
    if tenant:
        return str(tenant)
    payload = state.get("token_payload")
    if isinstance(payload, Mapping):
        claim, claimed = tenant_claim(payload)
        if claimed is None and claim == "sub":
            return None
        if not isinstance(claimed, str):
            raise InvalidIdentifier(
                f"token claim {claim!r} must be a tenant id string, not {type(claimed).__name__}"
            )
        return claimed
    return None


def check_limiter(limiter: object) -> None:
    """Refuse, at construction, a limiter of this project that would fail every request.

    The middleware never passes a quota, so an :class:`limiter.AsyncRateLimiter` without a quota
    provider would answer every request 403 ("no quota given ... and no quota provider set").
    The provider is read from the limiter's core (``_core.quotas``,
    :class:`limiter.core.LimiterCore`), which the limiters do not expose otherwise. The
    synchronous :class:`limiter.RateLimiter` cannot be awaited at all. Any other limiter
    (``async acquire(tenant, cost=...)``) is taken as it is."""
    if isinstance(limiter, RateLimiter):
        raise TypeError(
            "RateLimitMiddleware needs an AsyncRateLimiter: RateLimiter.acquire is synchronous "
            "(use AsyncRateLimiter.from_settings(quotas=QuotaCache.from_settings(settings)))"
        )
    core = getattr(limiter, "_core", None)
    if isinstance(limiter, AsyncRateLimiter) and getattr(core, "quotas", None) is None:
        raise ValueError(
            "RateLimitMiddleware: the limiter has no quota provider, so every request would "
            "be answered 403 (no quota for the tenant); give the limiter a quota provider: "
            "AsyncRateLimiter.from_settings(quotas=QuotaCache.from_settings(settings)), or "
            "AsyncRateLimiter(redis, quotas) with your own limiter.QuotaProvider"
        )


# --- the middleware -----------------------------------------------------------------------------
class RateLimitMiddleware:
    """See the module docstring. ``limiter`` is an :class:`limiter.AsyncRateLimiter` (anything
    with ``async acquire(tenant, cost=..., quota=...)`` returning a decision); ``emitter``
    anything with a non-blocking ``emit(event)``.

    ``routes`` are path templates (``/v1/tenants/{tenant}/quota``) naming the ``route``
    dimension of decision events; ``costs`` / ``meters`` map ``"/path"`` or ``"METHOD /path"``
    to a route's cost and meter. The constructor reads no settings: :meth:`from_settings` makes
    the middleware the ``RATE_LIMIT_*`` settings describe.

    An :class:`limiter.AsyncRateLimiter` without a quota provider is refused (``ValueError``:
    every request would be a 403), and so is the synchronous :class:`limiter.RateLimiter`
    (``TypeError``). Without an emitter, decisions are not emitted (nothing reaches billing);
    that is logged once, as a warning."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: AsyncLimiter,
        *,
        emitter: DecisionEmitter | None = None,
        routes: Collection[str] = (),
        costs: Mapping[str, int] | None = None,
        meters: Mapping[str, str] | None = None,
        default_cost: int = 1,
        default_meter: str = DEFAULT_METER,
        shadow: bool = False,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
        source: str = "urn:metering:api",
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_limiter(limiter)
        self.app = app
        self.limiter = limiter
        self.emitter = emitter
        #: the Emitter's pre-encoded entry point; another emitter gets the event model
        self._emit_encoded: Callable[[bytes, bytes], None] | None = getattr(
            emitter, "emit_encoded", None
        )
        self.rules = build_route_rules(
            routes, costs, meters, default_cost=default_cost, default_meter=default_meter
        )
        # With known routes, an unknown path is named "other": raw paths (ids, probes for
        # nonsense) would make the route dimension unbounded.
        self.unmatched_route = "other" if routes else None
        self.default_cost = default_cost
        self.default_meter = validate_meter(default_meter)
        if not 0 < len(source) <= MAX_SOURCE_LENGTH:
            raise ValueError(f"source must be 1-{MAX_SOURCE_LENGTH} characters")
        self.shadow = shadow
        self.exempt_paths = frozenset(exempt_paths)
        self.source = source
        self.clock = clock
        #: the limiter's estimate of the Redis server's clock (the clock of record), if it has
        #: one (:class:`limiter.clock.ServerClock`; another limiter's ``clock`` may be anything)
        server_clock = getattr(limiter, "clock", None)
        self._server_clock = server_clock if callable(getattr(server_clock, "skew", None)) else None
        self._event_templates = EventTemplates()
        self._refusals_logged: set[str] = set()  # shadow mode: unknown tenants logged once
        if emitter is None:
            log.warning(
                "RateLimitMiddleware without an emitter: its decisions are not emitted as %s "
                "events, so billing gets no usage from it%s (pass emitter=Emitter(settings), "
                "unless RATE_LIMIT_EMIT_DECISIONS=false means it)",
                TYPE_RATELIMIT,
                "; in shadow mode nothing of the trial is recorded" if shadow else "",
            )

    @classmethod
    def from_settings(
        cls,
        app: ASGIApp,
        limiter: AsyncLimiter,
        *,
        emitter: DecisionEmitter | None = None,
        routes: Collection[str] = (),
        settings: Settings | None = None,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
    ) -> RateLimitMiddleware:
        """The middleware the settings (default: the environment) describe; the one place they
        are mapped to it, the HTTP API's included: ``RATE_LIMIT_ROUTE_COSTS``,
        ``RATE_LIMIT_ROUTE_METERS``, ``RATE_LIMIT_SHADOW_MODE``, and
        ``RATE_LIMIT_EMIT_DECISIONS`` (false: ``emitter`` is not used). Also usable as the
        factory of Starlette's ``app.add_middleware(RateLimitMiddleware.from_settings, ...)``."""
        if settings is None:
            from metering.settings import get_settings

            settings = get_settings()
        return cls(
            app,
            limiter,
            emitter=emitter if settings.rate_limit_emit_decisions else None,
            routes=routes,
            costs=settings.rate_limit_route_costs,
            meters=settings.rate_limit_route_meters,
            shadow=settings.rate_limit_shadow_mode,
            exempt_paths=exempt_paths,
        )

    def route_for(self, method: str, path: str) -> tuple[str, int, str]:
        """(route name, cost, meter) for a request; unmatched paths use the defaults."""
        for rule in self.rules:
            if (rule.method is None or rule.method == method) and rule.regex.match(path):
                return rule.pattern, rule.cost, rule.meter
        # Without route templates the path names the route, cut to what a dimension holds:
        # an event the worker would dead-letter is usage lost.
        return (
            self.unmatched_route or path[:MAX_DIMENSION_VALUE],
            self.default_cost,
            self.default_meter,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        try:
            tenant = tenant_from_scope(scope)
        except InvalidIdentifier as exc:
            await send_problem(send, 400, "Bad Request", str(exc))
            return
        if tenant is None:
            await self.app(scope, receive, send)
            return
        try:
            check_tenant(tenant)  # the limiter's own check: remembered once passed
        except InvalidIdentifier:
            await send_problem(send, 400, "Bad Request", f"invalid tenant id {tenant[:80]!r}")
            return
        route, cost, meter = self.route_for(scope["method"], scope["path"])
        try:
            limiter = self.limiter
            if isinstance(limiter, AsyncRateLimiter):
                # A request cancelled (a timeout, a server's shutdown) while its call is in
                # flight: Redis still counts the decision, so it is still emitted.
                decision = await limiter.acquire(
                    tenant,
                    cost=cost,
                    on_abandoned=partial(self._emit_abandoned, tenant, cost, meter, route),
                )
            else:
                decision = await limiter.acquire(tenant, cost=cost)
        except LookupError as exc:  # limiter.quota_provider.UnknownTenant with reject policy
            if self.shadow:  # never blocks: what would have been refused is recorded instead
                self._shadow_refusal(tenant, exc)
                self._emit(tenant, _REFUSED_TENANT, cost=cost, meter=meter, route=route)
                await self.app(scope, receive, send)
                return
            await send_problem(send, 403, "Forbidden", f"unknown tenant: {exc}", "unknown-tenant")
            return
        self._emit(tenant, decision, cost=cost, meter=meter, route=route)

        if self.shadow:
            await self.app(scope, receive, send)
            return
        headers = ratelimit_headers(decision, now=self.clock() + self._skew())
        if not decision.allowed:
            reason = str(getattr(decision, "reason", ""))
            if reason in _NEVER_FITS:  # no wait helps: no Retry-After
                await send_problem(
                    send,
                    429,
                    "Too Many Requests",
                    _never_fits(tenant, cost, reason, decision),
                    "cost-exceeds-limit",
                    headers,
                )
                return
            retry = retry_after_seconds(decision)
            headers.append((b"retry-after", str(retry).encode()))
            if reason == REASON_REDIS_DOWN:
                detail = "rate limiter unavailable (Redis down, fail mode closed)"
                await send_problem(
                    send, 503, "Service Unavailable", detail, "limiter-unavailable", headers
                )
            else:
                detail = (
                    f"rate limit exceeded for tenant {tenant!r} ({reason}); retry after {retry}s"
                )
                await send_problem(send, 429, "Too Many Requests", detail, "rate-limited", headers)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _shadow_refusal(self, tenant: str, exc: LookupError) -> None:
        logged = self._refusals_logged
        if tenant in logged:
            return
        if len(logged) >= 10_000:
            logged.clear()
        logged.add(tenant)
        log.warning("shadow mode: passing on tenant %s, which would get 403 (%s)", tenant, exc)

    def _emit_abandoned(
        self, tenant: str, cost: int, meter: str, route: str, decision: Any
    ) -> None:
        """The decision of a request cancelled while the limiter's call was in flight."""
        self._emit(tenant, decision, cost=cost, meter=meter, route=route)

    def _emit(self, tenant: str, decision: Any, *, cost: int, meter: str, route: str) -> None:
        if self.emitter is None:
            return
        try:
            if self._emit_encoded is not None:  # the Emitter: hand it the encoded bytes
                value = self.decision_bytes(tenant, decision, cost, meter, route)
                self._emit_encoded(tenant.encode(), value)
            else:  # any other emitter takes the event model
                self.emitter.emit(self.decision_event(tenant, decision, cost, meter, route))
        except Exception:  # metering must never fail the request it meters
            log.exception("could not emit the decision event for tenant %s", tenant)

    def _dimensions(self, decision: Any, route: str) -> dict[str, str]:
        dimensions = {"route": route, "reason": str(getattr(decision, "reason", "ok"))[:64]}
        if getattr(decision, "degraded", False):
            dimensions["degraded"] = "true"
        if self.shadow:
            dimensions["shadow"] = "true"
        return dimensions

    def decision_bytes(
        self, tenant: str, decision: Any, cost: int, meter: str, route: str
    ) -> bytes:
        """:meth:`decision_event`, encoded as the emitter sends it; the tests decode it with the
        strict decoder. The JSON around the id and the time is made once per tenant, cost,
        meter, route, reason and outcome (:class:`metering.events_fast.EventTemplates`); each
        decision splices its own id and time in."""
        reason = str(getattr(decision, "reason", "ok"))
        allowed = bool(decision.allowed)
        key = (
            tenant,
            cost,
            meter,
            route,
            reason,
            bool(getattr(decision, "degraded", False)),
            allowed,
        )
        templates = self._event_templates
        parts = templates.get(key)
        if parts is None:
            event = self.wire_event(tenant, decision, cost, meter, route)
            parts = templates.learn(key, event)
            if parts is None:  # the encoding would differ from msgspec's: encode this one whole
                return encode_wire(event)
        return templates.splice(parts, new_decision_event_id(), self._event_time_ns(decision))

    def _skew(self) -> float:
        """Seconds to add to this host's clock for the Redis server's, when they are known to
        be more than a second apart (:meth:`limiter.clock.ServerClock.skew`)."""
        server = self._server_clock
        return server.skew() if server is not None else 0.0

    def _event_time_ns(self, decision: Any) -> int:
        """The decision event's time: now by the server's clock as far as known, within the UTC
        day the limiter counted the cost in (:func:`limiter.clock.time_in_day_ns`)."""
        now = time.time_ns()
        skew = self._skew()
        if skew:
            now += int(skew * 1e9)
        return time_in_day_ns(now, getattr(decision, "day", None))

    def wire_event(
        self, tenant: str, decision: Any, cost: int, meter: str, route: str
    ) -> WireEvent:
        """:meth:`decision_event` as the msgspec struct :func:`encode_wire` takes."""
        return WireEvent(
            SPECVERSION,
            new_decision_event_id(),
            self.source,
            TYPE_RATELIMIT,
            tenant,
            utc_from_ns(self._event_time_ns(decision)),
            FastUsageData(
                meter,
                float(cost),
                self._dimensions(decision, route),
                "allowed" if decision.allowed else "rejected",
            ),
        )

    def decision_event(
        self, tenant: str, decision: Any, cost: int, meter: str, route: str
    ) -> UsageEvent:
        """The ``metering.ratelimit`` event of one decision (what
        :func:`metering.events.decision_event` makes, field for field).

        Built without re-validating, because every part was checked before: the meter, route
        and source when the middleware was made, the tenant before the limiter was asked, the
        reason is one of the limiter's names. This runs on every request; full validation would
        cost about as much as the limiter's Redis call. ``tests/unit/test_api_ratelimit_middleware``
        decodes these events with the strict decoder to prove them valid.
        """
        data = UsageData.model_construct(
            meter=meter,
            quantity=float(cost),
            dimensions=self._dimensions(decision, route),
            decision="allowed" if decision.allowed else "rejected",
        )
        return UsageEvent.model_construct(
            specversion=SPECVERSION,
            id=new_decision_event_id(),
            source=self.source,
            type=TYPE_RATELIMIT,
            subject=tenant,
            time=utc_from_ns(self._event_time_ns(decision)),
            data=data,
        )

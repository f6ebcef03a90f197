"""``RateLimitMiddleware.from_settings``: a service embedding the middleware gets what the
``RATE_LIMIT_*`` settings say (route costs and meters, shadow mode, emitted decisions), as the
HTTP API does; and the middleware refuses, when it is made, a limiter that would fail every
request (no quota provider: all 403)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.middleware import DEFAULT_EXEMPT_PATHS, RateLimitMiddleware, build_route_rules
from metering.api.app import create_app
from metering.api.auth import PUBLIC_PATHS
from metering.api.routes_admin import UNMETERED_ADMIN_PATHS
from metering.settings import Settings, load_settings
from tests.unit.test_api_ratelimit_middleware import ListEmitter, ScriptedLimiter, decision

COSTS = {"POST /v1/things/{id}": 5, "/v1/other": 2}
METERS = {"/v1/things/{id}": "things"}


def settings_with(tmp_path: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "metering_data_dir": tmp_path,
        "jwt_secret": "x" * 32,
        "rate_limit_route_costs": COSTS,
        "rate_limit_route_meters": METERS,
        "rate_limit_shadow_mode": True,
    }
    values.update(over)
    return load_settings(**values)


async def thing(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["id"]})


class Auth(BaseHTTPMiddleware):
    """The service's own authentication: it, not the middleware, names the tenant."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        request.state.tenant_id = "acme"
        return await call_next(request)


def service(limiter: Any, emitter: Any, settings: Settings) -> Starlette:
    """A service embedding the middleware, as the README shows."""
    app = Starlette(routes=[Route("/v1/things/{id}", thing, methods=["GET", "POST"])])
    app.add_middleware(
        RateLimitMiddleware.from_settings,
        limiter=limiter,
        emitter=emitter,
        routes=["/v1/things/{id}"],
        settings=settings,
    )
    app.add_middleware(Auth)  # added last: runs first
    return app


def rate_limit_middleware(app: Any) -> RateLimitMiddleware:
    """The RateLimitMiddleware in ``app``'s middleware stack."""
    node = app.build_middleware_stack()
    while node is not None and not isinstance(node, RateLimitMiddleware):
        node = getattr(node, "app", None)
    assert node is not None, "no RateLimitMiddleware in the app"
    return node


async def test_an_embedding_service_gets_the_costs_meters_and_shadow_mode_of_the_settings(
    tmp_path: Path,
) -> None:
    limiter = ScriptedLimiter(decision(), decision(allowed=False, reason="bucket", remaining=0))
    emitter = ListEmitter()
    app = service(limiter, emitter, settings_with(tmp_path))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        posted = await c.post("/v1/things/7")
        got = await c.get("/v1/things/7")  # rejected, but shadow mode passes it on
    assert (posted.status_code, got.status_code) == (200, 200)
    assert "ratelimit" not in got.headers  # shadow mode adds no fields
    assert limiter.calls == [("acme", 5), ("acme", 1)]
    assert [
        (e.data.meter, e.data.quantity, e.data.decision, e.data.dimensions["shadow"])
        for e in emitter.events
    ] == [("things", 5.0, "allowed", "true"), ("things", 1.0, "rejected", "true")]


def test_with_decisions_not_emitted_the_emitter_is_not_used(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, rate_limit_emit_decisions=False)
    mw = RateLimitMiddleware.from_settings(
        Starlette(), ScriptedLimiter(), emitter=ListEmitter(), settings=settings
    )
    assert mw.emitter is None
    assert mw.exempt_paths == DEFAULT_EXEMPT_PATHS


@pytest.mark.parametrize("shadow", [False, True])
@pytest.mark.parametrize("emit", [False, True])
def test_the_apis_middleware_is_the_one_from_settings_makes(
    tmp_path: Path, shadow: bool, emit: bool
) -> None:
    """One mapping of settings to the middleware: the API's is what ``from_settings`` makes."""
    settings = settings_with(
        tmp_path, rate_limit_shadow_mode=shadow, rate_limit_emit_decisions=emit
    )
    limiter, emitter = ScriptedLimiter(), ListEmitter()
    api = create_app(
        settings,
        limiter=limiter,
        emitter=emitter,
        quota_store=object(),
        quota_admin=object(),
        quotas=object(),
        redis=object(),
    )
    theirs = rate_limit_middleware(api)
    templates = list(dict.fromkeys(rule.pattern for rule in theirs.rules))  # the API's routes
    assert {"/v1/events", "/v1/tenants/{tenant}/quota"} <= set(templates)
    exempt = PUBLIC_PATHS | UNMETERED_ADMIN_PATHS
    ours = RateLimitMiddleware.from_settings(
        Starlette(),
        limiter,
        emitter=emitter,
        settings=settings,
        routes=templates,
        exempt_paths=exempt,
    )

    assert theirs.limiter is limiter
    assert theirs.emitter is (emitter if emit else None)
    assert theirs.shadow is shadow
    assert theirs.exempt_paths == exempt
    assert theirs.rules == build_route_rules(templates, COSTS, METERS)
    assert theirs.route_for("POST", "/v1/things/1") == ("/v1/things/{id}", 5, "things")
    assert theirs.route_for("GET", "/v1/other") == ("/v1/other", 2, "requests")
    for name in (
        "emitter",
        "shadow",
        "exempt_paths",
        "rules",
        "unmatched_route",
        "default_cost",
        "default_meter",
        "source",
    ):
        assert getattr(theirs, name) == getattr(ours, name), name


class Quotas:
    """A quota provider that knows every tenant."""

    def get(self, tenant: str) -> Quota:
        return Quota(rate_per_sec=1.0, burst=1, daily_limit=1)

    async def aget(self, tenant: str) -> Quota:
        return self.get(tenant)

    def daily_seed(self, tenant: str, day: dt.date) -> int:
        return 0

    async def adaily_seed(self, tenant: str, day: dt.date) -> int:
        return 0


@pytest.mark.parametrize("constructor", ["__init__", "from_settings"])
def test_a_limiter_without_a_quota_provider_is_refused_when_the_middleware_is_made(
    constructor: str,
) -> None:
    """It would answer every request 403 ("no quota given ... and no quota provider set")."""
    make: Any = (
        RateLimitMiddleware if constructor == "__init__" else RateLimitMiddleware.from_settings
    )
    with pytest.raises(ValueError, match=r"no quota provider.*QuotaCache\.from_settings"):
        make(Starlette(), AsyncRateLimiter(object()), emitter=ListEmitter())
    make(Starlette(), AsyncRateLimiter(object(), Quotas()), emitter=ListEmitter())  # accepted


def test_the_synchronous_limiter_is_refused() -> None:
    """Its ``acquire`` returns a decision, not an awaitable: every request would fail."""
    limiter: Any = RateLimiter(object(), Quotas())
    with pytest.raises(TypeError, match="needs an AsyncRateLimiter"):
        RateLimitMiddleware(Starlette(), limiter, emitter=ListEmitter())


def test_a_middleware_without_an_emitter_says_once_that_nothing_is_emitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="limiter.middleware"):
        RateLimitMiddleware(Starlette(), ScriptedLimiter(), emitter=ListEmitter())
        assert not caplog.records
        RateLimitMiddleware(Starlette(), ScriptedLimiter())
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "not emitted" in record.getMessage() and "billing" in record.getMessage()

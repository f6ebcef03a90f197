"""The HTTP API: :func:`create_app` builds the FastAPI application with its middleware stack.

Request path, outermost first::

    JWTAuthMiddleware     bearer JWT -> request.state.tenant_id / scopes (401 otherwise)
    RateLimitMiddleware   one limiter decision per request -> 429 / pass, rate-limit fields,
                          a decision event through the emitter (never blocking)
    BodyLimitMiddleware   413 beyond API_MAX_BODY_BYTES
    routes                /v1/events, /v1/tenants/{tenant}/quota, /v1/limits/{tenant},
                          the query layer's /v1/usage... (when present), /metrics, /healthz, /readyz

Every error is ``application/problem+json`` (:mod:`metering.api.problems`). Whatever is passed
in (limiter, emitter, stores, clients) belongs to the caller; whatever :func:`create_app` builds
from the settings, the app closes on shutdown, flushing the emitter first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from limiter.middleware import RateLimitMiddleware
from metering.api import routes_admin, routes_events, routes_ops, routes_tenants
from metering.api.auth import PUBLIC_PATHS, JWTAuthMiddleware, TokenVerifier
from metering.api.body_limit import BodyLimitMiddleware
from metering.api.context import ApiContext
from metering.api.problems import install_problem_handlers
from metering.api.routes_admin import UNMETERED_ADMIN_PATHS
from metering.events import UsageEvent
from metering.settings import Settings, get_settings

log = logging.getLogger(__name__)

USAGE_ROUTES_MODULE = "metering.api.routes_usage"
#: FastAPI's native OpenTelemetry (tracing, metrics, logs), switched off; FastAPI releases
#: before it have no ``telemetry`` argument, and nothing to switch off
NO_TELEMETRY: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}
_FASTAPI_TELEMETRY = "telemetry" in inspect.signature(FastAPI.__init__).parameters
EMITTER_CLOSE_TIMEOUT = 10.0


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


def _build_defaults(settings: Settings, given: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Fill in what was not given from the settings; return it and what the app must close."""
    built: list[Any] = []
    out = dict(given)
    if out["redis"] is None:
        if out["limiter"] is not None and getattr(out["limiter"], "redis", None) is not None:
            out["redis"] = out["limiter"].redis
        else:
            from limiter.redis_factory import async_redis_from_settings

            out["redis"] = async_redis_from_settings(settings)
            built.append(out["redis"])
    if out["quota_store"] is None:
        from metering.quota_db import QuotaStore

        out["quota_store"] = QuotaStore(settings.quota_db_url)
        built.append(out["quota_store"])
    if out["quotas"] is None and out["limiter"] is not None:
        out["quotas"] = getattr(out["limiter"], "quotas", None)
    if out["quotas"] is None and out["limiter"] is None:
        from limiter.quotas import QuotaCache

        out["quotas"] = QuotaCache.from_settings(
            settings, store=out["quota_store"], aredis=out["redis"]
        )
        built.append(out["quotas"])
    if out["quota_admin"] is None:
        from limiter.quotas import QuotaAdmin

        out["quota_admin"] = QuotaAdmin(
            out["quota_store"],
            aredis=out["redis"],
            redis_ttl=settings.tenant_quota_cache_ttl,
            local=out["quotas"] if hasattr(out["quotas"], "apply_change") else None,
        )
    if out["limiter"] is None:
        from limiter import AsyncRateLimiter, CircuitBreaker, LocalLimiter
        from limiter.failure_policy import log_breaker_change

        out["limiter"] = AsyncRateLimiter(
            out["redis"],
            out["quotas"],
            fail_mode=settings.rate_limit_fail_mode,
            breaker=CircuitBreaker(
                settings.rate_limit_breaker_failures,
                settings.rate_limit_breaker_reset,
                on_change=log_breaker_change,
            ),
            local_limiter=LocalLimiter(settings.rate_limit_local_ceiling_per_sec),
        )
    if out["emitter"] is None:
        from metering.emitter import Emitter

        out["emitter"] = Emitter(settings)
        built.insert(0, out["emitter"])  # flushed first, while everything else still runs
    return out, built


#: how long shutdown waits for the limiter's calls in flight (their replies come within the
#: Redis socket timeout, 0.25 s by default)
_DRAIN_SECONDS = 5.0


async def _close(resource: Any) -> None:
    if hasattr(resource, "aclose"):
        await resource.aclose()
    elif hasattr(resource, "close"):
        try:
            result = resource.close(timeout=EMITTER_CLOSE_TIMEOUT)
        except TypeError:
            result = resource.close()
        await _maybe_await(result)


#: RFC 9457 problem details: the body of every error this API answers (metering.api.problems).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "urn:metering:problem:<slug> or about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "what was wrong, naming the field or value"},
        "errors": {
            "type": "array",
            "items": {"type": "object"},
            "description": "per-item errors of a batch, by index",
        },
    },
    "additionalProperties": True,
}
_PROBLEM_CONTENT = {
    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
}
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _openapi_with_events(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus ``UsageEvent`` (the ingest body is read by hand, not declared),
    with the errors as the API answers them: problem+json (:func:`_problem_responses`)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    event_schema = UsageEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(event_schema.pop("$defs", {}))
    components["UsageEvent"] = event_schema
    _problem_responses(schema)
    app.openapi_schema = schema
    return schema


def _problem_responses(schema: dict[str, Any]) -> None:
    """Every error answer as the API gives it: ``application/problem+json``, never FastAPI's
    default 422 body (``{"detail": [...]}``, which this API does not send); and the answers
    the middlewares give every route: 401 (a missing or bad token), 429 (the rate limit) and
    503 (a store down), on the routes they apply to."""
    exempt = PUBLIC_PATHS | UNMETERED_ADMIN_PATHS
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if path not in PUBLIC_PATHS:
                responses.setdefault("401", {"description": "no token, or one that did not verify"})
                responses.setdefault(
                    "503", {"description": "a store it needs is unavailable; retry later"}
                )
            if path not in exempt:
                responses.setdefault(
                    "429", {"description": "the tenant's rate limit or daily quota is used up"}
                )
            for status, response in responses.items():
                if status[:1] in ("4", "5"):
                    response["content"] = dict(_PROBLEM_CONTENT)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)


def telemetry_argument(opentelemetry: bool) -> dict[str, Any]:
    """FastAPI's keyword arguments for its native OpenTelemetry: none (FastAPI's default: the
    global providers, asked on every request) when ``opentelemetry``, else switched off."""
    if _FASTAPI_TELEMETRY and not opentelemetry:
        return {"telemetry": NO_TELEMETRY}
    return {}


def create_app(
    settings: Settings | None = None,
    *,
    limiter: Any = None,
    emitter: Any = None,
    quota_store: Any = None,
    quota_admin: Any = None,
    clickhouse: Any = None,
    quotas: Any = None,
    redis: Any = None,
    verifier: TokenVerifier | None = None,
) -> FastAPI:
    """The API application. Anything not given is built from ``settings`` (default: the
    environment) and closed by the app on shutdown. Raises :class:`metering.settings.SettingsError`
    when the settings cannot authenticate anyone (neither ``JWT_SECRET`` nor ``JWT_PUBLIC_KEY``).
    """
    settings = settings or get_settings()
    verifier = verifier or TokenVerifier.from_settings(settings)
    parts, owned = _build_defaults(
        settings,
        {
            "limiter": limiter,
            "emitter": emitter,
            "quota_store": quota_store,
            "quota_admin": quota_admin,
            "quotas": quotas,
            "redis": redis,
        },
    )
    context = ApiContext(settings=settings, clickhouse=clickhouse, **parts)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if parts["quotas"] in owned and hasattr(parts["quotas"], "astart"):
            await parts["quotas"].astart()  # quota changes apply at once (pub/sub)
        try:
            yield
        finally:
            # uvicorn cancels the requests still running when its graceful shutdown times
            # out, then runs this at once: the decisions Redis made for them are handed over
            # (on_abandoned) when its replies arrive, and must reach the emitter before it
            # closes (it is the first to close).
            drain = getattr(parts["limiter"], "drain", None)
            if drain is not None:
                try:
                    if not await drain(_DRAIN_SECONDS):
                        log.warning(
                            "shutdown: limiter calls still unanswered after %s s; the "
                            "decisions of requests cancelled with them may go unemitted",
                            _DRAIN_SECONDS,
                        )
                except Exception:
                    log.exception("draining the limiter failed")
            for resource in owned:
                try:
                    await _close(resource)
                except Exception:  # shutting down: log and go on closing the rest
                    log.exception("closing %r failed", resource)

    app = FastAPI(
        title="Usage metering API",
        version="0.1.0",
        description="Rate limits, quotas, usage events and usage queries per tenant.",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry asks the global providers, on every request, whether
        # anyone configured them: ~3.6 us of a trivial request's ~65 (bench_api_stack.py). The
        # service's metrics are Prometheus'; tracing is the operator's opt-in.
        **telemetry_argument(settings.api_opentelemetry),
    )
    app.state.context = context
    install_problem_handlers(app)
    routers = [routes_ops.router, routes_events.router, routes_tenants.router, routes_admin.router]
    if importlib.util.find_spec(USAGE_ROUTES_MODULE) is not None:
        routers.append(importlib.import_module(USAGE_ROUTES_MODULE).router)
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: _openapi_with_events(app)  # type: ignore[method-assign]

    templates = [r.path for router in routers for r in router.routes if isinstance(r, APIRoute)]
    # add_middleware wraps: the last added runs first.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(
        RateLimitMiddleware.from_settings,  # RATE_LIMIT_ROUTE_COSTS, _ROUTE_METERS, _SHADOW_MODE...
        limiter=parts["limiter"],
        emitter=parts["emitter"],
        routes=templates,
        settings=settings,
        # Operator tooling is not tenant usage: reconciling must not add to what it compares.
        exempt_paths=PUBLIC_PATHS | UNMETERED_ADMIN_PATHS,
    )
    app.add_middleware(JWTAuthMiddleware, verifier=verifier, public_paths=PUBLIC_PATHS)
    return app

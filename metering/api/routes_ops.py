"""Operations endpoints, open without credentials and never rate limited: ``/healthz``
(the process runs), ``/readyz`` (it can decide: Redis and the quota DB answer; Kafka is not
required, events wait in the emitter's spool) and ``/metrics`` (Prometheus).

With ``RATE_LIMIT_FAIL_MODE=open`` an instance without Redis still serves (its limiter lets
requests through within the local ceiling), so ``/readyz`` answers 200 with Redis reported
``degraded: <kind>``: a readiness-gated load balancer must not take every instance out during a
Redis outage, which would turn fail-open into fail-closed. With ``closed`` every request would be
refused, and ``/readyz`` answers 503."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text

from metering.api.context import api_context
from metering.api.problems import (
    PROBLEM_JSON,
    StoreFailureRoute,
    log_store_failure,
    problem_body,
)

router = APIRouter(tags=["operations"], route_class=StoreFailureRoute)

READY_TIMEOUT = 2.0
#: each readiness check's store, as the operator's log names it
STORE_NAMES = {"redis": "Redis", "quota_db": "the quota DB"}


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check_redis(redis: Any) -> None:
    await asyncio.wait_for(redis.ping(), READY_TIMEOUT)


def _check_db(store: Any) -> None:
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get(
    "/readyz",
    summary="Readiness: Redis and the quota DB answer (Redis down is degraded when fail-open)",
)
async def readyz(request: Request) -> Response:
    ctx = api_context(request)
    # The limiter's own fail mode (one given to create_app may differ from the settings').
    policy = getattr(ctx.limiter, "policy", None)
    fail_mode = getattr(policy, "fail_mode", None)
    if fail_mode not in ("open", "closed"):
        fail_mode = ctx.settings.rate_limit_fail_mode
    checks: dict[str, str] = {}
    for name, probe in (
        ("redis", lambda: _check_redis(ctx.redis)),
        (
            "quota_db",
            lambda: asyncio.wait_for(asyncio.to_thread(_check_db, ctx.quota_store), READY_TIMEOUT),
        ),
    ):
        try:
            await probe()
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready", reported by name
            # Anyone may ask: the answer names the check and the kind of failure, never the
            # store's address or error text, which go to the log (throttled).
            degraded = name == "redis" and fail_mode == "open"
            checks[name] = f"{'degraded' if degraded else 'failed'}: {type(exc).__name__}"
            log_store_failure(STORE_NAMES[name], exc, ctx.settings)
    failed = ", ".join(k for k, v in checks.items() if v.startswith("failed"))
    if not failed:
        status = "ready" if all(v == "ok" for v in checks.values()) else "degraded"
        return JSONResponse({"status": status, "checks": checks})
    body = problem_body(503, f"not ready: {failed}", checks=checks)
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

"""Operator endpoints (admin scope). ``GET /v1/admin/reconcile``: the three sources of a day's
usage side by side (see :mod:`metering.reconcile`). Served by the API so that it also works in
embedded mode, where the running process owns the ClickHouse data folder."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from metering import reconcile
from metering.api.auth import AdminPrincipal
from metering.api.context import api_context
from metering.api.problems import Problem, StoreFailureRoute

router = APIRouter(tags=["operations"], route_class=StoreFailureRoute)

#: Authenticated and admin-only, but never rate limited or metered (see create_app).
UNMETERED_ADMIN_PATHS = frozenset({"/v1/admin/reconcile"})


@router.get("/v1/admin/reconcile", summary="Compare Redis counters, ClickHouse and the quota DB")
async def reconcile_day(
    request: Request,
    principal: AdminPrincipal,
    day: Annotated[dt.date | None, Query(description="UTC day, default today")] = None,
) -> dict[str, Any]:
    day = day or dt.datetime.now(dt.UTC).date()
    if abs((dt.datetime.now(dt.UTC).date() - day).days) > 400:
        raise Problem(400, f"day {day.isoformat()} is outside the retention", slug="bad-request")
    ctx = api_context(request)
    settings = ctx.settings
    redis_counts = await reconcile.aredis_daily_counters(ctx.redis, day)
    loop = asyncio.get_running_loop()
    ch = await loop.run_in_executor(
        None,
        lambda: reconcile.clickhouse_daily_totals(
            ctx.clickhouse_client(),
            settings.clickhouse_database,
            day,
            settings.worker_backfill_meter,
            settings.worker_backfill_measure,
        ),
    )
    db = await loop.run_in_executor(None, ctx.quota_store.daily_usage_for_day, day)
    # After the scan: a counter that expired during it is missing as designed. By the Redis
    # server's clock, which expires them.
    expired = reconcile.counters_expired(day, await reconcile.aredis_now(ctx.redis))
    rows = reconcile.compare(redis_counts, ch, db, counters_expired=expired)
    return {
        "day": day.isoformat(),
        "measure": settings.worker_backfill_measure,
        "meter": settings.worker_backfill_meter,
        "tenants": [r.as_dict() for r in rows],
        "drifted": sum(1 for r in rows if not r.agrees),
    }

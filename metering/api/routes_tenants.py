"""A tenant's quota (``GET``/``PUT /v1/tenants/{tenant}/quota``) and its live limiter state
(``GET /v1/limits/{tenant}``).

Isolation: a tenant reads only its own quota and limits; changing a quota needs the admin scope.
A change goes through :class:`limiter.quotas.QuotaAdmin`: the DB, then the Redis cache entry,
then a publish on ``tenant_quota_invalidate`` that every process's quota cache applies at once,
so it takes effect everywhere within a second, not after the cache TTL. When Redis cannot be
told, the change is stored all the same and the answer says so (``"propagated": false``, a
``warning`` and a ``Warning`` header, as ``metering tenants set`` warns): the publish is retried
in the background, and other processes may serve the old quota until it succeeds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from limiter.keys import daily_counter_key, token_bucket_key, window_log_key, window_meta_key
from limiter.quotas import unpublished_warning
from metering.api.auth import (
    AdminPrincipal,
    CurrentPrincipal,
    authorize_tenant,
    bearer_scheme,
)
from metering.api.context import api_context
from metering.api.problems import Problem, StoreFailureRoute, store_problem
from metering.ids import TENANT_ID_MAX
from metering.plans import MAX_LIMIT, MAX_WINDOW_SECONDS, PLANS, QuotaError, plan_limits

router = APIRouter(
    tags=["tenants"], dependencies=[Depends(bearer_scheme)], route_class=StoreFailureRoute
)

TenantPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=TENANT_ID_MAX,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="tenant id",
    ),
]


class QuotaIn(BaseModel):
    """A tenant's limits, replaced as a whole (omit the window pair to have no window). The
    limits are strict: JSON numbers, never a string or a boolean coerced into one."""

    model_config = ConfigDict(extra="forbid")

    rate_per_sec: StrictFloat = Field(gt=0, le=MAX_LIMIT, allow_inf_nan=False)
    burst: StrictInt = Field(ge=1, le=MAX_LIMIT)
    daily_limit: StrictInt = Field(ge=1, le=MAX_LIMIT)
    window_limit: StrictInt | None = Field(None, ge=1, le=MAX_LIMIT)
    window_seconds: StrictInt | None = Field(None, ge=1, le=MAX_WINDOW_SECONDS)
    plan: str | None = Field(None, description=f"one of {', '.join(PLANS)}")


class QuotaOut(BaseModel):
    tenant: str
    plan: str
    rate_per_sec: float
    burst: int
    daily_limit: int
    window_limit: int | None
    window_seconds: int | None
    version: int = Field(description="grows on every change; 0: no row, the default plan applies")
    is_default: bool = Field(description="true when the tenant has no quota of its own")
    updated_at: dt.datetime | None = None


class QuotaChangeOut(QuotaOut):
    propagated: bool = Field(
        description="false when Redis could not be told: the change is stored and its publish "
        "is retried in the background; other processes may serve the old quota until then"
    )
    warning: str | None = Field(None, description="why ``propagated`` is false")


def _quota_out(tenant: str, record: Any, default_plan: str) -> QuotaOut:
    if record is None:
        lim = plan_limits(default_plan)
        return QuotaOut(
            tenant=tenant,
            plan=default_plan,
            rate_per_sec=lim.rate_per_sec,
            burst=lim.burst,
            daily_limit=lim.daily_limit,
            window_limit=lim.window_limit,
            window_seconds=lim.window_seconds,
            version=0,
            is_default=True,
        )
    lim = record.limits
    return QuotaOut(
        tenant=tenant,
        plan=record.plan,
        rate_per_sec=lim.rate_per_sec,
        burst=lim.burst,
        daily_limit=lim.daily_limit,
        window_limit=lim.window_limit,
        window_seconds=lim.window_seconds,
        version=record.version,
        is_default=False,
        updated_at=record.updated_at,
    )


@router.get("/v1/tenants/{tenant}/quota", response_model=QuotaOut, summary="Read a quota")
async def get_quota(
    request: Request,
    tenant: TenantPath,
    principal: CurrentPrincipal,
) -> QuotaOut:
    tenant = authorize_tenant(principal, tenant)
    ctx = api_context(request)
    record = await asyncio.to_thread(ctx.quota_store.get_tenant, tenant)
    return _quota_out(tenant, record, ctx.settings.quota_default_plan)


@router.put(
    "/v1/tenants/{tenant}/quota",
    response_model=QuotaChangeOut,
    summary="Change a quota (admin); effective everywhere within a second",
)
async def put_quota(
    request: Request,
    response: Response,
    body: QuotaIn,
    tenant: TenantPath,
    principal: AdminPrincipal,
) -> QuotaChangeOut:
    tenant = authorize_tenant(principal, tenant)
    ctx = api_context(request)
    changes = body.model_dump()
    admin = ctx.quota_admin
    try:
        if hasattr(admin, "aset_quota"):
            record = await admin.aset_quota(tenant, **changes)
        else:
            result = admin.set_quota(tenant, **changes)
            record = await result if inspect.isawaitable(result) else result
    except QuotaError as exc:
        raise Problem(422, str(exc), slug="invalid-quota") from None
    # Read with no await since the change returned: QuotaAdmin sets it last, so it is this
    # change's outcome. An admin that does not report it is taken to have published.
    propagated = bool(getattr(admin, "last_published", True))
    warning = None
    if not propagated:
        settings = ctx.settings
        warning = unpublished_warning(
            settings.quota_local_ttl, settings.tenant_quota_cache_ttl, retrying=True
        )
        response.headers["Warning"] = f'199 metering "{warning}"'
    out = _quota_out(tenant, record, ctx.settings.quota_default_plan)
    return QuotaChangeOut(**out.model_dump(), propagated=propagated, warning=warning)


class BucketState(BaseModel):
    capacity: int
    rate_per_sec: float
    tokens: float = Field(description="tokens now, refilled up to this instant")


class DailyState(BaseModel):
    day: dt.date
    limit: int
    used: int
    remaining: int
    reset_at: dt.datetime


class WindowState(BaseModel):
    limit: int
    seconds: int
    used: int


class LimitsOut(BaseModel):
    tenant: str
    at: dt.datetime = Field(description="the Redis server's time, the clock of record")
    bucket: BucketState
    daily: DailyState
    window: WindowState | None = None


def _num(raw: Any, default: float = 0.0) -> float:
    try:
        return float(raw) if raw is not None else default
    except (TypeError, ValueError):
        return default


def _window_used(raw_sum: Any, expired: list[Any]) -> int:
    """The units in the rolling window now: the stored sum less the entries that have left it
    since the last acquire (which prunes them: ``limiter/acquire.lua``). Entries are
    ``<seq>:<cost>``."""
    gone = 0
    for member in expired:
        text = member.decode() if isinstance(member, bytes) else str(member)
        gone += int(_num(text.rpartition(":")[2]))
    return max(0, int(_num(raw_sum)) - gone)


@router.get(
    "/v1/limits/{tenant}",
    response_model=LimitsOut,
    summary="The tenant's live token bucket and daily counter",
)
async def get_limits(
    request: Request,
    tenant: TenantPath,
    principal: CurrentPrincipal,
) -> LimitsOut:
    tenant = authorize_tenant(principal, tenant)
    ctx = api_context(request)
    try:
        quota = await ctx.quotas.aget(tenant) if ctx.quotas is not None else None
    except LookupError as exc:  # limiter.quota_provider.UnknownTenant (reject policy)
        raise Problem(404, str(exc), slug="unknown-tenant") from None
    if quota is None:
        lim = plan_limits(ctx.settings.quota_default_plan)
        rate, burst, daily_limit = lim.rate_per_sec, lim.burst, lim.daily_limit
        window_limit, window_seconds = lim.window_limit, lim.window_seconds
    else:
        rate, burst, daily_limit = quota.rate_per_sec, quota.burst, quota.daily_limit
        window_limit, window_seconds = quota.window_limit, quota.window_seconds
    try:
        seconds, micros = await ctx.redis.time()
        now = dt.datetime.fromtimestamp(int(seconds) + int(micros) / 1e6, dt.UTC)
        day = now.date()
        tokens_raw, ts_raw = await ctx.redis.hmget(token_bucket_key(tenant), ["tokens", "ts"])
        used_raw = await ctx.redis.get(daily_counter_key(tenant, day))
        window_used = None
        if window_limit and window_seconds:
            window_used = _window_used(
                await ctx.redis.hget(window_meta_key(tenant), "sum"),
                # what the next acquire would drop: the entries that have left the window
                await ctx.redis.zrangebyscore(
                    window_log_key(tenant),
                    "-inf",
                    int(seconds) * 1_000_000 + int(micros) - window_seconds * 1_000_000,
                ),
            )
    except Exception as exc:  # redis.RedisError, OSError: report, do not 500
        problem = store_problem(
            exc,
            ctx.settings,
            detail="live limits unavailable: Redis is unavailable; try again later",
            slug="redis-down",
            store="Redis",
        )
        assert problem is not None  # a store is named
        raise problem from None
    if tokens_raw is None or ts_raw is None:
        tokens = float(burst)
    else:
        elapsed = max(0.0, now.timestamp() * 1e6 - _num(ts_raw)) / 1e6
        tokens = min(float(burst), _num(tokens_raw) + elapsed * rate)
    used = int(_num(used_raw))
    reset_at = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    return LimitsOut(
        tenant=tenant,
        at=now,
        bucket=BucketState(capacity=burst, rate_per_sec=rate, tokens=round(tokens, 3)),
        daily=DailyState(
            day=day,
            limit=daily_limit,
            used=used,
            remaining=max(0, daily_limit - used),
            reset_at=reset_at,
        ),
        window=WindowState(limit=window_limit, seconds=window_seconds, used=window_used)
        if window_limit and window_seconds and window_used is not None
        else None,
    )

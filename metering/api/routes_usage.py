"""Usage and billing reads: ``GET /v1/usage``, ``/v1/usage/sliding``, ``/v1/usage/top``,
``/v1/billing/{tenant}/{yyyy-mm}``.

Tenant isolation: a caller reads its own tenant; an admin (scope ``metering:admin``) names any
tenant with the ``tenant`` query parameter (or the path, for billing). ``/v1/usage/top`` ranks
all tenants, so it is admin-only. Every parameter is validated by the query layer before any SQL
runs; a bad one is a 422 problem naming it. Routes are plain ``def``: the ClickHouse client
blocks, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from metering.api.auth import AdminPrincipal, CurrentPrincipal, Principal, authorize_tenant
from metering.api.context import api_context
from metering.api.problems import Problem, StoreFailureRoute
from metering.billing import billing_statement
from metering.events import RFC3339_OFFSET, RFC3339_SECONDS
from metering.queries import UsageQueries
from metering.query_sql import (
    MAX_SLIDING_MINUTES,
    MAX_SLIDING_POINTS,
    MAX_TOP,
    Aggregation,
    DecisionFilter,
    QueryError,
    UsageQuery,
    Window,
)

router = APIRouter(tags=["usage"], route_class=StoreFailureRoute)

# Microseconds at most: what a query bound can mean (the event parser takes nanoseconds).
_RFC3339_RE = re.compile(rf"{RFC3339_SECONDS}(\.\d{{1,6}})?{RFC3339_OFFSET}", re.ASCII)
MAX_FILTER_PARAMS = 200


def _invalid(exc: QueryError, path_params: frozenset[str] = frozenset()) -> Problem:
    """A 422 naming the parameter, located as FastAPI locates its own: ``path.<name>`` for the
    route's ``path_params``, ``query.<name>`` for the rest."""
    where = "path" if exc.param in path_params else "query"
    return Problem(
        422,
        str(exc),
        slug="invalid-query",
        errors=[{"location": f"{where}.{exc.param}", "message": exc.message}],
    )


def _plus_decoded(value: str) -> bool:
    """``value`` is an RFC 3339 time whose offset's ``+`` was sent unencoded: a query string
    decodes ``+`` to a space, so ``...T00:00:00+01:00`` arrives as ``...T00:00:00 01:00``."""
    head, sep, offset = value.rpartition(" ")
    return bool(sep) and _RFC3339_RE.fullmatch(f"{head}+{offset}") is not None


def _instant(value: str, param: str) -> datetime:
    if not _RFC3339_RE.fullmatch(value):
        if _plus_decoded(value):
            raise QueryError(
                param,
                f"{value!r} has a space where its offset's '+' was: a '+' in a query string"
                " means a space, so send it encoded as %2B (e.g. 2026-03-01T00:00:00%2B01:00)",
            )
        raise QueryError(
            param, "must be an RFC 3339 time with an offset, e.g. 2026-03-01T00:00:00Z"
        )
    try:
        return datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError as exc:
        raise QueryError(param, f"is not a valid time ({exc})") from None


def _filters(raw: list[str]) -> dict[str, list[str]]:
    if len(raw) > MAX_FILTER_PARAMS:
        raise QueryError("filter", f"at most {MAX_FILTER_PARAMS} filter parameters")
    out: dict[str, list[str]] = {}
    for item in raw:
        name, sep, value = item.partition("=")
        if not sep:
            raise QueryError("filter", f"must be dimension=value, not {item[:80]!r}")
        out.setdefault(name, []).append(value)
    return out


def _names(raw: list[str]) -> list[str]:
    """Repeated and comma-separated forms (``group_by=a&group_by=b``, ``group_by=a,b``)."""
    return [name for item in raw for name in item.split(",") if name]


def _tenant_for(principal: Principal, tenant: str | None) -> str:
    return principal.tenant_id if tenant is None else authorize_tenant(principal, tenant)


def usage_queries(request: Request) -> UsageQueries:
    """The query layer over the app's ClickHouse client and configured database."""
    context = api_context(request)
    return UsageQueries(context.clickhouse_client(), context.settings.clickhouse_database)


# --- response shapes (OpenAPI) -------------------------------------------------------------------


class UsageRowOut(BaseModel):
    window_start: str
    window_end: str
    value: float
    group: dict[str, str | None]


class UsageOut(BaseModel):
    tenant: str
    meter: str
    window: Window | None
    aggregation: Aggregation
    tz: str
    from_: str = Field(alias="from")
    to: str
    data: list[UsageRowOut]


class SlidingPointOut(BaseModel):
    window_start: str
    window_end: str
    value: float


class SlidingOut(BaseModel):
    tenant: str
    meter: str
    minutes: int
    aggregation: Aggregation
    data: list[SlidingPointOut]


class TenantValueOut(BaseModel):
    tenant: str
    value: float


class TopOut(BaseModel):
    meter: str
    window_start: str
    window_end: str
    aggregation: Aggregation
    data: list[TenantValueOut]


class StatementLineOut(BaseModel):
    meter: str
    quantity: float
    events: int


class StatementOut(BaseModel):
    tenant: str
    month: str
    tz: str
    period_start: str
    period_end: str
    lines: list[StatementLineOut]


# --- routes --------------------------------------------------------------------------------------

TenantParam = Annotated[
    str | None, Query(description="another tenant's id (admins only); default: the caller")
]
MeterParam = Annotated[str, Query(description="meter name, e.g. requests")]
DecisionParam = Annotated[
    DecisionFilter,
    Query(description="billable usage (default), rejected limiter decisions, or all"),
]


@router.get(
    "/v1/usage",
    response_model=UsageOut,
    responses={422: {"description": "a parameter is invalid (problem+json names it)"}},
)
def get_usage(
    request: Request,
    principal: CurrentPrincipal,
    meter: MeterParam,
    from_: Annotated[str, Query(alias="from", description="RFC 3339, inclusive")],
    to: Annotated[str, Query(description="RFC 3339, exclusive")],
    window: Annotated[Window | None, Query(description="omit for one total")] = None,
    tz: Annotated[str, Query(description="IANA time zone of the windows")] = "UTC",
    aggregation: Aggregation = Aggregation.SUM,
    group_by: Annotated[list[str], Query(description="dimension names")] = [],  # noqa: B006
    filter_: Annotated[
        list[str], Query(alias="filter", description="dimension=value; repeat to OR values")
    ] = [],  # noqa: B006
    decision: DecisionParam = DecisionFilter.BILLABLE,
    tenant: TenantParam = None,
) -> Any:
    """Usage of a meter over ``[from, to)`` by window, time zone, group and aggregation."""
    who = _tenant_for(principal, tenant)
    try:
        q = UsageQuery(
            tenant=who,
            meter=meter,
            start=_instant(from_, "from"),
            end=_instant(to, "to"),
            window=window,
            tz=tz,
            aggregation=aggregation,
            group_by=tuple(_names(group_by)),
            filters=_filters(filter_),
            decision=decision,
        )
        return JSONResponse(usage_queries(request).usage(q).to_dict())
    except QueryError as exc:
        raise _invalid(exc) from None


@router.get("/v1/usage/sliding", response_model=SlidingOut)
def get_sliding_usage(
    request: Request,
    principal: CurrentPrincipal,
    meter: MeterParam,
    minutes: Annotated[int, Query(ge=1, le=MAX_SLIDING_MINUTES, description="window, N")] = 60,
    points: Annotated[
        int, Query(ge=1, le=MAX_SLIDING_POINTS, description="rolling values, one per minute")
    ] = 1,
    aggregation: Annotated[Aggregation, Query(description="SUM or COUNT")] = Aggregation.SUM,
    decision: DecisionParam = DecisionFilter.BILLABLE,
    tenant: TenantParam = None,
) -> Any:
    """Rolling totals over the last N minutes (the current minute included), per minute."""
    who = _tenant_for(principal, tenant)
    try:
        result = usage_queries(request).sliding(
            who, meter, minutes, points=points, aggregation=aggregation, decision=decision
        )
    except QueryError as exc:
        raise _invalid(exc) from None
    return JSONResponse(result.to_dict())


@router.get("/v1/usage/top", response_model=TopOut)
def get_top_tenants(
    request: Request,
    principal: AdminPrincipal,
    meter: MeterParam,
    minutes: Annotated[int, Query(ge=1, le=MAX_SLIDING_MINUTES)] = 60,
    limit: Annotated[int, Query(ge=1, le=MAX_TOP)] = 10,
    aggregation: Annotated[Aggregation, Query(description="SUM or COUNT")] = Aggregation.SUM,
    decision: DecisionParam = DecisionFilter.BILLABLE,
) -> Any:
    """The tenants with the most usage over the last N minutes (admins only)."""
    try:
        result = usage_queries(request).top_tenants(
            meter, minutes, limit, aggregation=aggregation, decision=decision
        )
    except QueryError as exc:
        raise _invalid(exc) from None
    return JSONResponse(result.to_dict())


def _wants_csv(accept: str) -> bool:
    """CSV iff ``text/csv`` is acceptable and preferred to JSON (q-values); JSON otherwise."""
    best: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best[media.lower()] = max(q, best.get(media.lower(), 0.0))
    csv_q = best.get("text/csv", 0.0)
    json_q = max(best.get("application/json", 0.0), best.get("application/*", 0.0))
    return csv_q > 0 and csv_q > json_q


#: The billing route's path parameters: a bad one is reported at ``path.<name>``.
BILLING_PATH_PARAMS = frozenset({"tenant", "month"})


@router.get(
    "/v1/billing/{tenant}/{month}",
    response_model=StatementOut,
    responses={200: {"content": {"text/csv": {}}}},
)
def get_billing_statement(
    request: Request,
    principal: CurrentPrincipal,
    tenant: Annotated[str, Path(description="tenant id")],
    month: Annotated[str, Path(description="YYYY-MM")],
    tz: Annotated[str, Query(description="IANA time zone of the tenant's month")] = "UTC",
) -> Any:
    """A month's statement per meter: JSON, or CSV with ``Accept: text/csv``."""
    who = authorize_tenant(principal, tenant)
    try:
        statement = billing_statement(usage_queries(request), who, month, tz)
    except QueryError as exc:
        raise _invalid(exc, BILLING_PATH_PARAMS) from None
    if _wants_csv(request.headers.get("accept", "")):
        return Response(
            statement.to_csv(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{who}-{month}.csv"'},
        )
    return JSONResponse(statement.to_dict())

"""Per tenant per UTC day usage totals, from rollups of the deduplicated ``usage_events``: what
the worker backfills into ``tenant_daily_usage`` and what ``metering reconcile`` compares with
it and with the limiter's daily counters (one definition for all three).

Two measures (``WORKER_BACKFILL_MEASURE``):

- ``decisions`` (the default): the quantity of the limiter's allowed decisions on every meter,
  those made without Redis (``degraded``) left out, from ``decisions_day``. That is what the
  daily counter ``rl:{tenant}:day:YYYYMMDD`` counts (each allowed decision's cost, whatever its
  route's meter; a settled decision's event carries its settled cost), so a lost counter is
  seeded with what it held, and the counters, ClickHouse and the quota DB agree once the
  pipeline has caught up. A tenant's own ``metering.usage`` events count towards billing, not
  towards its daily limit.
- ``meter``: the billable quantity of one meter (``WORKER_BACKFILL_METER``), whatever the
  events' type, from ``usage_day``: for services that meter usage with ``metering.usage``
  events of their own instead of emitting the limiter's decisions.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final, Literal

from metering.clickhouse.schema import checked_database

Measure = Literal["decisions", "meter"]
DECISIONS: Final = "decisions"
METER: Final = "meter"
MEASURES: Final = (DECISIONS, METER)


def daily_billable_totals(
    client: Any, database: str, *, meter: str, since: dt.date, until: dt.date | None = None
) -> list[tuple[str, dt.date, float]]:
    """(tenant, UTC day, billable quantity of ``meter``) for every day in ``[since, until)``
    (``until`` open-ended when None)."""
    checked_database(database)
    until_clause = " AND bucket < {until:Date}" if until is not None else ""
    result = client.query(
        f"SELECT tenant, toDate(bucket) AS day, sum(quantity_sum)"  # noqa: S608
        f" FROM {database}.usage_day"
        f" WHERE billable = 1 AND meter = {{m:String}} AND bucket >= {{since:Date}}"
        f"{until_clause} GROUP BY tenant, day ORDER BY tenant, day",
        parameters={"m": meter, "since": since, "until": until},
    )
    return [(tenant, day, float(total)) for tenant, day, total in result.result_rows]


def daily_allowed_decisions(
    client: Any, database: str, *, since: dt.date, until: dt.date | None = None
) -> list[tuple[str, dt.date, float]]:
    """(tenant, UTC day, quantity of its allowed limiter decisions made by Redis, every meter)
    for every day in ``[since, until)`` (``until`` open-ended when None)."""
    checked_database(database)
    until_clause = " AND bucket < {until:Date}" if until is not None else ""
    where = (
        f" WHERE decision = 'allowed' AND degraded = 0 AND bucket >= {{since:Date}}{until_clause}"
    )
    # The view's rows, and the totals of the rows stored before it (migration 007's fill).
    result = client.query(
        f"SELECT tenant, toDate(bucket) AS day, sum(q) FROM ("  # noqa: S608
        f" SELECT tenant, bucket, quantity_sum AS q FROM {database}.decisions_day{where}"
        f" UNION ALL SELECT tenant, bucket, quantity_sum AS q"
        f" FROM {database}.decisions_day_filled FINAL{where}"
        f") GROUP BY tenant, day ORDER BY tenant, day",
        parameters={"since": since, "until": until},
    )
    return [(tenant, day, float(total)) for tenant, day, total in result.result_rows]


def daily_totals(
    client: Any,
    database: str,
    *,
    measure: Measure,
    meter: str,
    since: dt.date,
    until: dt.date | None = None,
) -> list[tuple[str, dt.date, float]]:
    """(tenant, UTC day, total) by ``measure``: :func:`daily_allowed_decisions` for
    ``"decisions"``, :func:`daily_billable_totals` of ``meter`` for ``"meter"``."""
    if measure == DECISIONS:
        return daily_allowed_decisions(client, database, since=since, until=until)
    if measure == METER:
        return daily_billable_totals(client, database, meter=meter, since=since, until=until)
    raise ValueError(f"unknown measure {measure!r}: one of {', '.join(MEASURES)}")


def measure_key(measure: Measure, meter: str) -> str:
    """What a total counts, as the quota DB records it beside the total
    (``tenant_daily_usage.measure``): ``decisions``, or ``meter:<name>``."""
    return DECISIONS if measure == DECISIONS else f"{METER}:{meter}"


def describe_measure(measure: str, meter: str) -> str:
    """What ``measure`` totals, in a few words (reconcile's report says which it compared)."""
    if measure == METER:
        return f"billable usage of meter {meter!r}"
    return "allowed limiter decisions, every meter"

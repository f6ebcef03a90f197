"""Per tenant per UTC day billable totals of one meter, from the ``usage_day`` rollup of the
deduplicated ``usage_events``: what the worker backfills into ``tenant_daily_usage`` and what
``metering reconcile`` compares it with (one definition for both)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from metering.clickhouse.schema import checked_database


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

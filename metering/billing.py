"""Billing statements: a tenant's billable usage per meter for a calendar month, as JSON or CSV.

The month is the tenant's: ``[local midnight of the 1st, local midnight of the next 1st)`` in
its IANA time zone (UTC by default), so a Europe/Berlin March has 743 hours. Only billable rows
count (rejected limiter decisions never do). The rows are deduplicated by event id before they
reach ClickHouse (the sink's contract) and the rollups are fed from them, so a statement read
from the rollups equals one read from the raw events (``tests/integration/test_billing.py``).

Quantities are Float64 sums; a statement shows each rounded to :data:`QUANTITY_DECIMALS`
decimals, so the figure does not depend on the order ClickHouse happened to add in.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import zoneinfo
from dataclasses import dataclass
from typing import Any

from metering.queries import UsageQueries, rfc3339
from metering.query_sql import EARLIEST, LATEST_TIME, QueryError, validate_tz

QUANTITY_DECIMALS = 9
_MONTH_RE = re.compile(r"([0-9]{4})-([0-9]{2})")  # ASCII digits: \d takes any script's
CSV_COLUMNS = ("tenant", "month", "tz", "period_start", "period_end", "meter", "quantity", "events")


def month_period(month: str, tz: str = "UTC") -> tuple[dt.datetime, dt.datetime]:
    """The local-midnight bounds of ``month`` (``YYYY-MM``) in ``tz``, as aware datetimes."""
    tz = validate_tz(tz)
    m = _MONTH_RE.fullmatch(month) if isinstance(month, str) else None
    if not m or not 1 <= int(m[2]) <= 12 or not 1970 <= int(m[1]) <= 2099:
        raise QueryError("month", f"must be YYYY-MM between 1970-01 and 2099-12, not {month!r}")
    year, mon = int(m[1]), int(m[2])
    zone = zoneinfo.ZoneInfo(tz)
    nxt = (year + 1, 1) if mon == 12 else (year, mon + 1)
    # A local midnight that does not exist (DST starting at 00:00) resolves to the first instant
    # of the day: zoneinfo reads it with the offset in force before the change.
    start = _normalized(dt.datetime(year, mon, 1, tzinfo=zone), zone)
    end = _normalized(dt.datetime(*nxt, 1, tzinfo=zone), zone)
    if start < EARLIEST or end > LATEST_TIME:  # e.g. 1970-01 in Asia/Tokyo starts in 1969
        raise QueryError(
            "month",
            f"{month} in {tz} runs from {start.isoformat()} to {end.isoformat()}, outside the "
            f"times stored ({EARLIEST:%Y-%m-%d} to {LATEST_TIME:%Y-%m-%d} UTC)",
        )
    return start, end


def _normalized(t: dt.datetime, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    return t.astimezone(dt.UTC).astimezone(zone)


def _number(x: float | int) -> float | int:
    if isinstance(x, int):
        return x
    x = round(x, QUANTITY_DECIMALS)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


@dataclass(frozen=True)
class StatementLine:
    meter: str
    quantity: float | int
    events: int


@dataclass(frozen=True)
class BillingStatement:
    tenant: str
    month: str
    tz: str
    period_start: dt.datetime
    period_end: dt.datetime
    lines: tuple[StatementLine, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "month": self.month,
            "tz": self.tz,
            "period_start": rfc3339(self.period_start),
            "period_end": rfc3339(self.period_end),
            "lines": [
                {"meter": line.meter, "quantity": line.quantity, "events": line.events}
                for line in self.lines
            ],
        }

    def to_csv(self) -> str:
        """One row per meter (header always present, so an empty month is a header only)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        start, end = rfc3339(self.period_start), rfc3339(self.period_end)
        for line in self.lines:
            head = [self.tenant, self.month, self.tz, start, end]
            writer.writerow([*head, line.meter, repr(line.quantity), line.events])
        return out.getvalue()


def billing_statement(
    queries: UsageQueries, tenant: str, month: str, tz: str = "UTC", *, force_raw: bool = False
) -> BillingStatement:
    """The statement of ``tenant`` for ``month`` in ``tz``: one line per meter with usage."""
    start, end = month_period(month, tz)
    queries.check_zone(tz, start, end)  # the month's bounds are Python's, its rows ClickHouse's
    totals = queries.meter_totals(tenant, start, end, force_raw=force_raw)
    lines = tuple(StatementLine(meter, _number(q), n) for meter, q, n in totals)
    return BillingStatement(tenant, month, tz, start, end, lines)


__all__ = ["BillingStatement", "StatementLine", "billing_statement", "month_period"]

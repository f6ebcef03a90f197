"""The quota-DB backfill: per tenant per UTC day billable totals, from ClickHouse.

Totals are read from the ``usage_day`` rollup, i.e. from the deduplicated ``usage_events``,
rather than from the Faust table: ClickHouse is the one place where each event counts exactly
once (the Faust tables are fed after the insert and can replay or miss a batch around a crash;
they serve the live view). Each round upserts ABSOLUTE totals (``QuotaStore.upsert_daily_usage``),
so a repeated or overlapping round changes nothing. Only days an event can still arrive for
(today, and the days within the accepted lateness) are re-read. Tests:
``tests/integration/test_streams_worker.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from metering.clickhouse.totals import daily_billable_totals


class DailyUsageStore(Protocol):
    def upsert_daily_usage(self, rows: Any) -> int: ...


class Backfill:
    """One round = read the open days' totals from ClickHouse, upsert them into the quota DB."""

    def __init__(
        self,
        client: Any,
        database: str,
        store: DailyUsageStore,
        *,
        meter: str,
        lateness_seconds: float,
    ) -> None:
        self.client = client
        self.database = database
        self.store = store
        self.meter = meter
        self.lateness = dt.timedelta(seconds=lateness_seconds)

    def open_since(self, now: dt.datetime) -> dt.date:
        """The first UTC day that can still change (an event as late as allowed lands there)."""
        return (now.astimezone(dt.UTC) - self.lateness).date()

    def run_once(self, now: dt.datetime | None = None) -> int:
        now = now or dt.datetime.now(dt.UTC)
        rows = daily_billable_totals(
            self.client, self.database, meter=self.meter, since=self.open_since(now)
        )
        if rows:
            self.store.upsert_daily_usage(rows)
        return len(rows)


__all__ = ["Backfill", "daily_billable_totals"]

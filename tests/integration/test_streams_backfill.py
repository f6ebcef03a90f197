"""The quota-DB backfill reads exact billable day totals from ClickHouse and upserts them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from metering.clickhouse.schema import migrate
from metering.quota_db import QuotaStore
from metering.quota_db import migrate as migrate_quota_db
from streams.backfill import Backfill
from streams.sink import EVENT_COLUMNS

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def row(i: int, tenant: str, meter: str, qty: float, *, decision: str = "", days_ago: int = 0):  # type: ignore[no-untyped-def]
    t = NOW - dt.timedelta(days=days_ago)
    billable = 0 if decision == "rejected" else 1
    typ = "metering.ratelimit" if decision else "metering.usage"
    return [f"e{i}", typ, "urn:t", tenant, meter, decision, billable, t, qty, {}, "t", 0, i]


def test_backfill_upserts_billable_request_totals_of_open_days_and_repeats_idempotently(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    rows = [row(i, tenant, "requests", 2, decision="allowed") for i in range(10)]  # 20
    rows += [row(10 + i, tenant, "requests", 5, decision="rejected") for i in range(3)]  # never
    rows += [row(20, tenant, "tokens", 1000)]  # another meter
    rows += [row(21, tenant, "requests", 7, days_ago=3)]  # a closed day
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows, column_names=EVENT_COLUMNS)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    backfill = Backfill(
        clickhouse_client, clickhouse_db, store, meter="requests", lateness_seconds=3600
    )

    assert backfill.run_once(NOW) == 1  # only today is still open
    assert backfill.run_once(NOW) == 1
    assert store.daily_usage(tenant, NOW.date()) == 20
    assert store.daily_usage(tenant, (NOW - dt.timedelta(days=3)).date()) == 0

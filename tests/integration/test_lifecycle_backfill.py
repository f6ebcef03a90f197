"""The quota-DB backfill across a worker's downtime: the days the stopped worker left open are
read again by the next worker's first round, however late it starts (bounded)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from metering.clickhouse.schema import migrate
from metering.quota_db import QuotaStore
from metering.quota_db import migrate as migrate_quota_db
from streams.backfill import Backfill, latest_backfilled_day
from streams.sink import EVENT_COLUMNS

LATENESS = 10800.0  # EVENT_MAX_LATENESS
MARGIN = 300.0 + 2 * 5  # as the worker sets it for a 5 s WORKER_BACKFILL_INTERVAL


def events(first: int, n: int, tenant: str, time: dt.datetime) -> list[list[object]]:
    decision = ["metering.ratelimit", "urn:t", tenant, "requests", "allowed", 1, time, 1.0]
    return [[f"e{i}", *decision, {}, "t", 0, i] for i in range(first, first + n)]


def quota_store(tmp_path: Path) -> QuotaStore:
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    return QuotaStore(url)


def backfill(client: Any, database: str, store: QuotaStore, **kw: int) -> Backfill:
    return Backfill(
        client,
        database,
        store,
        meter="requests",
        lateness_seconds=LATENESS,
        margin_seconds=MARGIN,
        **kw,
    )


def test_a_worker_restarted_after_the_day_closed_reads_the_last_batches_of_the_one_before(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    """The audit's r10: the worker's last round ran 3 s before it stopped, its sink inserted 7
    more events at shutdown; a worker back 6 h later (the day closed 3 h 5 min after midnight)
    must still bring the day's quota-DB total to ClickHouse's."""
    migrate(clickhouse_client, clickhouse_db)
    store = quota_store(tmp_path)
    day = dt.date(2026, 12, 6)
    stop = dt.datetime(2026, 12, 6, 22, tzinfo=dt.UTC)
    table = f"{clickhouse_db}.usage_events"
    clickhouse_client.insert(
        table, events(0, 100, tenant, stop - dt.timedelta(seconds=30)), column_names=EVENT_COLUMNS
    )
    backfill(clickhouse_client, clickhouse_db, store).run_once(stop - dt.timedelta(seconds=3))
    clickhouse_client.insert(
        table, events(100, 7, tenant, stop - dt.timedelta(seconds=1)), column_names=EVENT_COLUMNS
    )
    assert store.daily_usage(tenant, day) == 100

    restart = dt.datetime(2026, 12, 7, 4, tzinfo=dt.UTC)
    later = backfill(clickhouse_client, clickhouse_db, store)
    assert later.open_since(restart) > day  # the open days alone no longer hold it
    for k in range(3):
        later.run_once(restart + dt.timedelta(seconds=5 * k))
    assert store.daily_usage(tenant, day) == 107
    # Only the first round reaches back: the next ones read the open days, as before.
    assert later.run_once(restart + dt.timedelta(seconds=20)) == 0


def test_the_first_round_reaches_back_at_most_catch_up_days(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    """A quota DB last written long ago is not read from its latest day on (a year of totals),
    only from ``catch_up_days`` back; a new quota DB only from the open days."""
    migrate(clickhouse_client, clickhouse_db)
    store = quota_store(tmp_path)
    now = dt.datetime(2026, 12, 20, 12, tzinfo=dt.UTC)
    table = f"{clickhouse_db}.usage_events"
    for i, days_ago in enumerate((40, 9, 5)):
        t = now - dt.timedelta(days=days_ago)
        clickhouse_client.insert(table, events(10 * i, 2, tenant, t), column_names=EVENT_COLUMNS)

    assert latest_backfilled_day(store) is None
    assert backfill(clickhouse_client, clickhouse_db, store).run_once(now) == 0  # new quota DB

    store.upsert_daily_usage([(tenant, (now - dt.timedelta(days=40)).date(), 1)])
    assert latest_backfilled_day(store) == (now - dt.timedelta(days=40)).date()
    assert backfill(clickhouse_client, clickhouse_db, store, catch_up_days=7).run_once(now) == 1
    assert store.daily_usage(tenant, (now - dt.timedelta(days=5)).date()) == 2
    assert store.daily_usage(tenant, (now - dt.timedelta(days=9)).date()) == 0
    assert store.daily_usage(tenant, (now - dt.timedelta(days=40)).date()) == 1

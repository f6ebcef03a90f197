"""The ClickHouse schema on the embedded engine: versioned, idempotent, rollups exact."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from metering.clickhouse.schema import migrate, migrations

T0 = dt.datetime(2026, 3, 1, 12, 0, 5, tzinfo=dt.UTC)
COLUMNS = ["id", "tenant", "meter", "decision", "billable", "time", "quantity", "dimensions",
           "kafka_topic", "kafka_partition", "kafka_offset"]  # fmt: skip


def test_migrate_applies_every_version_once_and_again_changes_nothing(
    clickhouse_client, clickhouse_db: str
) -> None:
    applied = migrate(clickhouse_client, clickhouse_db)
    assert applied == [f"{m.version:03d}_{m.name}" for m in migrations()]
    assert migrate(clickhouse_client, clickhouse_db) == []
    tables = {
        r[0]
        for r in clickhouse_client.query(
            "SELECT name FROM system.tables WHERE database = {d:String}",
            parameters={"d": clickhouse_db},
        ).result_rows
    }
    assert {
        "usage_events", "usage_minute", "usage_hour", "usage_day", "usage_minute_by_time",
        "sink_progress", "aggregate_handoffs", "aggregate_claims", "schema_migrations",
    } <= tables  # fmt: skip


def test_usage_events_has_the_contracted_columns_keys_and_ttl(
    clickhouse_client, clickhouse_db: str
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    row = clickhouse_client.query(
        "SELECT partition_key, sorting_key, create_table_query FROM system.tables"
        " WHERE database = {d:String} AND name = 'usage_events'",
        parameters={"d": clickhouse_db},
    ).result_rows[0]
    assert row[0] == "toYYYYMMDD(time)"
    assert row[1] == "tenant, meter, time, id"
    assert "TTL toDateTime(time) + toIntervalDay(400)" in row[2]
    types = dict(
        clickhouse_client.query(
            "SELECT name, type FROM system.columns WHERE database = {d:String}"
            " AND table = 'usage_minute_by_time'",
            parameters={"d": clickhouse_db},
        ).result_rows
    )
    assert types["bucket"] == "DateTime('UTC')"
    assert types["quantity_latest"] == "AggregateFunction(argMax, Float64, DateTime64(3, 'UTC'))"


ROLLUPS = ["usage_minute", "usage_hour", "usage_day", "usage_minute_by_time"]


@pytest.mark.parametrize("table", ROLLUPS)
def test_rollups_hold_sum_count_max_unique_and_latest_per_bucket(
    clickhouse_client, clickhouse_db: str, table: str
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    quantities = [3.0, 1.0, 3.0, 7.0, 2.0]  # the last one (by time) is 2.0
    rows = [
        [f"e{i}", "acme", "requests", "", 1, T0 + dt.timedelta(seconds=i), q, {"route": "/a"},
         "usage.events", 0, i]
        for i, q in enumerate(quantities)
    ]  # fmt: skip
    rows.append(["r1", "acme", "requests", "rejected", 0, T0, 9.0, {}, "usage.events", 0, 99])
    # Two inserts, so the rollup holds partial states that the queries must merge.
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows[:2], column_names=COLUMNS)
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows[2:], column_names=COLUMNS)
    result = clickhouse_client.query(
        f"SELECT billable, sum(quantity_sum), sum(event_count), max(quantity_max),"
        f" uniqExactMerge(quantity_uniq), argMaxMerge(quantity_latest)"
        f" FROM {clickhouse_db}.{table} WHERE tenant = 'acme' GROUP BY billable ORDER BY billable"
    ).result_rows
    assert result == [(0, 9.0, 1, 9.0, 1, 9.0), (1, 16.0, 5, 7.0, 4, 2.0)]


def test_migrate_refuses_a_database_name_that_is_not_an_identifier(clickhouse_client) -> None:
    with pytest.raises(ValueError, match="not a plain identifier"):
        migrate(clickhouse_client, "x; DROP DATABASE y")


def test_a_changed_retention_setting_reaches_the_tables_already_made(
    clickhouse_client, clickhouse_db: str
) -> None:
    """The tables were made at the first migration with 400 days; CLICKHOUSE_RETENTION_DAYS is
    30 now. It used to be substituted into migration 001/002 only, so the tables kept 400 days
    for good (and a longer setting let late events in that the old TTL then deleted). Each
    migration now brings every retention table's TTL to the setting, and the rows the shorter
    retention expires are dropped."""
    from metering.clickhouse.schema import RETENTION_TABLES, migrate_client, retention_in_force

    assert migrate_client(clickhouse_client, clickhouse_db, retention_days=400).retention == []
    old = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=60)
    row = ["old", "acme", "requests", "", 1, old, 1.0, {}, "usage.events", 0, 0]
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", [row], column_names=COLUMNS)

    again = migrate_client(clickhouse_client, clickhouse_db, retention_days=30)
    assert list(again) == []  # no migration to apply, but the retention changed
    assert sorted(again.retention) == sorted((t, 400, 30) for t in RETENTION_TABLES)
    assert retention_in_force(clickhouse_client, clickhouse_db) == dict.fromkeys(
        RETENTION_TABLES, 30
    )
    assert migrate_client(clickhouse_client, clickhouse_db, retention_days=30).retention == []

    def rows_left() -> int:
        clickhouse_client.command(f"OPTIMIZE TABLE {clickhouse_db}.usage_events FINAL")
        return int(clickhouse_client.command(f"SELECT count() FROM {clickhouse_db}.usage_events"))

    deadline = time.monotonic() + 30
    while rows_left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows_left() == 0  # 60 days old: past the 30 days now in force


def test_a_migration_without_a_retention_leaves_the_tables_ttl_alone(
    clickhouse_client, clickhouse_db: str
) -> None:
    from metering.clickhouse.schema import RETENTION_TABLES, migrate_client, retention_in_force

    migrate_client(clickhouse_client, clickhouse_db, retention_days=90)
    assert migrate(clickhouse_client, clickhouse_db).retention == []
    assert retention_in_force(clickhouse_client, clickhouse_db) == dict.fromkeys(
        RETENTION_TABLES, 90
    )

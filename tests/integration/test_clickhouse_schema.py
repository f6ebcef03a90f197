"""The ClickHouse schema on the embedded engine: versioned, idempotent, rollups exact."""

from __future__ import annotations

import datetime as dt

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
        "sink_progress", "aggregate_handoffs", "schema_migrations",
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

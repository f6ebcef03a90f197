"""The ClickHouse schema the query tests run against.

``metering.clickhouse.schema.migrate`` (STREAMS) is the schema of record; until it exists this
module creates exactly the tables of the agreed contract (docs: helpers/interfaces.md), so the
query layer is tested against the same names and types either way.
"""

from __future__ import annotations

from typing import Any

_ROLLUP_COLUMNS = """
    tenant String,
    meter LowCardinality(String),
    billable UInt8,
    bucket DateTime('UTC'),
    quantity_sum SimpleAggregateFunction(sum, Float64),
    event_count SimpleAggregateFunction(sum, UInt64),
    quantity_max SimpleAggregateFunction(max, Float64),
    quantity_uniq AggregateFunction(uniqExact, Float64),
    quantity_latest AggregateFunction(argMax, Float64, DateTime64(3, 'UTC'))
"""

_ROLLUP_SELECT = """
    SELECT tenant, meter, billable, {bucket} AS bucket,
           sum(quantity) AS quantity_sum, count() AS event_count, max(quantity) AS quantity_max,
           uniqExactState(quantity) AS quantity_uniq, argMaxState(quantity, time) AS quantity_latest
    FROM {db}.usage_events GROUP BY tenant, meter, billable, bucket
"""


def _contract_ddl(db: str) -> list[str]:
    stmts = [
        f"""CREATE TABLE IF NOT EXISTS {db}.usage_events (
            id String, type LowCardinality(String), source String, tenant String,
            meter LowCardinality(String), decision LowCardinality(String), billable UInt8,
            time DateTime64(3, 'UTC'), quantity Float64, dimensions Map(String, String),
            kafka_topic LowCardinality(String), kafka_partition Int32, kafka_offset Int64,
            inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
        ) ENGINE = MergeTree PARTITION BY toYYYYMMDD(time) ORDER BY (tenant, meter, time, id)"""
    ]
    rollups = {
        "usage_minute": ("toStartOfMinute(time)", "(tenant, meter, billable, bucket)"),
        "usage_hour": ("toStartOfHour(time)", "(tenant, meter, billable, bucket)"),
        "usage_day": ("toStartOfDay(time)", "(tenant, meter, billable, bucket)"),
        "usage_minute_by_time": ("toStartOfMinute(time)", "(bucket, meter, tenant, billable)"),
    }
    for table, (bucket, order) in rollups.items():
        stmts.append(
            f"CREATE TABLE IF NOT EXISTS {db}.{table} ({_ROLLUP_COLUMNS}) "
            f"ENGINE = AggregatingMergeTree ORDER BY {order}"
        )
        stmts.append(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{table}_mv TO {db}.{table} AS "
            + _ROLLUP_SELECT.format(bucket=bucket, db=db)
        )
    return stmts


def create_schema(client: Any, db: str) -> None:
    """Create the usage tables in ``db``: the real migration when it exists, else the contract."""
    try:
        from metering.clickhouse.schema import migrate  # type: ignore[import-not-found]
    except ImportError:
        for stmt in _contract_ddl(db):
            client.command(stmt)
        return
    migrate(client, db)


def insert_events(client: Any, db: str, events: list[dict[str, Any]]) -> None:
    """Insert events (dicts with tenant, meter, time, quantity and optionally dimensions,
    decision, id) into ``usage_events``; the materialized views fill the rollups."""
    columns = ["id", "type", "source", "tenant", "meter", "decision", "billable", "time"]
    columns += ["quantity", "dimensions", "kafka_topic", "kafka_partition", "kafka_offset"]
    rows = []
    for n, ev in enumerate(events):
        decision = ev.get("decision", "")
        rows.append(
            [
                ev.get("id", f"ev-{n}"),
                "metering.ratelimit" if decision else "metering.usage",
                "urn:test",
                ev["tenant"],
                ev["meter"],
                decision,
                0 if decision == "rejected" else 1,
                ev["time"],
                float(ev["quantity"]),
                ev.get("dimensions", {}),
                "usage.events",
                0,
                n,
            ]
        )
    client.insert(f"{db}.usage_events", rows, column_names=columns)

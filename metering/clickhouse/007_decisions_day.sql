-- The limiter's decisions per tenant and UTC day: the quantity and count of metering.ratelimit
-- events by meter, decision (allowed, rejected) and whether they were made without Redis
-- (degraded: the fail mode's, which no Redis counter holds). What the limiter's daily counter
-- rl:{tenant}:day:YYYYMMDD counts is the allowed, not degraded quantity of every meter: the
-- worker backfills that into the quota DB's tenant_daily_usage (the seed of a lost counter) and
-- `metering reconcile` compares it with the counters (streams/backfill.py).
--
-- The view takes the rows inserted from ${cut} on; the rows stored before it are added once,
-- below, marked filled = 1. Every row is counted by exactly one of the two, whatever inserts
-- run meanwhile (metering/clickhouse/schema.py chooses the cut and waits for it to pass before
-- the fill). A run cut short is run again: its fill rows are deleted and written again, and the
-- view (made already) keeps its cut.
CREATE TABLE IF NOT EXISTS ${database}.decisions_day
(
    tenant String,
    meter LowCardinality(String),
    decision LowCardinality(String),
    degraded UInt8,
    bucket DateTime('UTC'),
    filled UInt8,
    quantity_sum SimpleAggregateFunction(sum, Float64),
    event_count SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, bucket, meter, decision, degraded, filled)
TTL bucket + INTERVAL ${retention_days} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.decisions_day_mv TO ${database}.decisions_day AS
SELECT
    tenant,
    meter,
    decision,
    toUInt8(dimensions['degraded'] = 'true') AS degraded,
    toDateTime(toStartOfDay(time), 'UTC') AS bucket,
    toUInt8(0) AS filled,
    sum(quantity) AS quantity_sum,
    toUInt64(count()) AS event_count
FROM ${database}.usage_events
WHERE type = 'metering.ratelimit' AND inserted_at >= toDateTime64('${cut}', 3, 'UTC')
GROUP BY tenant, meter, decision, degraded, bucket;

ALTER TABLE ${database}.decisions_day DELETE WHERE filled = 1 SETTINGS mutations_sync = 2;

INSERT INTO ${database}.decisions_day
    (tenant, meter, decision, degraded, bucket, filled, quantity_sum, event_count)
SELECT
    tenant,
    meter,
    decision,
    toUInt8(dimensions['degraded'] = 'true') AS degraded,
    toDateTime(toStartOfDay(time), 'UTC') AS bucket,
    toUInt8(1),
    sum(quantity),
    toUInt64(count())
FROM ${database}.usage_events
WHERE type = 'metering.ratelimit' AND inserted_at < toDateTime64('${cut}', 3, 'UTC')
GROUP BY tenant, meter, decision, degraded, bucket;

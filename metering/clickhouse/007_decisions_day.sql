-- The limiter's decisions per tenant and UTC day: the quantity and count of metering.ratelimit
-- events by meter, decision (allowed, rejected) and whether they were made without Redis
-- (degraded: the fail mode's, which no Redis counter holds). What the limiter's daily counter
-- rl:{tenant}:day:YYYYMMDD counts is the allowed, not degraded quantity of every meter: the
-- worker backfills that into the quota DB's tenant_daily_usage (the seed of a lost counter) and
-- `metering reconcile` compares it with the counters (metering/clickhouse/totals.py).
--
-- decisions_day is kept by the view, from the rows inserted from ${cut} on; the rows stored
-- before the cut are summed once into decisions_day_filled (absolute totals, replaced by key),
-- and readers add the two. Every row is counted by exactly one of them, whatever inserts run
-- meanwhile (metering/clickhouse/schema.py sets the cut ahead and waits past it before the
-- fill). The fill writes the same totals however often it runs: a run cut short, or two runs at
-- once (workers starting together), leave it as one run does.
CREATE TABLE IF NOT EXISTS ${database}.decisions_day
(
    tenant String,
    meter LowCardinality(String),
    decision LowCardinality(String),
    degraded UInt8,
    bucket DateTime('UTC'),
    quantity_sum SimpleAggregateFunction(sum, Float64),
    event_count SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, bucket, meter, decision, degraded)
TTL bucket + INTERVAL ${retention_days} DAY;

CREATE TABLE IF NOT EXISTS ${database}.decisions_day_filled
(
    tenant String,
    meter LowCardinality(String),
    decision LowCardinality(String),
    degraded UInt8,
    bucket DateTime('UTC'),
    quantity_sum Float64,
    event_count UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, bucket, meter, decision, degraded)
TTL bucket + INTERVAL ${retention_days} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.decisions_day_mv TO ${database}.decisions_day AS
SELECT
    tenant,
    meter,
    decision,
    toUInt8(dimensions['degraded'] = 'true') AS degraded,
    toDateTime(toStartOfDay(time), 'UTC') AS bucket,
    sum(quantity) AS quantity_sum,
    toUInt64(count()) AS event_count
FROM ${database}.usage_events
WHERE type = 'metering.ratelimit' AND inserted_at >= toDateTime64('${cut}', 3, 'UTC')
GROUP BY tenant, meter, decision, degraded, bucket;

INSERT INTO ${database}.decisions_day_filled
    (tenant, meter, decision, degraded, bucket, quantity_sum, event_count)
SELECT
    tenant,
    meter,
    decision,
    toUInt8(dimensions['degraded'] = 'true') AS degraded,
    toDateTime(toStartOfDay(time), 'UTC') AS bucket,
    sum(quantity),
    toUInt64(count())
FROM ${database}.usage_events
WHERE type = 'metering.ratelimit' AND inserted_at < toDateTime64('${cut}', 3, 'UTC')
GROUP BY tenant, meter, decision, degraded, bucket;

-- Rollups of usage_events per minute, hour and day, kept by materialized views: exact because
-- usage_events never receives a duplicate event id. Billing reads billable = 1 only.
-- usage_minute_by_time holds the same minutes ordered by time first (top tenants over a period).

CREATE TABLE IF NOT EXISTS ${database}.usage_minute
(
    tenant String,
    meter LowCardinality(String),
    billable UInt8,
    bucket DateTime('UTC'),
    quantity_sum SimpleAggregateFunction(sum, Float64),
    event_count SimpleAggregateFunction(sum, UInt64),
    quantity_max SimpleAggregateFunction(max, Float64),
    quantity_uniq AggregateFunction(uniqExact, Float64),
    quantity_latest AggregateFunction(argMax, Float64, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (tenant, meter, billable, bucket)
TTL bucket + INTERVAL ${retention_days} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_minute_mv TO ${database}.usage_minute AS
SELECT
    tenant,
    meter,
    billable,
    toDateTime(toStartOfMinute(time), 'UTC') AS bucket,
    sum(quantity) AS quantity_sum,
    toUInt64(count()) AS event_count,
    max(quantity) AS quantity_max,
    uniqExactState(quantity) AS quantity_uniq,
    argMaxState(quantity, time) AS quantity_latest
FROM ${database}.usage_events
GROUP BY tenant, meter, billable, bucket;

CREATE TABLE IF NOT EXISTS ${database}.usage_hour
(
    tenant String,
    meter LowCardinality(String),
    billable UInt8,
    bucket DateTime('UTC'),
    quantity_sum SimpleAggregateFunction(sum, Float64),
    event_count SimpleAggregateFunction(sum, UInt64),
    quantity_max SimpleAggregateFunction(max, Float64),
    quantity_uniq AggregateFunction(uniqExact, Float64),
    quantity_latest AggregateFunction(argMax, Float64, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, meter, billable, bucket)
TTL bucket + INTERVAL ${retention_days} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_hour_mv TO ${database}.usage_hour AS
SELECT
    tenant,
    meter,
    billable,
    toDateTime(toStartOfHour(time), 'UTC') AS bucket,
    sum(quantity) AS quantity_sum,
    toUInt64(count()) AS event_count,
    max(quantity) AS quantity_max,
    uniqExactState(quantity) AS quantity_uniq,
    argMaxState(quantity, time) AS quantity_latest
FROM ${database}.usage_events
GROUP BY tenant, meter, billable, bucket;

CREATE TABLE IF NOT EXISTS ${database}.usage_day
(
    tenant String,
    meter LowCardinality(String),
    billable UInt8,
    bucket DateTime('UTC'),
    quantity_sum SimpleAggregateFunction(sum, Float64),
    event_count SimpleAggregateFunction(sum, UInt64),
    quantity_max SimpleAggregateFunction(max, Float64),
    quantity_uniq AggregateFunction(uniqExact, Float64),
    quantity_latest AggregateFunction(argMax, Float64, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, meter, billable, bucket)
TTL bucket + INTERVAL ${retention_days} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_day_mv TO ${database}.usage_day AS
SELECT
    tenant,
    meter,
    billable,
    toDateTime(toStartOfDay(time), 'UTC') AS bucket,
    sum(quantity) AS quantity_sum,
    toUInt64(count()) AS event_count,
    max(quantity) AS quantity_max,
    uniqExactState(quantity) AS quantity_uniq,
    argMaxState(quantity, time) AS quantity_latest
FROM ${database}.usage_events
GROUP BY tenant, meter, billable, bucket;

CREATE TABLE IF NOT EXISTS ${database}.usage_minute_by_time
(
    tenant String,
    meter LowCardinality(String),
    billable UInt8,
    bucket DateTime('UTC'),
    quantity_sum SimpleAggregateFunction(sum, Float64),
    event_count SimpleAggregateFunction(sum, UInt64),
    quantity_max SimpleAggregateFunction(max, Float64),
    quantity_uniq AggregateFunction(uniqExact, Float64),
    quantity_latest AggregateFunction(argMax, Float64, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (bucket, meter, tenant, billable)
TTL bucket + INTERVAL ${retention_days} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_minute_by_time_mv TO ${database}.usage_minute_by_time AS
SELECT
    tenant,
    meter,
    billable,
    toDateTime(toStartOfMinute(time), 'UTC') AS bucket,
    sum(quantity) AS quantity_sum,
    toUInt64(count()) AS event_count,
    max(quantity) AS quantity_max,
    uniqExactState(quantity) AS quantity_uniq,
    argMaxState(quantity, time) AS quantity_latest
FROM ${database}.usage_events
GROUP BY tenant, meter, billable, bucket;

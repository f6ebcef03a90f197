-- One row per accepted usage event. The sink never inserts an event id twice (see
-- streams/sink.py), and stores each row's Kafka topic, partition and offset: the record of
-- the sink's progress, read back on every partition assignment.
CREATE TABLE IF NOT EXISTS ${database}.usage_events
(
    id String,
    type LowCardinality(String),
    source String,
    tenant String,
    meter LowCardinality(String),
    decision LowCardinality(String),
    billable UInt8,
    time DateTime64(3, 'UTC'),
    quantity Float64,
    dimensions Map(String, String),
    kafka_topic LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(time)
ORDER BY (tenant, meter, time, id)
TTL toDateTime(time) + INTERVAL ${retention_days} DAY;

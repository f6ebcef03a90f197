-- The sink's progress per Kafka partition, written after each batch's rows (usage_events) and
-- before the Kafka offset commit. It covers offsets that left no row (duplicates, dead letters)
-- and outlives the events' TTL. Resume point of a partition = greatest next_offset known here,
-- in usage_events (max kafka_offset + 1) and in Kafka's committed offset.
CREATE TABLE IF NOT EXISTS ${database}.sink_progress
(
    topic LowCardinality(String),
    partition Int32,
    next_offset Int64,
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(next_offset)
ORDER BY (topic, partition);

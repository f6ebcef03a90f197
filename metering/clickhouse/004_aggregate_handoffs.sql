-- The worker's hand-offs of per-minute sums to the Faust tables (streams/handoff.py): one row per
-- source partition and flush, recorded before the flush's accepted_usage messages are sent. The
-- row with the greatest end_offset of a partition is the only range that can have been sent in
-- part when a worker died; the next owner resends it (the tables' marks drop what was applied)
-- and hands off the rows after it, recomputed from usage_events.
CREATE TABLE IF NOT EXISTS ${database}.aggregate_handoffs
(
    topic LowCardinality(String),
    partition Int32,
    start_offset Int64,
    end_offset Int64,
    recorded_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(end_offset)
ORDER BY (topic, partition);

-- Where the earlier hand-off (per-minute deltas without ranges) had got to: every row stored
-- before this version counts as handed off. Empty on a new database.
INSERT INTO ${database}.aggregate_handoffs (topic, partition, start_offset, end_offset)
SELECT topic, partition, max(n), max(n)
FROM
(
    SELECT topic, partition, next_offset AS n FROM ${database}.sink_progress
    UNION ALL
    SELECT kafka_topic AS topic, kafka_partition AS partition, kafka_offset + 1 AS n
    FROM ${database}.usage_events
)
GROUP BY topic, partition;

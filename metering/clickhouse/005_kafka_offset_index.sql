-- A minmax skip index on each row's source offset. On every partition assignment the sink asks
-- where a partition's stored rows end past its recorded progress (a crash between an insert and
-- its progress row), the repair completes the rollups of such rows, and the hand-off recovery
-- sums one recorded offset range: each reads only recent offsets, which this index lets
-- ClickHouse find without reading the whole table (older parts hold only smaller offsets).
ALTER TABLE ${database}.usage_events
    ADD INDEX IF NOT EXISTS kafka_offset_minmax kafka_offset TYPE minmax GRANULARITY 1;

-- Parts written before this version get the index too (a background mutation on a server;
-- queries are exact meanwhile, they just read more).
ALTER TABLE ${database}.usage_events MATERIALIZE INDEX kafka_offset_minmax;

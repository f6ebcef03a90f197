-- Which worker hands a source partition's rows to the Faust tables (streams/handoff.py): on
-- every assignment the sink claims each of its partitions with the next claim number before it
-- recovers them, and a flush records (and sends) a partition's ranges only while its claim is
-- still the partition's latest. A worker evicted from the group (stalled past its session
-- timeout) that wakes finds a newer claim and leaves the rows to the owner that recovered them:
-- the ranges it would have sent had other bounds than the new owner's, and both were applied.
CREATE TABLE IF NOT EXISTS ${database}.aggregate_claims
(
    topic LowCardinality(String),
    partition Int32,
    claim UInt64,
    owner String,
    claimed_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(claim)
ORDER BY (topic, partition);

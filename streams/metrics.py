"""The worker's Prometheus metrics (default registry), each defined once here."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

events_consumed = Counter(
    "streams_events_consumed",
    "Kafka messages the sink read from usage.events, each offset once per assignment (a batch"
    " read again after a failure counts in streams_events_reread instead).",
)
events_reread = Counter(
    "streams_events_reread",
    "Kafka messages the sink read again after a failed batch (already in"
    " streams_events_consumed): the work of retries, not new input.",
)
events_inserted = Counter(
    "streams_events_inserted", "Usage events inserted into ClickHouse (once per event id)."
)
events_duplicate = Counter(
    "streams_events_duplicate", "Messages dropped because their event id was already inserted."
)
events_dead_lettered = Counter(
    "streams_events_dead_lettered",
    "Messages sent to usage.events.dlq, by reason.",
    ["reason"],
)
#: The reasons :class:`streams.sink.DeadLetter` gives (its ``dlq.reason`` header).
DEAD_LETTER_REASONS = ("invalid", "late")
# Each reason's series exists at 0 from the start: a labelled child appears at its first
# increment, already at 1, and increase() sees no increase from a series' first sample, so the
# alert on dead letters would miss the first of each reason in each worker.
for _reason in DEAD_LETTER_REASONS:
    events_dead_lettered.labels(_reason)
dead_letters_unsendable = Counter(
    "streams_dead_letters_unsendable",
    "Dead letters Kafka refused even without their value, key and original headers (too large"
    " for the dead-letter topic): skipped, each logged with its source topic, partition and"
    " offset.",
)
sink_batch_size = Histogram(
    "streams_sink_batch_size",
    "Messages per sink batch.",
    buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000),
)
sink_insert_seconds = Histogram(
    "streams_sink_insert_seconds",
    "Seconds one ClickHouse insert of a batch took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
sink_insert_failures = Counter(
    "streams_sink_insert_failures", "Sink batches that failed (the batch is re-read)."
)
sink_unpositioned_partitions = Gauge(
    "streams_sink_unpositioned_partitions",
    "Assigned partitions the sink waits to position (ClickHouse or Kafka unavailable; retried"
    " with backoff, nothing of theirs is processed meanwhile).",
)
consumer_lag = Gauge(
    "streams_consumer_lag",
    "Messages behind the end of usage.events, per partition this worker owns: the end offset"
    " minus the next offset the sink has not written to ClickHouse (refreshed every few seconds,"
    " also while its batches fail).",
    ["partition"],
)
sink_last_write_timestamp = Gauge(
    "streams_sink_last_write_timestamp_seconds",
    "Unix time the sink last wrote a batch to ClickHouse (its start, before the first): with a"
    " consumer lag above 0, the time since says how long the sink has been stuck.",
)
end_to_end_delay_seconds = Histogram(
    "streams_end_to_end_delay_seconds",
    "Seconds from an event's time to its insert into ClickHouse.",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10, 30, 60, 300, 3600),
)
backfill_rows = Counter(
    "streams_backfill_rows", "Tenant-day totals upserted into the quota DB's tenant_daily_usage."
)
backfill_failures = Counter("streams_backfill_failures", "Backfill rounds that failed.")
handoff_messages = Counter(
    "streams_handoff_messages",
    "Hand-off messages (one tenant's sums over one source range) sent to accepted_usage.",
)
handoff_failures = Counter(
    "streams_handoff_failures", "Hand-off flushes that failed (their ranges are sent again)."
)
handoff_fenced = Counter(
    "streams_handoff_fenced",
    "Partitions whose hand-off ranges this worker dropped because another worker had claimed"
    " them since (this one was evicted from the sink's group); the other hands those rows off.",
)
changelog_superseded = Counter(
    "streams_changelog_superseded",
    "Table changelog records skipped at recovery because the value already recovered was newer"
    " (written late by a worker evicted from the group).",
)
handoffs_malformed = Counter(
    "streams_handoffs_malformed", "accepted_usage messages the aggregate agent could not read."
)

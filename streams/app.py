"""The Faust app of the worker: its topics, tables and agents, declared once, here.

- ``usage_events`` / ``dead_letters``: the pipeline's topics (raw bytes; decoding is ours, so a
  malformed message reaches the dead letters with its original bytes).
- The sink (:mod:`streams.consumer`, :class:`streams.sink.ClickHouseSink`) runs as a task of this
  app with its own consumer: exactly once into ClickHouse, offsets stored with the rows.
- ``accepted_usage``: after each insert the sink adds per (tenant, meter, minute) sums of the rows
  it actually inserted (duplicates already dropped) to a buffer sent every
  ``WORKER_AGGREGATE_INTERVAL`` s (and once more at shutdown, after the sink's last batch); the
  ``aggregate`` agent folds them into ``tenant_daily_usage`` (per tenant per UTC day, billable)
  and ``tenant_recent_usage`` (hopping windows of the event's own time, so late events land in
  their own window).
- Tables use the in-memory store backed by their changelog topics: after a restart or a rebalance
  Faust replays the changelog into memory before the agent resumes (no RocksDB needed).
- ``backfill`` timer: every ``WORKER_BACKFILL_INTERVAL`` s upserts absolute per tenant per UTC day
  billable totals into the quota DB, read from ClickHouse (the exact source, see
  :mod:`streams.backfill`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from metering.settings import Settings, get_settings
from streams import metrics
from streams.sink import (
    ClickHouseSink,
    ClickHouseStorage,
    MinuteKey,
    PreparedBatch,
    add_minute_sums,
    minute_messages,
)

log = logging.getLogger(__name__)

settings: Settings = get_settings()

WINDOW_SIZE = 300.0  # the last five minutes ...
WINDOW_STEP = 60.0  # ... at one-minute resolution
WINDOW_EXPIRES = dt.timedelta(minutes=30)
AGGREGATE_FLUSH_SECONDS = settings.worker_aggregate_interval


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in bootstrap.split(",") if hp.strip()]


app = faust.App(
    settings.worker_group,
    broker=_broker_urls(settings.kafka_bootstrap_servers),
    store="memory://",
    value_serializer="raw",
    topic_partitions=settings.usage_events_partitions,
    web_enabled=False,
)

usage_events = app.topic(settings.usage_events_topic, value_serializer="raw")
dead_letters = app.topic(settings.usage_events_dlq_topic, value_serializer="raw")
accepted_usage = app.topic(
    f"{settings.worker_group}-accepted-usage",
    key_type=str,
    value_serializer="json",
    partitions=settings.usage_events_partitions,
    internal=True,
)

#: billable quantity per "<tenant>|<YYYY-MM-DD>" (UTC day of the event's time)
tenant_daily_usage = app.Table("tenant_daily_usage", default=float)
#: billable quantity per tenant in hopping windows over the events' own time
tenant_recent_usage = (
    app.Table("tenant_recent_usage", default=float)
    .hopping(WINDOW_SIZE, WINDOW_STEP, expires=WINDOW_EXPIRES)
    .relative_to_stream()
)


def daily_key(tenant: str, day: dt.date) -> str:
    return f"{tenant}|{day.isoformat()}"


@app.agent(accepted_usage)
async def aggregate(stream: Any) -> None:
    """Fold the sink's per-minute sums into the per-day and windowed tables (billable only)."""
    async for agg in stream:
        if not agg.get("billable"):  # sent by workers before the sink kept billable sums only
            continue
        day = dt.datetime.fromtimestamp(agg["minute"], dt.UTC).date()
        tenant_daily_usage[daily_key(agg["tenant"], day)] += agg["quantity"]
        tenant_recent_usage[agg["tenant"]] += agg["quantity"]


#: billable sums of inserted events not yet handed to Faust (see streams.sink.add_minute_sums)
_pending_aggregates: dict[MinuteKey, float] = {}


async def publish_aggregates(batch: PreparedBatch) -> None:
    """Add the batch's sums to the buffer that ``flush_aggregates`` sends; the sink's next
    batch never waits on the live view (ClickHouse already holds the rows)."""
    add_minute_sums(batch, _pending_aggregates)


def _take_aggregates() -> list[tuple[str, dict[str, Any]]]:
    """The buffered sums as ``accepted_usage`` messages (key, value), the buffer emptied."""
    messages = minute_messages(_pending_aggregates)
    _pending_aggregates.clear()
    return [(m["tenant"], m) for m in messages]


@app.timer(AGGREGATE_FLUSH_SECONDS)
async def flush_aggregates() -> None:
    """Send the buffered sums (one message per tenant, meter, minute) to ``accepted_usage``.

    Each message costs the ``aggregate`` agent a daily and five window updates, each with its
    changelog record: so the interval, not the event rate, sets this cost (per tenant and
    minute touched), and a longer interval is cheaper."""
    for key, value in _take_aggregates():
        accepted_usage.send_soon(key=key, value=value, timestamp=float(value["minute"]))


@app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode types the sender positional-only
async def _last_aggregates(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
    """At shutdown (Faust's consumer stopped, its producer not yet flushed): let the sink
    finish its batch in flight, then hand the sums not yet sent to ``accepted_usage``, so the
    live tables get them when the agent next runs instead of never."""
    consumer = _state.get("consumer")
    if consumer is not None:
        consumer.stop()
        try:
            await asyncio.wait_for(consumer.stopped.wait(), timeout=30)
        except TimeoutError:
            log.warning("the sink did not stop within 30 s; its last sums may be missing")
    messages = _take_aggregates()
    # Sent and awaited here (the background buffer of send_soon is already winding down); the
    # app flushes its producer right after this signal.
    for key, value in messages:
        await accepted_usage.send(key=key, value=value, timestamp=float(value["minute"]))
    if messages:
        log.info("shutdown: %d last sums sent to %s", len(messages), accepted_usage)


# --- the sink and the backfill share one thread: the ClickHouse client is used from it only -----
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
_state: dict[str, Any] = {}


def _clickhouse() -> Any:
    if "client" not in _state:
        from metering.clickhouse.client import clickhouse_client
        from metering.clickhouse.schema import migrate

        client = clickhouse_client(settings.clickhouse_url)
        migrate(settings)
        _state["client"] = client
    return _state["client"]


@app.task
async def run_sink() -> None:
    from streams.consumer import SinkConsumer

    loop = asyncio.get_running_loop()
    client = await loop.run_in_executor(_executor, _clickhouse)
    sink = ClickHouseSink(
        ClickHouseStorage(client, settings.clickhouse_database),
        topic=settings.usage_events_topic,
        lateness_seconds=settings.event_max_lateness,
        max_future_skew=settings.event_max_future_skew,
    )
    consumer = SinkConsumer(
        sink,
        bootstrap=settings.kafka_bootstrap_servers,
        group_id=f"{settings.worker_group}.sink",
        dlq_topic=settings.usage_events_dlq_topic,
        batch_size=settings.worker_batch_size,
        batch_within=settings.worker_batch_within,
        executor=_executor,
        on_batch_written=publish_aggregates,
    )
    _state["consumer"] = consumer
    await consumer.run()


@app.timer(settings.worker_backfill_interval)
async def backfill() -> None:
    """Upsert the open days' billable totals (from ClickHouse) into tenant_daily_usage."""
    from streams.backfill import Backfill

    loop = asyncio.get_running_loop()
    try:
        if "backfill" not in _state:
            from metering.quota_db import QuotaStore

            client = await loop.run_in_executor(_executor, _clickhouse)
            _state["backfill"] = Backfill(
                client,
                settings.clickhouse_database,
                QuotaStore(settings.quota_db_url),
                meter=settings.worker_backfill_meter,
                lateness_seconds=settings.event_max_lateness,
            )
        n = await loop.run_in_executor(_executor, _state["backfill"].run_once)
        metrics.backfill_rows.inc(n)
    except Exception:
        metrics.backfill_failures.inc()
        log.exception("backfill round failed")


__all__ = [
    "accepted_usage",
    "aggregate",
    "app",
    "dead_letters",
    "tenant_daily_usage",
    "tenant_recent_usage",
    "usage_events",
]

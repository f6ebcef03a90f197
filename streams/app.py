"""The Faust app of the worker: its topics, tables and agents, declared once, here.

- ``usage_events`` / ``dead_letters``: the pipeline's topics (raw bytes; decoding is ours, so a
  malformed message reaches the dead letters with its original bytes).
- The sink (:mod:`streams.consumer`, :class:`streams.sink.ClickHouseSink`) runs as a task of this
  app with its own consumer: exactly once into ClickHouse, offsets stored with the rows.
- ``accepted_usage``: the sink's inserted rows are handed to the tables exactly once, also
  across a crash (:mod:`streams.handoff`): their billable per-minute sums are kept per source
  partition as an open offset range, and every ``WORKER_AGGREGATE_INTERVAL`` s (on a revoke, at
  shutdown) the ranges are recorded in ClickHouse and then sent, one message per tenant and
  range. The ``aggregate`` agent folds them into ``tenant_daily_usage`` (billable, per tenant,
  meter and UTC day: key ``"<tenant>|<meter>|<YYYY-MM-DD>"``) and ``tenant_recent_usage``
  (hopping windows of the events' own minutes, so late events land in their own window, per
  ``"<tenant>|<meter>"``); meters are never added up. Each value carries, per source partition,
  the end of the last range applied to it, so a replay or a resend is dropped. The next owner
  of a partition resends its last recorded range and hands off the rows after it, from
  ClickHouse.
- Tables use the in-memory store backed by their changelog topics: after a restart or a rebalance
  Faust replays the changelog into memory before the agent resumes (no RocksDB needed); a
  record older than the value already recovered (by the values' marks: an evicted worker's
  late writes) is skipped (:mod:`streams.stores`).
- ``sweep`` timer: every ``SWEEP_INTERVAL`` s deletes, with a changelog tombstone, the daily
  values of closed days (older than ``EVENT_MAX_LATENESS`` plus a day) and the windows ended
  more than ``WINDOW_EXPIRES`` ago, also those the changelog brought back after a restart; the
  agent does not write them. Faust's own window expiry (set later, a backstop) drops keys from
  memory without a tombstone and never expires recovered ones.
- ``backfill`` timer: every ``WORKER_BACKFILL_INTERVAL`` s upserts absolute per tenant per UTC day
  billable totals into the quota DB, read from ClickHouse (the exact source, see
  :mod:`streams.backfill`); one more round runs at shutdown, after the sink stopped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import faust
from aiokafka.partitioner import DefaultPartitioner
from faust.types.transports import PartitionerT

from metering.settings import Settings, get_settings
from streams import metrics
from streams.handoff import (
    CLOCK_MARGIN_SECONDS,
    Handoff,
    HandoffLedger,
    closed_daily_keys,
    daily_key,
    expired_window_keys,
    first_open_day,
    flush,
    fold_into,
    fold_legacy_into,
    is_handoff_message,
    plan_recovery,
    record_claimed,
    tenant_of,
    usage,
    window_key,
)
from streams.sink import ClickHouseSink, ClickHouseStorage, PreparedBatch
from streams.stores import STORE_URL

log = logging.getLogger(__name__)

settings: Settings = get_settings()

WINDOW_SIZE = 300.0  # the last five minutes ...
WINDOW_STEP = 60.0  # ... at one-minute resolution
WINDOW_EXPIRES = dt.timedelta(minutes=30)
AGGREGATE_FLUSH_SECONDS = settings.worker_aggregate_interval
SWEEP_INTERVAL = settings.worker_table_sweep_interval  # the tables' sweep (closed days, ...)
SWEEP_LIMIT = 10_000  # deletions per table and slice: a sweep runs slices until none is left


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in bootstrap.split(",") if hp.strip()]


app = faust.App(
    settings.worker_group,
    broker=_broker_urls(settings.kafka_bootstrap_servers),
    # Faust's in-memory store, recovering each key by its marks (streams/stores.py)
    store=STORE_URL,
    value_serializer="raw",
    topic_partitions=settings.usage_events_partitions,
    web_enabled=False,
    broker_session_timeout=settings.worker_session_timeout or 60.0,  # Faust's default
    consumer_group_instance_id=settings.worker_instance_id,
    # Faust's default is "<app id>-data" in the working directory: keep it with the worker's
    # other state instead of wherever the process was started (Faust creates one level).
    datadir=str(settings.metering_data_dir / "faust-{conf.name}"),
    # The agent writes its changelog records (a daily and five window updates per minute in
    # each hand-off) in bursts; with Faust's default linger of 0 each became a produce request
    # of its own, ~5% of the worker's CPU under a steady load (py-spy, bench_worker phase 2).
    # 50 ms groups a burst; a hand-off's acknowledgements come up to 50 ms later, which nothing
    # is waiting on (the sink has written and committed its batch by then).
    producer_linger=0.05,
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

#: per "<tenant>|<meter>|<YYYY-MM-DD>" (``daily_key``; UTC day of the event's time):
#: ``{"q": billable quantity, "m": {source partition: end of the last range applied}}`` (read
#: the quantity with ``usage``). Closed days are swept (``sweep``).
tenant_daily_usage = app.Table("tenant_daily_usage", default=None)
#: the same values per "<tenant>|<meter>" (``window_key``) in hopping windows over the events'
#: own time; Faust's key is ``(that, (window start, window end))``. The ``sweep`` expires them
#: (with a tombstone) ``WINDOW_EXPIRES`` after their end. Faust's own expiry, kept two sweeps
#: later as a backstop, pops keys from memory without a tombstone (so they came back at the
#: next restart) and never expires the keys recovered from the changelog.
tenant_recent_usage = app.Table("tenant_recent_usage", default=None).hopping(
    WINDOW_SIZE, WINDOW_STEP, expires=WINDOW_EXPIRES + dt.timedelta(seconds=2 * SWEEP_INTERVAL)
)


def _window_ranges(timestamp: float) -> list[Any]:
    """The hopping windows holding ``timestamp`` (Faust's own ``WindowRange`` keys)."""
    window = tenant_recent_usage.table.window
    assert window is not None
    return list(window.ranges(timestamp))


def _open_from(now: float) -> dict[str, Any]:
    """What the tables still take at ``now``: the sweep deletes the rest."""
    return {
        "days_from": first_open_day(now, settings.event_max_lateness),
        "windows_after": now - WINDOW_EXPIRES.total_seconds(),
    }


def fold_handoff(handoff: Handoff, now: float | None = None) -> int:
    """Apply one hand-off to the tables (see ``streams.handoff.fold_into``)."""
    return fold_into(
        handoff,
        tenant_daily_usage,
        tenant_recent_usage.table,
        _window_ranges,
        **_open_from(time.time() if now is None else now),
    )


@app.agent(accepted_usage)
async def aggregate(stream: Any) -> None:
    """Fold the sink's hand-offs into the per-day and windowed tables, each once."""
    async for value in stream:
        try:
            if is_handoff_message(value):
                fold_handoff(Handoff.from_message(value))
            else:
                fold_legacy_into(
                    value,
                    tenant_daily_usage,
                    tenant_recent_usage.table,
                    _window_ranges,
                    **_open_from(time.time()),
                )
        except (ValueError, KeyError, TypeError) as exc:  # our own topic: a bug, not input
            metrics.handoffs_malformed.inc()
            log.error("accepted_usage: malformed message skipped (%s): %r", exc, value)


# --- the sweep: closed days and expired windows leave the tables, with a tombstone ---------------
# (getattr: mypy reads the setting, a callable class attribute, as a method of Settings)
_partitioner = cast(
    PartitionerT, getattr(app.conf, "producer_partitioner", None) or DefaultPartitioner()
)


def tenant_partition(tenant: str, partitions: int) -> int:
    """The ``accepted_usage`` partition of ``tenant``'s hand-offs (keyed by tenant), picked the
    way the producer picks it. It is the changelog partition of every key of the tenant: the
    agent writes a key while it processes one of those hand-offs, and Faust sends the changelog
    record to the partition of the event being processed."""
    # The topic's own key serializer, as ``accepted_usage.send(key=...)`` serializes the key.
    key, _ = accepted_usage.prepare_key(tenant, None)
    ids = list(range(partitions))
    return int(_partitioner(key, ids, ids))


def _delete(table: Any, keys: list[Any], partitions: int, owned: Collection[int]) -> int:
    """``del table[key]`` for each key, with the key's own changelog partition (Faust's
    ``on_key_del`` takes it from the current event, and a timer has none). Keys of partitions
    this worker does not own (standby copies, leftovers of a rebalance) only leave its memory:
    their owner's sweep tombstones them. Returns the tombstones sent."""
    sent = 0
    of_tenant: dict[str, int] = {}
    for key in keys:
        tenant = tenant_of(key)
        if (partition := of_tenant.get(tenant)) is None:
            partition = of_tenant[tenant] = tenant_partition(tenant, partitions)
        if partition in owned:
            table.send_changelog(partition, key, None, value_serializer="raw")
            sent += 1
        table.data.pop(key, None)
    return sent


def sweep_tables(now: float, partitions: int, owned: Collection[int]) -> tuple[int, int]:
    """Delete the daily values of closed days (``first_open_day``) and the windows that ended
    more than ``WINDOW_EXPIRES`` before ``now``: at most ``SWEEP_LIMIT`` of each. Synchronous
    (nothing of the agent runs in between). Returns the (daily, window) keys deleted."""
    daily = closed_daily_keys(
        tenant_daily_usage.data.keys(),
        first_open_day(now, settings.event_max_lateness),
        SWEEP_LIMIT,
    )
    windows = expired_window_keys(
        tenant_recent_usage.table.data.keys(),
        now - WINDOW_EXPIRES.total_seconds(),
        SWEEP_LIMIT,
    )
    _delete(tenant_daily_usage, daily, partitions, owned)
    _delete(tenant_recent_usage.table, windows, partitions, owned)
    return len(daily), len(windows)


async def sweep_all(now: Callable[[], float] = time.time) -> tuple[int, int] | None:
    """Run ``sweep_tables`` slice after slice until a slice finds less than ``SWEEP_LIMIT`` of
    each to delete, letting the agents run between slices. One slice per sweep fell behind once
    more than ``SWEEP_LIMIT`` windows expired per interval (a tenant sending fresh meter names
    makes that many), and Faust's own expiry then popped the rest without a tombstone: they came
    back at every restart. None until the consumer knows ``accepted_usage``'s partitions (a
    tombstone must reach the key's own partition); else the (daily, window) keys deleted."""
    topic = accepted_usage.get_topic_name()
    days = windows = 0
    while True:
        partitions = app.consumer.topic_partitions(topic)
        if not partitions:
            return None
        owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}
        d, w = sweep_tables(now(), partitions, owned)
        days, windows = days + d, windows + w
        if d < SWEEP_LIMIT and w < SWEEP_LIMIT:
            return days, windows
        await asyncio.sleep(0)


@app.timer(SWEEP_INTERVAL)
async def sweep() -> None:
    """Keep the tables bounded: see ``sweep_all``."""
    try:
        swept = await sweep_all()
    except Exception:
        log.exception("table sweep failed; retried at the next one")
        return
    if swept is None:
        return
    days, windows = swept
    if days or windows:
        log.info(
            "table sweep: %d closed daily values and %d expired windows deleted", days, windows
        )


# --- the hand-off: exactly once into the tables (streams/handoff.py) -----------------------------
def _windows_closed_before() -> float:
    """The time before which a minute is in no window the agent still writes, on any worker
    whose clock is at most ``CLOCK_MARGIN_SECONDS`` behind this one's (see
    ``streams.handoff.merge_closed_minutes``)."""
    return time.time() - WINDOW_SIZE - WINDOW_EXPIRES.total_seconds() - CLOCK_MARGIN_SECONDS


ledger = HandoffLedger(settings.usage_events_topic, _windows_closed_before)
_handoff_lock = asyncio.Lock()


async def publish_aggregates(batch: PreparedBatch) -> None:
    """Add an inserted batch's sums to the open ranges; ``flush_aggregates`` hands them off
    (the sink's next batch never waits on the live view: ClickHouse already holds the rows)."""
    ledger.add(batch)


async def _send(handoffs: list[Handoff]) -> None:
    futures = [await accepted_usage.send(key=h.tenant, value=h.message()) for h in handoffs]
    await asyncio.gather(*futures)


#: this process's name in ``aggregate_claims`` (a claim is made per assignment, numbered)
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def _record(ranges: list[tuple[int, int, int]]) -> set[int]:
    """Record the ranges of the partitions this worker still holds the claim of; the others
    (claimed by another worker since: this one was evicted from the group) are lost to it."""
    loop = asyncio.get_running_loop()
    storage = _state["storage"]
    lost: set[int] = await loop.run_in_executor(
        _executor,
        record_claimed,
        storage,
        settings.usage_events_topic,
        ranges,
        dict(ledger.claims),
    )
    if lost:
        metrics.handoff_fenced.inc(len(lost))
        log.warning(
            "hand-off: partitions %s of %s were claimed by another worker since this one"
            " recovered them (it was evicted from the group: a stall past"
            " WORKER_SESSION_TIMEOUT?); their rows are left to that worker",
            sorted(lost),
            settings.usage_events_topic,
        )
    return lost


async def hand_off(partitions: set[int] | None = None) -> int:
    """One flush of the ledger (``streams.handoff.flush``), under the hand-off lock."""
    async with _handoff_lock:
        n = await flush(ledger, _record, _send, partitions)
    metrics.handoff_messages.inc(n)
    return n


async def _recover(resume: dict[int, int]) -> None:
    """On assignment: resend the partitions' last recorded ranges and open the rows after them
    (see ``streams.handoff.plan_recovery``). A failure fails the assignment, which the sink
    consumer retries with backoff before it processes anything of these partitions."""
    loop = asyncio.get_running_loop()
    async with _handoff_lock:
        plans = await loop.run_in_executor(
            _executor, plan_recovery, _state["storage"], settings.usage_events_topic, resume, OWNER
        )
        ledger.recover(plans)
    _warn_if_split()
    resent = [p.partition for p in plans if p.resend is not None and p.resend.sums]
    reopened = [p.partition for p in plans if p.open.sums]
    if resent or reopened:
        log.info(
            "hand-off recovered: last ranges of %s queued again, rows after them in %s",
            resent,
            reopened,
        )


def embedded_split_warning(
    embedded: bool, topic: str, owned: Collection[int], partitions: Collection[int]
) -> str | None:
    """The warning for a worker on the embedded engine that owns only some of ``topic``'s
    partitions: another worker of its group writes the rest into another folder. None when
    nothing is split (one worker, or a ClickHouse server shared by all of them)."""
    if not embedded or not owned or not partitions or set(partitions) <= set(owned):
        return None
    return (
        f"this worker owns {len(owned)} of the {len(partitions)} partitions of {topic}"
        f" ({sorted(owned)}) and writes them to an embedded ClickHouse folder: another worker"
        f" of group {settings.worker_group} writes the others to its own. Each folder then"
        " answers for its partitions only, and rows a worker inserted and had not yet handed to"
        " the live tables when it was evicted from the group are in no other folder to recover"
        " them from. Run several workers against one ClickHouse server (CLICKHOUSE_URL="
        "http(s)://...), or one worker."
    )


def _warn_if_split() -> None:
    """Once per process: :func:`embedded_split_warning` for the sink's current assignment."""
    sink = _state.get("consumer")
    kafka = getattr(sink, "consumer", None)
    if kafka is None or _state.get("split_warned"):
        return
    topic = settings.usage_events_topic
    owned = {tp.partition for tp in kafka.assignment() if tp.topic == topic}
    message = embedded_split_warning(
        settings.clickhouse_embedded, topic, owned, kafka.partitions_for_topic(topic) or ()
    )
    if message is not None:
        _state["split_warned"] = True
        log.warning(message)


async def _revoked(partitions: set[int]) -> None:
    """Before a partition moves: hand its open range off, so the next owner starts after it."""
    try:
        await hand_off(partitions)
    finally:
        ledger.close(partitions)


@app.timer(AGGREGATE_FLUSH_SECONDS)
async def flush_aggregates() -> None:
    """Hand the open ranges off to ``accepted_usage`` (one message per tenant and range).

    Each message costs the ``aggregate`` agent a daily and five window updates per minute it
    holds, each with its changelog record: so the interval, not the event rate, sets this cost,
    and a longer interval is cheaper."""
    if "storage" not in _state:
        return
    try:
        await hand_off()
    except Exception:
        metrics.handoff_failures.inc()
        log.exception("hand-off to the Faust tables failed; retried at the next flush")


@app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode types the sender positional-only
async def _last_aggregates(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
    """At shutdown (Faust's consumer stopped, its producer not yet flushed): let the sink
    finish its batch in flight, then hand off what is still open, so the live tables get it when
    the agent next runs instead of from the next owner's recovery. A last backfill round reads
    the sink's last batches into the quota DB: the timer's last round may have run before them,
    and their day may have closed by the time a worker runs again."""
    consumer = _state.get("consumer")
    if consumer is not None:
        consumer.stop()
        try:
            await asyncio.wait_for(consumer.stopped.wait(), timeout=30)
        except TimeoutError:
            log.warning("the sink did not stop within 30 s; its last sums may be missing")
    if "storage" not in _state:
        return
    try:
        await asyncio.wait_for(backfill_round(), timeout=30)
    except TimeoutError:
        log.warning("shutdown: the last backfill round did not finish within 30 s")
    try:
        n = await hand_off()
    except Exception:
        log.exception("shutdown: the last hand-off failed; the next owner recovers it")
        return
    if n:
        log.info("shutdown: %d last hand-offs sent to %s", n, accepted_usage)


# --- the sink and the backfill share one thread: the ClickHouse client is used from it only -----
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
_state: dict[str, Any] = {}


def _clickhouse() -> Any:
    """The worker's ClickHouse client; the schema was migrated before Faust started (``metering
    worker`` and ``metering up`` both migrate first, so a failure is their one-line error)."""
    if "client" not in _state:
        from metering.clickhouse.client import clickhouse_client

        _state["client"] = clickhouse_client(settings.clickhouse_url)
    return _state["client"]


@app.task
async def run_sink() -> None:
    from streams.consumer import SinkConsumer

    loop = asyncio.get_running_loop()
    client = await loop.run_in_executor(_executor, _clickhouse)
    storage = ClickHouseStorage(client, settings.clickhouse_database)
    _state["storage"] = storage
    sink = ClickHouseSink(
        storage,
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
        # Kafka's consumer default since 3.0 (KIP-735), not aiokafka's 10 s: an evicted sink
        # hands its open ranges off late, and a batch it had in flight may land after the next
        # owner read the partition (see streams/handoff.py and the README's "Scaling out").
        session_timeout=settings.worker_session_timeout or 45.0,
        instance_id=f"{settings.worker_instance_id}.sink" if settings.worker_instance_id else None,
        on_assigned=_recover,
        on_revoked=_revoked,
    )
    _state["consumer"] = consumer
    await consumer.run()


@app.timer(settings.worker_backfill_interval)
async def backfill() -> None:
    """Every ``WORKER_BACKFILL_INTERVAL`` s: :func:`backfill_round`."""
    await backfill_round()


async def backfill_round() -> None:
    """Upsert the open days' billable totals (from ClickHouse) into tenant_daily_usage. A
    failed round is logged (the first of an outage with its traceback, the next ones as one
    line each: a round runs every few seconds) and the next round reads the open days again."""
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
                measure=settings.worker_backfill_measure,
                lateness_seconds=settings.event_max_lateness,
                margin_seconds=300 + 2 * settings.worker_backfill_interval,
            )
        n = await loop.run_in_executor(_executor, _state["backfill"].run_once)
        metrics.backfill_rows.inc(n)
    except Exception as exc:
        metrics.backfill_failures.inc()
        failed = _state.get("backfill_failed", 0) + 1
        _state["backfill_failed"] = failed
        if failed == 1:  # the first failure of an outage with its traceback, then one line each
            log.exception("backfill round failed; the next round reads the open days again")
        else:
            line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            log.warning(
                "backfill round failed again (%d in a row, %s: %s)",
                failed,
                type(exc).__name__,
                line,
            )
        return
    if _state.pop("backfill_failed", 0):
        log.info("backfill rounds succeed again")


__all__ = [
    "accepted_usage",
    "aggregate",
    "app",
    "backfill",
    "backfill_round",
    "daily_key",
    "dead_letters",
    "sweep",
    "sweep_tables",
    "tenant_daily_usage",
    "tenant_recent_usage",
    "usage",
    "usage_events",
    "window_key",
]

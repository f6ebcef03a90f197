"""The sink loop in-process against real Kafka and the embedded ClickHouse (session engine).

Specification: every accepted event counts exactly once in ``usage_events`` and every rollup,
whatever arrives twice; malformed and too-late messages are dead letters with their reason;
a crash between the ClickHouse insert and the offset commit adds nothing on restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from metering.clickhouse.schema import migrate
from streams.consumer import SinkConsumer
from streams.sink import ClickHouseSink, ClickHouseStorage, Record
from tests.integration.streams_support import (
    committed_offsets,
    end_offsets,
    event_message,
    produce,
    read_all,
    unique_topics,
)

LATENESS = 3600.0


def make_sink(client, database: str, topic: str, lateness: float = LATENESS) -> ClickHouseSink:  # type: ignore[no-untyped-def]
    return ClickHouseSink(
        ClickHouseStorage(client, database),
        topic=topic,
        lateness_seconds=lateness,
        max_future_skew=300,
    )


async def run_until_caught_up(
    sink: ClickHouseSink, bootstrap: str, group: str, dlq: str, timeout: float = 60
) -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    consumer = SinkConsumer(
        sink,
        bootstrap=bootstrap,
        group_id=group,
        dlq_topic=dlq,
        batch_size=50,
        batch_within=0.2,
        executor=executor,
    )
    task = asyncio.create_task(consumer.run())
    ends = await asyncio.to_thread(end_offsets, bootstrap, sink.topic)
    try:
        async with asyncio.timeout(timeout):
            while True:
                done = await asyncio.to_thread(committed_offsets, bootstrap, group, sink.topic)
                if all(done.get(p, 0) >= e for p, e in ends.items()):
                    break
                if task.done():
                    task.result()
                await asyncio.sleep(0.3)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 15)
        executor.shutdown()


def totals(client, db: str) -> dict[str, tuple[int, float]]:  # type: ignore[no-untyped-def]
    rows = client.query(
        f"SELECT tenant, count(), sum(quantity) FROM {db}.usage_events GROUP BY tenant"
    ).result_rows
    return {t: (int(n), float(q)) for t, n, q in rows}


def rollup_totals(client, db: str, table: str) -> dict[str, tuple[int, float]]:  # type: ignore[no-untyped-def]
    rows = client.query(
        f"SELECT tenant, sum(event_count), sum(quantity_sum) FROM {db}.{table}"
        f" WHERE billable = 1 GROUP BY tenant"
    ).result_rows
    return {t: (int(n), float(q)) for t, n, q in rows}


@pytest.mark.timeout(120)
async def test_known_totals_with_duplicates_late_and_malformed_messages(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap)
    acme, globex = f"acme-{uuid.uuid4().hex[:6]}", f"globex-{uuid.uuid4().hex[:6]}"
    messages = [event_message(acme, 2, id=f"a{i}") for i in range(100)]  # 200
    messages += [event_message(globex, 3, id=f"g{i}") for i in range(50)]  # 150
    messages += [event_message(acme, 2, id=f"a{i}") for i in range(0, 100, 10)]  # resends
    messages += [event_message(globex, 5, id="g-late-ok", age_seconds=LATENESS - 600)]  # counts
    messages += [event_message(globex, 1000, id="g-too-late", age_seconds=LATENESS + 600)]
    messages += [(b"x", b"{not json"), (acme.encode(), b'{"specversion":"1.0","id":"m1"}')]
    produce(kafka_bootstrap, topic, messages)

    sink = make_sink(clickhouse_client, clickhouse_db, topic)
    await run_until_caught_up(sink, kafka_bootstrap, f"g-{topic}", dlq)

    expected = {acme: (100, 200.0), globex: (51, 155.0)}
    assert totals(clickhouse_client, clickhouse_db) == expected
    for table in ("usage_minute", "usage_hour", "usage_day", "usage_minute_by_time"):
        assert rollup_totals(clickhouse_client, clickhouse_db, table) == expected
    # The late-but-accepted event sits in the minute of its own time, 50 minutes back.
    late = clickhouse_client.query(
        f"SELECT dateDiff('minute', bucket, now()), sum(quantity_sum)"
        f" FROM {clickhouse_db}.usage_minute WHERE tenant = {{t:String}}"
        f" AND bucket < now() - INTERVAL 40 MINUTE GROUP BY bucket",
        parameters={"t": globex},
    ).result_rows
    assert len(late) == 1 and 49 <= late[0][0] <= 51 and late[0][1] == 5.0
    letters = read_all(kafka_bootstrap, dlq)
    reasons = sorted(dict(m.headers)["dlq.reason"].decode() for m in letters)
    assert reasons == ["invalid", "invalid", "late"]
    assert {m.value for m in letters} >= {b"{not json", b'{"specversion":"1.0","id":"m1"}'}


@pytest.mark.timeout(120)
async def test_a_message_too_large_to_dead_letter_whole_does_not_stop_the_sink(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """A message just under Kafka's size limit is still too large once the dead letter's
    headers are added. It goes to the dead letters without its value (its headers name the
    source offset and the size), and the events after it are inserted: before, the producer
    refused it and the batch, then every later one, failed for good."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"big-{uuid.uuid4().hex[:6]}"
    huge = b"x" * 1_048_450  # fits as a message, not with the dlq.* headers
    produce(kafka_bootstrap, topic, [event_message(tenant, 1, id="before"), (b"k", huge)])
    produce(kafka_bootstrap, topic, [event_message(tenant, 2, id="after")])
    sink = make_sink(clickhouse_client, clickhouse_db, topic)
    await run_until_caught_up(sink, kafka_bootstrap, f"g-{topic}", dlq)
    assert totals(clickhouse_client, clickhouse_db)[tenant] == (2, 3.0)
    (letter,) = read_all(kafka_bootstrap, dlq)
    headers = dict(letter.headers)
    assert letter.value in (b"", None)
    assert headers["dlq.reason"] == b"invalid" and headers["dlq.offset"] == b"1"
    assert headers["dlq.value_omitted"] == str(len(huge)).encode()


@pytest.mark.timeout(120)
async def test_a_crash_after_the_insert_and_before_the_commit_adds_nothing_on_restart(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"crash-{uuid.uuid4().hex[:6]}"
    produce(kafka_bootstrap, topic, [event_message(tenant, 1, id=f"e{i}") for i in range(300)])

    # The first life: the first 120 messages are inserted (with their offsets), then the
    # process dies before writing progress or committing anything to Kafka.
    first = make_sink(clickhouse_client, clickhouse_db, topic)
    first.on_assigned([0])  # records progress 0, as every assignment does
    records = [
        Record(m.topic, m.partition, m.offset, m.key, m.value)
        for m in read_all(kafka_bootstrap, topic)
    ]
    first.storage.insert_events(first.prepare(records[:120]).rows())
    assert committed_offsets(kafka_bootstrap, f"g-{topic}", topic) == {}

    # The second life reads from its progress (0), recognises the 120 stored rows by their
    # offsets and inserts the other 180, whatever Kafka's (absent) commit says.
    second = make_sink(clickhouse_client, clickhouse_db, topic)
    await run_until_caught_up(second, kafka_bootstrap, f"g-{topic}", dlq)
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (300, 300.0)}
    assert rollup_totals(clickhouse_client, clickhouse_db, "usage_day") == {tenant: (300, 300.0)}


@pytest.mark.timeout(120)
async def test_an_insert_cut_between_two_days_partitions_loses_nothing_on_restart(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """``usage_events`` is partitioned by day, and ClickHouse commits one part per partition of
    an insert, one after another: a batch holding late events of yesterday and events of today
    can be cut (a kill, an error) with today's part stored and yesterday's not. The stored part
    holds the higher offsets, so resuming after the highest stored offset skipped yesterday's
    events for good; the sink resumes from its recorded progress, and the rebuilt id set drops
    what was stored."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"cut-{uuid.uuid4().hex[:6]}"
    now = dt.datetime.now(dt.UTC)
    since_midnight = (now - now.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
    lateness = since_midnight + 3600  # yesterday's last hour is still on time
    produce(
        kafka_bootstrap,
        topic,
        [
            event_message(tenant, 1, id="yesterday-a", age_seconds=since_midnight + 60),
            event_message(tenant, 2, id="yesterday-b", age_seconds=since_midnight + 30),
            event_message(tenant, 10, id="today-a"),
            event_message(tenant, 20, id="today-b"),
        ],
    )
    first = make_sink(clickhouse_client, clickhouse_db, topic, lateness)
    first.on_assigned([0])
    batch = first.prepare(
        [
            Record(m.topic, m.partition, m.offset, m.key, m.value)
            for m in read_all(kafka_bootstrap, topic)
        ]
    )
    assert [ev.id for _, ev in batch.events] == ["yesterday-a", "yesterday-b", "today-a", "today-b"]
    # The cut: today's part (offsets 2, 3) committed, yesterday's (0, 1) not; then the kill.
    today = [i for i, (_, ev) in enumerate(batch.events) if ev.time.date() == now.date()]
    first.storage.insert_events([batch.rows()[i] for i in today], [batch.millis[i] for i in today])

    second = make_sink(clickhouse_client, clickhouse_db, topic, lateness)
    await run_until_caught_up(second, kafka_bootstrap, f"g-{topic}", dlq)
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (4, 33.0)}
    assert rollup_totals(clickhouse_client, clickhouse_db, "usage_day") == {tenant: (4, 33.0)}
    assert rollup_totals(clickhouse_client, clickhouse_db, "usage_minute") == {tenant: (4, 33.0)}


@pytest.mark.timeout(120)
async def test_a_replay_of_already_inserted_ids_from_an_earlier_offset_adds_nothing(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """Producer retries after the sink moved on: same ids at new offsets are dropped by id,
    including after a restart (the id set is rebuilt from ClickHouse)."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"retry-{uuid.uuid4().hex[:6]}"
    batch = [event_message(tenant, 1, id=f"e{i}") for i in range(50)]
    produce(kafka_bootstrap, topic, batch)
    await run_until_caught_up(
        make_sink(clickhouse_client, clickhouse_db, topic), kafka_bootstrap, f"g-{topic}", dlq
    )
    produce(kafka_bootstrap, topic, batch)  # the whole batch again, new offsets
    await run_until_caught_up(
        make_sink(clickhouse_client, clickhouse_db, topic), kafka_bootstrap, f"g-{topic}", dlq
    )
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (50, 50.0)}


@pytest.mark.timeout(120)
async def test_a_crash_between_usage_events_and_the_rollups_is_completed_on_restart(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """ClickHouse writes usage_events before each materialized view: a kill in between leaves
    rollups short by that batch, and the next assignment completes them."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"cut-{uuid.uuid4().hex[:6]}"
    produce(kafka_bootstrap, topic, [event_message(tenant, 2, id=f"e{i}") for i in range(200)])
    records = [
        Record(m.topic, m.partition, m.offset, m.key, m.value)
        for m in read_all(kafka_bootstrap, topic)
    ]
    first = make_sink(clickhouse_client, clickhouse_db, topic)
    first.write(first.prepare(records[:80]))  # a complete batch: rows, views, progress
    views = ["usage_minute_mv", "usage_day_mv"]
    for view in views:  # the kill lands after usage_events, before these two views
        clickhouse_client.command(f"DETACH TABLE {clickhouse_db}.{view}")
    first.storage.insert_events(first.prepare(records[80:150]).rows())
    for view in views:
        clickhouse_client.command(f"ATTACH TABLE {clickhouse_db}.{view}")
    assert rollup_totals(clickhouse_client, clickhouse_db, "usage_day") == {tenant: (80, 160.0)}

    await run_until_caught_up(
        make_sink(clickhouse_client, clickhouse_db, topic), kafka_bootstrap, f"g-{topic}", dlq
    )
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (200, 400.0)}
    for table in ("usage_minute", "usage_hour", "usage_day", "usage_minute_by_time"):
        assert rollup_totals(clickhouse_client, clickhouse_db, table) == {tenant: (200, 400.0)}
    latest = clickhouse_client.query(
        f"SELECT max(quantity_max), uniqExactMerge(quantity_uniq) FROM {clickhouse_db}.usage_day"
    ).result_rows
    assert latest == [(2.0, 1)]


class UnavailableStorage(ClickHouseStorage):
    """The real storage, whose chosen calls fail as they would with the ClickHouse server
    down: ``before`` fails the call's n-th invocation without writing, ``after`` lets it write
    and then fails (the client timed out on an insert the server completed)."""

    def __init__(
        self, client, database: str, before: dict[str, set[int]], after: dict[str, set[int]]
    ):  # type: ignore[no-untyped-def]
        super().__init__(client, database)
        self.before, self.after = before, after
        self.calls: dict[str, int] = {}
        #: when each call came (time.monotonic()), per call name
        self.times: dict[str, list[float]] = {}

    def _call(self, name: str, fn, *args):  # type: ignore[no-untyped-def]
        n = self.calls[name] = self.calls.get(name, 0) + 1
        self.times.setdefault(name, []).append(time.monotonic())
        if n in self.before.get(name, set()):
            raise ConnectionError(f"ClickHouse unavailable ({name} #{n})")
        result = fn(*args)
        if n in self.after.get(name, set()):
            raise TimeoutError(f"ClickHouse did not answer ({name} #{n})")
        return result

    def insert_events(self, rows, millis=None):  # type: ignore[no-untyped-def]
        return self._call("insert_events", super().insert_events, rows, millis)

    def record_progress(self, topic, next_offsets):  # type: ignore[no-untyped-def]
        return self._call("record_progress", super().record_progress, topic, next_offsets)

    def repair_unfinished_batch(self, topic, partitions):  # type: ignore[no-untyped-def]
        return self._call("repair", super().repair_unfinished_batch, topic, partitions)


@pytest.mark.timeout(120)
async def test_the_sink_rides_out_clickhouse_failures_and_counts_each_event_once(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """ClickHouse refusing the first assignments, refusing inserts, and completing an insert
    whose answer never came: the sink backs off and carries on (it used to end its task when
    the re-read after a failed batch failed too), and every event counts once."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=2)
    tenant = f"flaky-{uuid.uuid4().hex[:6]}"
    messages = [event_message(tenant, 1, id=f"e{i}") for i in range(400)]
    messages += [event_message(tenant, 1, id=f"e{i}") for i in range(0, 400, 7)]  # resends
    produce(kafka_bootstrap, topic, messages)
    storage = UnavailableStorage(
        clickhouse_client,
        clickhouse_db,
        before={"repair": {1, 2}, "insert_events": {2, 3}, "record_progress": {5}},
        after={"insert_events": {6}},
    )
    sink = ClickHouseSink(storage, topic=topic, lateness_seconds=LATENESS, max_future_skew=300)
    failed_before = REGISTRY.get_sample_value("streams_sink_insert_failures_total") or 0.0
    await run_until_caught_up(sink, kafka_bootstrap, f"g-{topic}", dlq, timeout=90)
    failed = REGISTRY.get_sample_value("streams_sink_insert_failures_total") or 0.0
    assert failed - failed_before >= 4  # two refused inserts, a progress write, a lost answer
    assert REGISTRY.get_sample_value("streams_sink_unpositioned_partitions") == 0
    assert storage.calls["repair"] >= 4  # two refused, then every re-read after a failed batch
    assert storage.calls["insert_events"] >= 6
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (400, 400.0)}
    for table in ("usage_minute", "usage_day"):
        assert rollup_totals(clickhouse_client, clickhouse_db, table) == {tenant: (400, 400.0)}


def sink_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The consumer's records of failed attempts, in order."""
    return [
        r
        for r in caplog.records
        if r.name == "streams.consumer" and r.levelno >= logging.WARNING and "failed" in r.msg
    ]


@pytest.mark.timeout(120)
async def test_the_retry_wait_grows_while_clickhouse_refuses_inserts_with_one_traceback(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ClickHouse refusing every insert while the reads of the re-positioning succeed: each
    retry waits twice as long as the one before (0.5, 1, 2, 4 s), the first failure is logged
    with its traceback and the next ones as one line with the attempt and the wait; a written
    batch ends the outage, so the next failure starts at 0.5 s with a traceback again. (The
    successful re-positioning reset the count: every retry waited 0.5 s and logged a
    traceback, 16 in 15 s.)"""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"refused-{uuid.uuid4().hex[:6]}"
    produce(kafka_bootstrap, topic, [event_message(tenant, 1, id=f"e{i}") for i in range(120)])
    # Calls 1-4: one batch refused four times, then written (5); the next batch is written (6);
    # the one after (7) is refused once: a new outage.
    storage = UnavailableStorage(
        clickhouse_client, clickhouse_db, before={"insert_events": {1, 2, 3, 4, 7}}, after={}
    )
    sink = ClickHouseSink(storage, topic=topic, lateness_seconds=LATENESS, max_future_skew=300)
    caplog.set_level(logging.INFO, logger="streams.consumer")
    await run_until_caught_up(sink, kafka_bootstrap, f"g-{topic}", dlq, timeout=90)

    assert totals(clickhouse_client, clickhouse_db) == {tenant: (120, 120.0)}
    times = storage.times["insert_events"]
    assert len(times) >= 8
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for i, wait in enumerate([0.5, 1.0, 2.0, 4.0]):  # before attempts 2, 3, 4, 5
        assert gaps[i] >= wait, f"attempt {i + 2} came {gaps[i]:.2f} s after, not {wait} s"
    assert gaps[6] >= 0.5  # attempt 8 (after the new outage's first failure)
    failures = sink_failures(caplog)
    assert len(failures) == 5, [r.getMessage() for r in failures]
    first, *again, new_outage = failures
    assert first.exc_info is not None and first.levelno == logging.ERROR
    assert "retrying from the stored progress in 0.5 s" in first.getMessage()
    for n, (record, wait) in enumerate(zip(again, [1.0, 2.0, 4.0], strict=True), start=2):
        message = record.getMessage()
        assert record.exc_info is None and record.levelno == logging.WARNING
        assert f"attempt {n}," in message and f"retrying in {wait:.1f} s" in message, message
        assert "\n" not in message and "ClickHouse unavailable (insert_events" in message
    assert new_outage.exc_info is not None  # the count was reset by the written batch
    assert "retrying from the stored progress in 0.5 s" in new_outage.getMessage()
    assert any("after 4 failed attempts" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
async def test_dead_letters_of_a_batch_retried_after_failed_inserts_are_sent_once(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """A batch whose insert ClickHouse refuses is read and prepared again; its dead letters
    were sent again at every retry (3 malformed messages became 16 dead letters each in a 15 s
    outage). Each source offset is dead-lettered once; an event on time at the first try and
    late at a retry (the clock moved on) is dead-lettered then, though offsets above it were
    dead-lettered before; the usage rows still count once."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"dlq-{uuid.uuid4().hex[:6]}"
    messages = [event_message(tenant, 1, id=f"a{i}") for i in range(10)]  # offsets 0-9
    messages += [(tenant.encode(), b'{"not": "an event"}')]  # 10
    messages += [event_message(tenant, 7, id="late-later", age_seconds=LATENESS - 60)]  # 11
    messages += [event_message(tenant, 1, id=f"b{i}") for i in range(10)]  # 12-21
    messages += [(tenant.encode(), b"{not json")]  # 22
    messages += [(b"someone-else", event_message(tenant, 1, id="wrong-key")[1])]  # 23
    produce(kafka_bootstrap, topic, messages)
    storage = UnavailableStorage(
        clickhouse_client, clickhouse_db, before={"insert_events": {1, 2, 3}}, after={}
    )

    def clock() -> dt.datetime:  # two minutes on once the first insert failed
        shift = dt.timedelta(seconds=120 if storage.calls.get("insert_events") else 0)
        return dt.datetime.now(dt.UTC) + shift

    sink = ClickHouseSink(
        storage, topic=topic, lateness_seconds=LATENESS, max_future_skew=300, clock=clock
    )
    await run_until_caught_up(sink, kafka_bootstrap, f"g-{topic}", dlq, timeout=90)

    assert storage.calls["insert_events"] >= 4  # three refused, then written
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (20, 20.0)}
    letters = read_all(kafka_bootstrap, dlq)
    per_offset = Counter(int(dict(m.headers)["dlq.offset"]) for m in letters)
    assert per_offset == {10: 1, 11: 1, 22: 1, 23: 1}, per_offset
    reasons = {int(dict(m.headers)["dlq.offset"]): dict(m.headers)["dlq.reason"] for m in letters}
    assert reasons == {10: b"invalid", 11: b"late", 22: b"invalid", 23: b"invalid"}


def test_an_insert_leaves_no_batch_column_for_the_cycle_collector(
    clickhouse_client, clickhouse_db
) -> None:
    """The worker runs with a large young generation (metering/commands/worker.py), so anything
    an insert leaves in a reference cycle stays in memory until a collection: a batch's columns
    must be freed by the insert itself. (clickhouse-connect's InsertContext refers to itself;
    a throwaway one kept its columns, ~400 MB more RSS in bench_worker.)"""
    import gc

    migrate(clickhouse_client, clickhouse_db)
    topic = f"gc-{uuid.uuid4().hex[:8]}"
    sink = make_sink(clickhouse_client, clickhouse_db, topic)
    n = 3000
    for start in (0, n):  # the second insert reuses what the first one set up
        records = [
            Record(topic, 0, start + i, *event_message(f"t-{i % 7}", 1.0, id=f"g{start + i}"))
            for i in range(n)
        ]
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            sink.write(sink.prepare(records))
            del records
            gc.collect()
            kept = [o for o in gc.garbage if isinstance(o, list | tuple) and len(o) == n]
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
        assert kept == [], f"{len(kept)} columns of the batch were left to the cycle collector"
    count = clickhouse_client.query(
        f"SELECT count() FROM {clickhouse_db}.usage_events WHERE kafka_topic = {{t:String}}",
        parameters={"t": topic},
    ).result_rows[0][0]
    assert count == 2 * n

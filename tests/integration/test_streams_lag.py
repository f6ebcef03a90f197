"""The sink's lag and progress metrics against real Kafka and the embedded ClickHouse.

Specification: ``streams_consumer_lag`` is each owned partition's end offset minus the next
offset written to ClickHouse, measured also while the inserts fail (it read 0: it was set only
after a written batch); ``streams_sink_last_write_timestamp_seconds`` stands still meanwhile;
a revoked partition's series goes (it kept its last value on the old owner, and the dashboard's
``sum by (partition)`` added it to the new owner's); a batch read again after a failed insert
counts in ``streams_events_reread``, not again in ``streams_events_consumed``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY

from metering.clickhouse.schema import migrate
from streams.consumer import SinkConsumer
from streams.sink import ClickHouseSink, ClickHouseStorage, PreparedBatch, SinkRecord
from tests.integration.streams_support import (
    committed_offsets,
    end_offsets,
    event_message,
    produce,
    tenants_covering,
    unique_topics,
)

LATENESS = 3600.0


class SwitchedStorage(ClickHouseStorage):
    """The real storage, whose inserts fail while ``failing`` is set (ClickHouse down), and
    block while ``hanging`` is set (ClickHouse not answering)."""

    def __init__(self, client: Any, database: str) -> None:
        super().__init__(client, database)
        self.failing = threading.Event()
        self.hanging = threading.Event()
        self.released = threading.Event()
        #: time.time() of each insert attempt
        self.attempts: list[float] = []

    def insert_events(self, rows: Any, millis: Any = None) -> Any:
        self.attempts.append(time.time())
        if self.hanging.is_set():
            assert self.released.wait(60), "the test never released the insert"
        if self.failing.is_set():
            raise ConnectionError("ClickHouse unavailable (injected)")
        return super().insert_events(rows, millis)


class RecordingSink(ClickHouseSink):
    """The sink, keeping the (partition, offset) of every record it is given to prepare."""

    read: list[tuple[int, int]]

    def prepare(self, records: Iterable[SinkRecord]) -> PreparedBatch:
        records = list(records)
        self.read.extend((r.partition, r.offset) for r in records)
        return super().prepare(records)


def make_consumer(sink: ClickHouseSink, bootstrap: str, group: str, dlq: str) -> SinkConsumer:
    return SinkConsumer(
        sink,
        bootstrap=bootstrap,
        group_id=group,
        dlq_topic=dlq,
        batch_size=40,
        batch_within=0.1,
        executor=ThreadPoolExecutor(max_workers=1),
        lag_interval=0.2,
    )


def lag(partition: int) -> float | None:
    return REGISTRY.get_sample_value("streams_consumer_lag", {"partition": str(partition)})


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def wait_for(
    condition: Callable[[], bool], what: str, task: asyncio.Task[None], timeout: float = 45
) -> None:
    """Poll ``condition`` (metrics have no change notification) until true, failing after
    ``timeout`` s or as soon as the sink's task ends."""
    deadline = time.monotonic() + timeout
    while not condition():
        if task.done():
            task.result()
            raise AssertionError(f"the sink stopped before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def stop(consumer: SinkConsumer, task: asyncio.Task[None]) -> None:
    consumer.stop()
    await asyncio.wait_for(task, 20)
    consumer.executor.shutdown()


@pytest.mark.timeout(120)
async def test_while_every_insert_fails_the_lag_shows_the_backlog_and_reads_count_once(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=2)
    group = f"g-{topic}"
    tenants = tenants_covering(f"lag-{uuid.uuid4().hex[:6]}", 2, 2)
    produce(
        kafka_bootstrap,
        topic,
        [event_message(tenants[i % 4], 1, id=f"e{i}") for i in range(120)],
    )
    ends = end_offsets(kafka_bootstrap, topic)
    assert all(ends[p] > 0 for p in (0, 1)), ends
    storage = SwitchedStorage(clickhouse_client, clickhouse_db)
    storage.failing.set()
    sink = RecordingSink(storage, topic=topic, lateness_seconds=LATENESS, max_future_skew=300)
    sink.read = []
    consumed_before = sample("streams_events_consumed_total")
    reread_before = sample("streams_events_reread_total")
    consumer = make_consumer(sink, kafka_bootstrap, group, dlq)
    task = asyncio.create_task(consumer.run())
    try:
        # The lag rises to the whole backlog (nothing written: progress 0) while the sink
        # retries the same batch.
        await wait_for(
            lambda: len(storage.attempts) >= 3 and all(lag(p) == ends[p] for p in ends),
            "the lag of every partition to reach its backlog",
            task,
        )
        rows = clickhouse_client.query(f"SELECT count() FROM {clickhouse_db}.usage_events")
        assert rows.result_rows == [(0,)]
        last_write = sample("streams_sink_last_write_timestamp_seconds")
        assert 0 < last_write <= storage.attempts[0], "a failed insert counted as a write"

        healed = time.time()
        storage.failing.clear()
        await wait_for(
            lambda: all(lag(p) == 0 for p in ends), "the lag to fall to 0 once written", task
        )
        assert sample("streams_sink_last_write_timestamp_seconds") >= healed
        assert committed_offsets(kafka_bootstrap, group, topic) == ends
    finally:
        await stop(consumer, task)

    # Each offset counts as consumed once; the re-reads of the failed batches apart.
    consumed = sample("streams_events_consumed_total") - consumed_before
    reread = sample("streams_events_reread_total") - reread_before
    assert len(sink.read) > len(set(sink.read)) == sum(ends.values())
    assert consumed == len(set(sink.read))
    assert reread == len(sink.read) - len(set(sink.read))
    assert all(lag(p) is None for p in ends), "a stopped sink left lag series behind"


@pytest.mark.timeout(120)
async def test_the_lag_shows_the_backlog_while_an_insert_hangs(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """A hanging insert holds the batch loop (and its lock): the lag is measured apart."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"hang-{uuid.uuid4().hex[:6]}"
    produce(kafka_bootstrap, topic, [event_message(tenant, 1, id=f"e{i}") for i in range(60)])
    storage = SwitchedStorage(clickhouse_client, clickhouse_db)
    storage.hanging.set()
    sink = RecordingSink(storage, topic=topic, lateness_seconds=LATENESS, max_future_skew=300)
    sink.read = []
    consumer = make_consumer(sink, kafka_bootstrap, f"g-{topic}", dlq)
    task = asyncio.create_task(consumer.run())
    try:
        await wait_for(
            lambda: bool(storage.attempts) and lag(0) == 60, "the lag of the hung sink", task
        )
        assert sample("streams_sink_last_write_timestamp_seconds") <= storage.attempts[0]
    finally:
        storage.released.set()
        await stop(consumer, task)


@pytest.mark.timeout(120)
async def test_a_revoked_partition_has_no_lag_series_left_on_the_old_owner(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=2)
    group = f"g-{topic}"
    tenants = tenants_covering(f"rev-{uuid.uuid4().hex[:6]}", 2, 1)
    produce(kafka_bootstrap, topic, [event_message(tenants[i % 2], 1) for i in range(40)])
    ends = end_offsets(kafka_bootstrap, topic)
    storage = SwitchedStorage(clickhouse_client, clickhouse_db)
    sink = RecordingSink(storage, topic=topic, lateness_seconds=LATENESS, max_future_skew=300)
    sink.read = []
    consumer = make_consumer(sink, kafka_bootstrap, group, dlq)
    task = asyncio.create_task(consumer.run())
    other = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    try:
        await wait_for(lambda: all(lag(p) == 0 for p in ends), "both partitions caught up", task)
        # Inserts fail from now on: the series hold the backlog that builds up.
        storage.failing.set()
        produce(kafka_bootstrap, topic, [event_message(tenants[i % 2], 1) for i in range(40)])
        await wait_for(lambda: all((lag(p) or 0) > 0 for p in ends), "a backlog", task)

        await other.start()  # a second member: the partitions are split between the two

        def one_partition_reported() -> bool:
            assert consumer.consumer is not None
            kept = {tp.partition for tp in consumer.consumer.assignment()}
            return len(kept) == 1 and lag(kept.pop()) is not None and len(other.assignment()) == 1

        await wait_for(one_partition_reported, "the sink to report its one partition", task)
        assert consumer.consumer is not None
        (kept,) = {tp.partition for tp in consumer.consumer.assignment()}
        (gone,) = {tp.partition for tp in other.assignment()}
        assert lag(gone) is None, f"partition {gone}'s lag stayed on its old owner"
        assert (lag(kept) or 0) > 0
    finally:
        await other.stop()
        await stop(consumer, task)

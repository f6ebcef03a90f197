"""What the sink accepts from Kafka beyond plain messages, against real Kafka and the embedded
ClickHouse: transactional producers (aborted transactions, commit markers), dead letters the
dead-letter topic refuses (in a batch, with a key near Kafka's limit, too large even stripped),
and the original headers on dead letters.

Specification: only committed events count, and the lag of a partition written up to its end
reads 0 even when a commit marker holds its last offset; a dead letter too large for the
dead-letter topic never stops its partition (nor the dead letters sent with it) and leaves no
unretrieved future behind; a dead letter keeps the original's headers after its ``dlq.*`` ones,
and a CloudEvents binary-mode message is named as such.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from aiokafka import TopicPartition
from confluent_kafka import Producer
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from prometheus_client import REGISTRY

from metering.clickhouse.schema import migrate
from streams.consumer import SinkConsumer
from streams.sink import ClickHouseSink, ClickHouseStorage
from tests.integration.streams_support import (
    committed_offsets,
    end_offsets,
    event_message,
    produce,
    read_all,
)

LATENESS = 3600.0


def topics(
    bootstrap: str, *, dlq_configs: dict[str, str] | None = None, partitions: int = 1
) -> tuple[str, str]:
    """A fresh usage topic and dead-letter topic (with ``dlq_configs``) for one test."""
    base = f"ki-{uuid.uuid4().hex[:10]}"
    topic, dlq = f"{base}.events", f"{base}.dlq"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            [NewTopic(topic, partitions, 1), NewTopic(dlq, 1, 1, topic_configs=dlq_configs or {})]
        )
    finally:
        admin.close()
    return topic, dlq


def make_consumer(
    client: Any, db: str, topic: str, bootstrap: str, dlq: str, batch_size: int = 50
) -> SinkConsumer:
    sink = ClickHouseSink(
        ClickHouseStorage(client, db), topic=topic, lateness_seconds=LATENESS, max_future_skew=300
    )
    return SinkConsumer(
        sink,
        bootstrap=bootstrap,
        group_id=f"g-{topic}",
        dlq_topic=dlq,
        batch_size=batch_size,
        batch_within=0.2,
        executor=ThreadPoolExecutor(max_workers=1),
        lag_interval=0.2,
    )


async def wait_for(
    condition: Callable[[], Awaitable[bool]],
    what: str,
    task: asyncio.Task[None],
    timeout: float = 30,
) -> None:
    """Poll ``condition`` (Kafka offsets and metrics have no change notification) until true,
    failing after ``timeout`` s or as soon as the sink's task ends."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if task.done():
            task.result()
            raise AssertionError(f"the sink stopped before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def stop(consumer: SinkConsumer, task: asyncio.Task[None]) -> None:
    consumer.stop()
    await asyncio.wait_for(task, 20)
    consumer.executor.shutdown()


async def run_until_committed(consumer: SinkConsumer, bootstrap: str, timeout: float) -> None:
    """Run ``consumer`` until its group committed every partition's end (a topic without
    transactions: its end is its last record's offset + 1)."""
    task = asyncio.create_task(consumer.run())
    ends = await asyncio.to_thread(end_offsets, bootstrap, consumer.topic)

    async def caught_up() -> bool:
        done = await asyncio.to_thread(
            committed_offsets, bootstrap, consumer.group_id, consumer.topic
        )
        return all(done.get(p, 0) >= e for p, e in ends.items())

    try:
        await wait_for(caught_up, "the sink to commit the end of the topic", task, timeout)
    finally:
        await stop(consumer, task)


def totals(client: Any, db: str) -> dict[str, tuple[int, float]]:
    rows = client.query(
        f"SELECT tenant, count(), sum(quantity) FROM {db}.usage_events GROUP BY tenant"
    ).result_rows
    return {t: (int(n), float(q)) for t, n, q in rows}


def lag(partition: int) -> float | None:
    return REGISTRY.get_sample_value("streams_consumer_lag", {"partition": str(partition)})


@contextmanager
def unretrieved_future_errors() -> Iterator[list[dict[str, Any]]]:
    """The loop's "Future exception was never retrieved" reports while the block runs (a
    future is reported when collected: the block's end collects)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    reports: list[dict[str, Any]] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "never retrieved" in str(context.get("message")):
            reports.append(context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield reports
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


class Transactional:
    """A confluent-kafka transactional producer (as other clients may write), driven from a
    thread: its calls block."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "transactional.id": f"ki-{uuid.uuid4().hex}"}
        )

    async def write(self, topic: str, messages: list[tuple[bytes, bytes]], end: str) -> None:
        """One transaction of ``messages``, then ``end``: "commit", "abort" or "open" (its
        records written, the transaction left open)."""

        def run() -> None:
            p = self.producer
            p.begin_transaction()
            for key, value in messages:
                p.produce(topic, key=key, value=value)
            p.flush(30)
            if end == "commit":
                p.commit_transaction(30)
            elif end == "abort":
                p.abort_transaction(30)

        await asyncio.to_thread(run)

    async def start(self) -> None:
        await asyncio.to_thread(self.producer.init_transactions, 30)

    async def abort(self) -> None:
        await asyncio.to_thread(self.producer.abort_transaction, 30)


@pytest.mark.timeout(120)
async def test_events_of_aborted_and_open_transactions_are_not_counted(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """A transactional producer commits 10 events of 1, aborts 10 of 100, and leaves 5 of 1000
    in an open transaction: only the committed ones count (the consumer read uncommitted: 25
    events, 6010), and the open transaction holds the partition back until it ends. The end
    offset the lag is measured from is then the last stable offset, not the high watermark."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = topics(kafka_bootstrap)
    tenant = f"txn-{uuid.uuid4().hex[:6]}"
    txn = Transactional(kafka_bootstrap)
    await txn.start()
    await txn.write(topic, [event_message(tenant, 1, id=f"c{i}") for i in range(10)], "commit")
    await txn.write(topic, [event_message(tenant, 100, id=f"a{i}") for i in range(10)], "abort")
    # offsets 0-9, commit marker 10, 11-20 aborted, abort marker 21: stable up to 22
    open_ = [event_message(tenant, 1000, id=f"o{i}") for i in range(5)]
    await txn.write(topic, open_, "open")  # 22-26, not stable
    assert end_offsets(kafka_bootstrap, topic) == {0: 27}
    consumer = make_consumer(clickhouse_client, clickhouse_db, topic, kafka_bootstrap, dlq)
    task = asyncio.create_task(consumer.run())
    tp = TopicPartition(topic, 0)

    def read_to(offset: int) -> Callable[[], Awaitable[bool]]:
        """Read up to ``offset``, and the committed events written (committed after)."""

        async def condition() -> bool:
            c = consumer.consumer
            if c is None or tp not in c.assignment() or await c.position(tp) < offset:
                return False
            return (await c.committed(tp) or 0) >= 10

        return condition

    try:
        await wait_for(read_to(22), "the sink to read to the last stable offset", task)
        assert totals(clickhouse_client, clickhouse_db) == {tenant: (10, 10.0)}
        assert consumer.consumer is not None
        assert await consumer.consumer.end_offsets([tp]) == {tp: 22}
        await txn.abort()  # offsets 22-26 aborted, abort marker 27
        await wait_for(read_to(28), "the sink to read past the aborted transaction", task)
        assert await consumer.consumer.end_offsets([tp]) == {tp: 28}
        assert totals(clickhouse_client, clickhouse_db) == {tenant: (10, 10.0)}
    finally:
        await stop(consumer, task)


@pytest.mark.timeout(120)
async def test_the_lag_of_a_transactional_partition_written_to_its_end_reads_0(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """A committed transaction of 10 events ends at offset 11 (its commit marker at 10): the
    sink's progress is the last record's offset + 1 (10), and the lag read 1 for good, which
    would page MeteringWorkerStuck on a sink keeping up."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = topics(kafka_bootstrap)
    tenant = f"mark-{uuid.uuid4().hex[:6]}"
    txn = Transactional(kafka_bootstrap)
    await txn.start()
    await txn.write(topic, [event_message(tenant, 1, id=f"c{i}") for i in range(10)], "commit")
    assert end_offsets(kafka_bootstrap, topic) == {0: 11}
    consumer = make_consumer(clickhouse_client, clickhouse_db, topic, kafka_bootstrap, dlq)
    task = asyncio.create_task(consumer.run())

    async def written_and_lag_0() -> bool:
        return consumer._written.get(0) == 10 and lag(0) == 0

    try:
        await wait_for(written_and_lag_0, "the lag to read 0 once all is written", task, 20)
        assert totals(clickhouse_client, clickhouse_db) == {tenant: (10, 10.0)}
    finally:
        await stop(consumer, task)


@pytest.mark.timeout(120)
async def test_a_dead_letter_too_large_for_the_dlq_among_others_does_not_stop_the_partition(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """Dead letters sent together, one of them too large for the dead-letter topic: the
    broker refused it, and the idempotent producer then failed every later send with
    OutOfOrderSequenceNumber, the batch at every retry, and a restarted worker too (its
    refusal came after acknowledged dead letters again). Each dead letter goes, the small ones
    whole, the large one without its value; the events after them count; no send's failure
    is left unretrieved."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = topics(kafka_bootstrap, dlq_configs={"max.message.bytes": "100000"})
    tenant = f"dlqb-{uuid.uuid4().hex[:6]}"
    key = tenant.encode()
    messages = [event_message(tenant, 1, id="before")]  # 0
    messages += [(key, b'{"small-invalid-%d": 1}' % i) for i in range(5)]  # 1-5
    messages += [(key, b"x" * 200_000)]  # 6
    messages += [(key, b'{"small-invalid-%d": 1}' % i) for i in range(5, 10)]  # 7-11
    messages += [event_message(tenant, 2, id="after")]  # 12
    produce(kafka_bootstrap, topic, messages)
    consumer = make_consumer(clickhouse_client, clickhouse_db, topic, kafka_bootstrap, dlq)
    with unretrieved_future_errors() as reports:
        await run_until_committed(consumer, kafka_bootstrap, timeout=30)
        del consumer
    assert reports == []
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (2, 3.0)}
    letters = {int(dict(m.headers)["dlq.offset"]): m for m in read_all(kafka_bootstrap, dlq)}
    assert sorted(letters) == list(range(1, 12))
    for offset, letter in letters.items():
        if offset == 6:
            assert letter.value in (b"", None)
            assert dict(letter.headers)["dlq.value_omitted"] == b"200000"
        else:
            assert letter.value == messages[offset][1]
            assert "dlq.value_omitted" not in dict(letter.headers)


@pytest.mark.timeout(120)
async def test_a_message_whose_key_is_near_kafkas_limit_is_dead_lettered_without_it(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """A message with a key near Kafka's size limit (and an empty value): its dead letter was
    too large, and again without its value (the key was kept), which failed the batch for
    good. It goes without its key, whose size ``dlq.key_omitted`` gives."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = topics(kafka_bootstrap)
    tenant = f"hugekey-{uuid.uuid4().hex[:6]}"
    huge_key = b"k" * 1_048_480
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 1048576})
    messages = [event_message(tenant, 1, id="before"), (huge_key, b"")]
    for key, value in [*messages, event_message(tenant, 2, id="after")]:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0
    consumer = make_consumer(clickhouse_client, clickhouse_db, topic, kafka_bootstrap, dlq)
    await run_until_committed(consumer, kafka_bootstrap, timeout=30)
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (2, 3.0)}
    (letter,) = read_all(kafka_bootstrap, dlq)
    headers = dict(letter.headers)
    assert letter.key is None and letter.value in (b"", None)
    assert headers["dlq.offset"] == b"1" and headers["dlq.reason"] == b"invalid"
    assert headers["dlq.key_omitted"] == str(len(huge_key)).encode()
    assert headers["dlq.value_omitted"] == b"0"


@pytest.mark.timeout(120)
async def test_a_dead_letter_refused_even_stripped_is_skipped_counted_and_logged(
    kafka_bootstrap: str,
    clickhouse_client,
    clickhouse_db: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead-letter topic that takes no dead letter at all (its size limit below a dead
    letter's own headers): the same bytes would be refused at every retry, so failing the
    batch stopped the partition for good. The dead letter is skipped, counted in
    ``streams_dead_letters_unsendable`` and logged with its source offset."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = topics(kafka_bootstrap, dlq_configs={"max.message.bytes": "64"})
    tenant = f"unsend-{uuid.uuid4().hex[:6]}"
    produce(
        kafka_bootstrap,
        topic,
        [
            event_message(tenant, 1, id="before"),
            (tenant.encode(), b"{not json"),
            event_message(tenant, 2, id="after"),
        ],
    )
    before = REGISTRY.get_sample_value("streams_dead_letters_unsendable_total") or 0.0
    caplog.set_level(logging.WARNING, logger="streams.consumer")
    consumer = make_consumer(clickhouse_client, clickhouse_db, topic, kafka_bootstrap, dlq)
    await run_until_committed(consumer, kafka_bootstrap, timeout=30)
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (2, 3.0)}
    after = REGISTRY.get_sample_value("streams_dead_letters_unsendable_total") or 0.0
    assert after - before == 1
    assert read_all(kafka_bootstrap, dlq, timeout_ms=1000) == []
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and f"{topic}/0@1" in skipped[0], skipped


@pytest.mark.timeout(120)
async def test_dead_letters_keep_the_original_headers_and_name_cloudevents_binary_mode(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """A dead letter carried only its ``dlq.*`` headers (the producer's trace context and
    CloudEvents attributes were lost), and a CloudEvents binary-mode message (attributes in
    ``ce_*`` headers, the data alone in the value) was dead-lettered with the list of fields
    its value lacks."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = topics(kafka_bootstrap)
    tenant = f"hdr-{uuid.uuid4().hex[:6]}"
    key = tenant.encode()
    binary: list[tuple[str, str | bytes | None]] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"bin-1"),
        ("ce_source", b"urn:x"),
        ("ce_type", b"metering.usage"),
        ("ce_subject", key),
        ("content-type", b"application/json"),
    ]
    traced: list[tuple[str, str | bytes | None]] = [
        ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    ]
    traced += [("dlq.reason", b"forged"), ("x-empty", b"")]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, key=key, value=b'{"meter": "requests", "quantity": 1}', headers=binary)
    producer.produce(topic, key=key, value=b"{not json", headers=traced)
    ok_key, ok_value = event_message(tenant, 2, id="ok")
    producer.produce(topic, key=ok_key, value=ok_value)
    assert producer.flush(30) == 0
    consumer = make_consumer(clickhouse_client, clickhouse_db, topic, kafka_bootstrap, dlq)
    await run_until_committed(consumer, kafka_bootstrap, timeout=30)
    assert totals(clickhouse_client, clickhouse_db) == {tenant: (1, 2.0)}
    letters = {int(dict(m.headers)["dlq.offset"]): m for m in read_all(kafka_bootstrap, dlq)}
    dlq_names = ["dlq.reason", "dlq.error", "dlq.topic", "dlq.partition", "dlq.offset"]

    bin_letter = letters[0]
    assert [name for name, _ in bin_letter.headers] == [*dlq_names, *(n for n, _ in binary)]
    assert bin_letter.headers[len(dlq_names) :] == binary
    headers = dict(bin_letter.headers)
    assert headers["dlq.reason"] == b"invalid"
    assert headers["dlq.error"] == (
        b"event: CloudEvents binary mode is not accepted: send structured-mode JSON"
    )
    traced_letter = letters[1]
    names = [name for name, _ in traced_letter.headers]
    assert names == [*dlq_names, "traceparent", "x-empty"]  # no second dlq.reason
    assert dict(traced_letter.headers)["dlq.reason"] == b"invalid"
    assert dict(traced_letter.headers)["traceparent"] == traced[0][1]
    assert "not valid JSON" in dict(traced_letter.headers)["dlq.error"].decode()


@pytest.mark.timeout(120)
async def test_a_clickhouse_behind_kafkas_commit_reads_the_events_in_between_again(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """ClickHouse, not Kafka's commit, is the record of what is stored. A ClickHouse that lost
    rows the group committed (restored from a backup, or a CLICKHOUSE_URL switched back to an
    older database) resumes from its own progress: resuming at the greater of the two skipped
    the events in between, still in Kafka."""
    older = f"{clickhouse_db}_older"
    clickhouse_client.command(f"CREATE DATABASE {older}")
    try:
        migrate(clickhouse_client, clickhouse_db)
        migrate(clickhouse_client, older)
        topic, dlq = topics(kafka_bootstrap)
        tenant = f"bk-{uuid.uuid4().hex[:6]}"
        # The older database stores the first 20 events, the other the next 30; the group's
        # commit is then past what the older one holds.
        produce(kafka_bootstrap, topic, [event_message(tenant, 1) for _ in range(20)])
        await run_until_committed(
            make_consumer(clickhouse_client, older, topic, kafka_bootstrap, dlq),
            kafka_bootstrap,
            60,
        )
        produce(kafka_bootstrap, topic, [event_message(tenant, 1) for _ in range(30)])
        await run_until_committed(
            make_consumer(clickhouse_client, clickhouse_db, topic, kafka_bootstrap, dlq),
            kafka_bootstrap,
            60,
        )
        assert totals(clickhouse_client, older) == {tenant: (20, 20.0)}
        assert totals(clickhouse_client, clickhouse_db) == {tenant: (30, 30.0)}
        # Back on the older database: it reads from its own progress, 20, not the commit, 50.
        consumer = make_consumer(clickhouse_client, older, topic, kafka_bootstrap, dlq)
        task = asyncio.create_task(consumer.run())

        async def caught_up() -> bool:
            return totals(clickhouse_client, older).get(tenant) == (50, 50.0)

        try:
            await wait_for(caught_up, "the older database to hold all 50 events", task, 60)
        finally:
            await stop(consumer, task)
        assert totals(clickhouse_client, older) == {tenant: (50, 50.0)}
    finally:
        clickhouse_client.command(f"DROP DATABASE IF EXISTS {older}")

"""Helpers for the streams tests: unique topics, producing events, waiting on consumer groups."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Iterator

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2

from metering.events import decision_event, encode_event, usage_event


def unique_topics(bootstrap: str, partitions: int = 3) -> tuple[str, str]:
    """A fresh usage topic and dead-letter topic for one test."""
    base = f"st-{uuid.uuid4().hex[:10]}"
    topic, dlq = f"{base}.events", f"{base}.dlq"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(dlq, 1, 1)])
    finally:
        admin.close()
    return topic, dlq


def partition_of(key: str, partitions: int) -> int:
    """The partition the Java (and kafka-python) default partitioner gives ``key``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def tenants_covering(prefix: str, partitions: int, per_partition: int) -> list[str]:
    """``per_partition`` tenant ids on every partition: events keyed by them reach them all.

    Random tenant ids can all hash to a few partitions (8 ids miss two given partitions of 4
    about once in 256 runs), which makes a test about who owns which partition flaky."""
    chosen: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(ts) < per_partition for ts in chosen.values()):
        t = f"{prefix}-{i}"
        bucket = chosen[partition_of(t, partitions)]
        if len(bucket) < per_partition:
            bucket.append(t)
        i += 1
    return [t for p in range(partitions) for t in chosen[p]]


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(30)
    finally:
        producer.close()


#: The instant ``event_message`` dates events from while ``one_event_time`` holds one.
_EVENT_TIME: list[dt.datetime] = []


@contextlib.contextmanager
def one_event_time() -> Iterator[dt.datetime]:
    """Date every ``event_message`` of a test from one instant, taken now: a test that runs
    across 00:00 UTC then still puts its events, and so its daily totals, in one day."""
    _EVENT_TIME.append(dt.datetime.now(dt.UTC))
    try:
        yield _EVENT_TIME[-1]
    finally:
        _EVENT_TIME.pop()


def event_day() -> dt.date:
    """The UTC day of the events ``event_message`` makes now."""
    return (_EVENT_TIME[-1] if _EVENT_TIME else dt.datetime.now(dt.UTC)).date()


def event_message(
    tenant: str,
    quantity: float,
    *,
    id: str | None = None,
    age_seconds: float = 0,
    decision: str | None = None,
) -> tuple[bytes, bytes]:
    """A usage event on meter ``requests``, or with ``decision`` ("allowed", "rejected") the
    limiter's decision of that cost, as the middleware emits it."""
    base = _EVENT_TIME[-1] if _EVENT_TIME else dt.datetime.now(dt.UTC)
    t = base - dt.timedelta(seconds=age_seconds)
    if decision is None:
        ev = usage_event(tenant, "requests", quantity, time=t, id=id)
    else:
        ev = decision_event(tenant, decision == "allowed", cost=quantity, time=t)
        if id is not None:
            ev = ev.model_copy(update={"id": id})
    return tenant.encode(), encode_event(ev)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        out = {p: consumer.committed(TopicPartition(topic, p)) for p in parts}
        return {p: off for p, off in out.items() if off is not None}
    finally:
        consumer.close(autocommit=False)


def wait_until_committed(
    bootstrap: str, group: str, topic: str, timeout: float, *, at_least: int | None = None
) -> dict[int, int]:
    """Wait until ``group`` committed the end of ``topic`` (or ``at_least`` messages in all)."""
    ends = end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        committed = committed_offsets(bootstrap, group, topic)
        if at_least is not None and sum(committed.values()) >= at_least:
            return committed
        if at_least is None and all(committed.get(p, 0) >= e for p, e in ends.items()):
            return committed
        time.sleep(0.3)
    raise TimeoutError(f"group {group} committed {committed}, end offsets {ends}")


def read_all(bootstrap: str, topic: str, timeout_ms: int = 30_000) -> list:  # type: ignore[type-arg]
    """Every message ``topic`` holds now: each partition read from its start to the end offset
    taken first (what is written meanwhile may or may not be in). No idle wait: a test polling
    a topic pays only for the read (waiting out a 3 s silence cost ~25 s per worker test).
    ``timeout_ms`` bounds the read; a topic that does not exist yet reads as empty."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out = []
        deadline = time.monotonic() + timeout_ms / 1000
        while behind := [tp for tp in tps if consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: {behind} not read to {ends} in {timeout_ms} ms")
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def read_at_least(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:  # type: ignore[type-arg]
    """Everything in ``topic`` once it holds at least ``expected`` messages (read to its end
    then, so an extra message shows), or what it holds at ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(out := read_all(bootstrap, topic)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return out

"""The emitter against a real Kafka: what is emitted is consumed unchanged, keyed by tenant, in
per-tenant order; with Kafka unreachable it spools, and a later emitter replays the spool."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from metering.emitter import Emitter, EmitterMode
from metering.events import (
    MAX_EVENT_BYTES,
    UsageEvent,
    decision_event,
    decode_event,
    encode_event,
    usage_event,
)
from metering.spool import Spool
from metering.topics import TopicSpec, ensure_topics
from tests.integration.streams_support import read_at_least


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = f"test.emitter.{uuid.uuid4().hex[:10]}"
    ensure_topics(kafka_bootstrap, [TopicSpec(name, partitions=3, retention_ms=3_600_000)])
    return name


def consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """The topic's messages once ``expected`` arrived, read to its end (an extra one shows)."""
    return read_at_least(bootstrap, topic, expected, timeout_s)


def dead_address() -> str:
    """A loopback address where nothing listens (Kafka 'unreachable')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def emitters() -> Iterator[list[Emitter]]:
    made: list[Emitter] = []
    yield made
    for em in made:
        em.close(timeout=5)


def test_emitted_events_are_consumed_unchanged_with_the_tenant_as_key(
    kafka_bootstrap: str, topic: str, tmp_path: Path, emitters: list[Emitter]
) -> None:
    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path)
    emitters.append(em)
    sent: list[UsageEvent] = []
    for i in range(300):
        tenant = f"acme-{i % 4}"
        if i % 3:
            ev = usage_event(tenant, "api.calls", i * 0.5, {"seq": str(i), "region": "eu"})
        else:
            ev = decision_event(tenant, i % 2 == 0, cost=2, route="/v1/search")
        em.emit(ev)
        sent.append(ev)
    em.close(timeout=20)
    assert em.spool.pending_events == 0

    messages = consume(kafka_bootstrap, topic, expected=len(sent))
    assert len(messages) == 300
    received = {}
    for m in messages:
        ev = decode_event(m.value)
        assert m.key == ev.subject.encode()
        received[ev.id] = ev
    assert received == {ev.id: ev for ev in sent}


def test_emit_encoded_sends_the_bytes_as_given_and_drops_an_oversized_event(
    kafka_bootstrap: str, topic: str, tmp_path: Path, emitters: list[Emitter]
) -> None:
    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path)
    emitters.append(em)
    sent = [usage_event(f"acme-{i % 3}", "api.calls", i, {"seq": str(i)}) for i in range(50)]
    for ev in sent:
        em.emit_encoded(ev.subject.encode(), encode_event(ev))
    before = metric("metering_events_dropped_total", reason="invalid")
    em.emit_encoded(b"acme-0", b"x" * (MAX_EVENT_BYTES + 1))
    assert metric("metering_events_dropped_total", reason="invalid") - before == 1
    em.close(timeout=20)
    messages = consume(kafka_bootstrap, topic, expected=len(sent))
    assert sorted((m.key, m.value) for m in messages) == sorted(
        (ev.subject.encode(), encode_event(ev)) for ev in sent
    )


def test_one_tenants_events_arrive_in_emit_order_on_one_partition(
    kafka_bootstrap: str, topic: str, tmp_path: Path, emitters: list[Emitter]
) -> None:
    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path)
    emitters.append(em)
    for i in range(2000):
        em.emit(usage_event(f"tenant-{i % 7}", "api.calls", 1, {"seq": str(i)}))
    assert em.flush(timeout=30)
    em.close(timeout=20)

    messages = consume(kafka_bootstrap, topic, expected=2000)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        ev = decode_event(m.value)
        partitions[m.key].add(m.partition)
        seqs[ev.tenant].append(int(ev.data.dimensions["seq"]))
    assert sum(len(s) for s in seqs.values()) == 2000
    assert all(len(p) == 1 for p in partitions.values())
    for tenant, order in seqs.items():
        assert order == sorted(order), tenant


async def test_emit_is_callable_from_a_coroutine_without_awaiting(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path)

    async def handler(i: int) -> None:
        em.emit(usage_event("async-tenant", "api.calls", 1, {"seq": str(i)}))
        await asyncio.sleep(0)

    await asyncio.gather(*(handler(i) for i in range(200)))
    assert await em.aflush(timeout=30)
    await em.aclose(timeout=20)
    assert len(consume(kafka_bootstrap, topic, expected=200)) == 200


def test_with_kafka_unreachable_events_are_spooled_and_a_later_emitter_replays_them_in_order(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    spooled_before = metric("metering_events_spooled_total")
    down = Emitter(dead_address(), topic=topic, spool_dir=tmp_path)
    for i in range(500):
        down.emit(usage_event(f"t-{i % 3}", "api.calls", 1, {"seq": str(i)}))
    assert down.flush(timeout=30)
    assert down.mode is EmitterMode.SPOOLING
    down.close(timeout=2)
    assert metric("metering_events_spooled_total") - spooled_before == 500
    with Spool(tmp_path / "0", max_bytes=1 << 30) as spool:
        assert spool.pending_events == 500

    up = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path)
    for i in range(500, 600):
        up.emit(usage_event(f"t-{i % 3}", "api.calls", 1, {"seq": str(i)}))
    up.close(timeout=30)
    assert up.spool.pending_events == 0

    messages = consume(kafka_bootstrap, topic, expected=600)
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        ev = decode_event(m.value)
        seqs[ev.tenant].append(int(ev.data.dimensions["seq"]))
    assert sorted(s for order in seqs.values() for s in order) == list(range(600))
    for order in seqs.values():
        assert order == sorted(order)


def test_a_full_spool_counts_and_logs_what_it_drops(
    topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dropped_before = metric("metering_events_dropped_total", reason="spool_full")
    em = Emitter(dead_address(), topic=topic, spool_dir=tmp_path, spool_max_bytes=20_000)
    for i in range(200):  # ~250 bytes each: about 80 fit
        em.emit(usage_event("t-full", "api.calls", 1, {"seq": str(i)}))
    assert not em.flush(timeout=30)  # not everything emitted was kept
    em.close(timeout=2)
    kept = em.spool.pending_events
    assert 0 < kept < 200
    assert metric("metering_events_dropped_total", reason="spool_full") - dropped_before == (
        200 - kept
    )
    assert "usage events dropped (spool_full)" in caplog.text


def test_flush_is_false_when_an_event_emitted_before_it_was_dropped_since_the_last_flush(
    topic: str, tmp_path: Path
) -> None:
    """flush() promises every event emitted before it was acknowledged or spooled: a drop (here
    the spool is full) makes it False, once; a flush with no new drop is True again."""
    em = Emitter(dead_address(), topic=topic, spool_dir=tmp_path, spool_max_bytes=5_000)
    try:
        for i in range(10):  # ~250 bytes each: all fit
            em.emit(usage_event("t-flush", "api.calls", 1, {"seq": str(i)}))
        assert em.flush(timeout=10)
        for i in range(10, 40):  # about 10 more fit
            em.emit(usage_event("t-flush", "api.calls", 1, {"seq": str(i)}))
        assert not em.flush(timeout=10)
        assert em.flush(timeout=10)  # nothing dropped since
        em.emit(usage_event("t-flush", "api.calls", 1, {"seq": "40"}))  # the spool is full
        assert not em.flush(timeout=10)
        assert 10 < em.spool.pending_events < 40
    finally:
        em.close(timeout=1)


def test_emit_after_close_is_counted_as_dropped_not_raised(topic: str, tmp_path: Path) -> None:
    em = Emitter(dead_address(), topic=topic, spool_dir=tmp_path)
    em.close(timeout=1)
    before = metric("metering_events_dropped_total", reason="closed")
    em.emit(usage_event("t1", "m", 1))
    assert metric("metering_events_dropped_total", reason="closed") - before == 1


def test_emit_refuses_what_is_not_an_event(topic: str, tmp_path: Path) -> None:
    em = Emitter(dead_address(), topic=topic, spool_dir=tmp_path)
    try:
        with pytest.raises(TypeError, match="UsageEvent"):
            em.emit({"subject": "t1"})  # type: ignore[arg-type]
    finally:
        em.close(timeout=1)


def test_two_emitters_sharing_a_data_dir_get_separate_spool_slots(
    topic: str, tmp_path: Path
) -> None:
    a = Emitter(dead_address(), topic=topic, spool_dir=tmp_path)
    b = Emitter(dead_address(), topic=topic, spool_dir=tmp_path)
    try:
        assert {a.spool.directory.name, b.spool.directory.name} == {"0", "1"}
    finally:
        a.close(timeout=1)
        b.close(timeout=1)


def test_when_kafka_falls_behind_the_backlog_goes_to_disk_and_still_arrives_in_order(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    # A cap of 500 unacknowledged records makes every 2000-event batch overflow to the spool.
    spooled_before = metric("metering_events_spooled_total")
    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path, max_unacked=500)
    events = [usage_event(f"t-{i % 4}", "api.calls", 1, {"seq": str(i)}) for i in range(6000)]
    for ev in events:
        em.emit(ev)
    em.close(timeout=60)
    assert em.spool.pending_events == 0
    assert metric("metering_events_spooled_total") - spooled_before >= 2000

    messages = consume(kafka_bootstrap, topic, expected=6000)
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        ev = decode_event(m.value)
        seqs[ev.tenant].append(int(ev.data.dimensions["seq"]))
    assert sorted(s for order in seqs.values() for s in order) == list(range(6000))
    for order in seqs.values():
        assert order == sorted(order)

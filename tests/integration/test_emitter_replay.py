"""The emitter's replay of the spool against a real Kafka: a record Kafka refuses for itself does
not hold up the records behind it; a slot a dead process left is replayed by a running process;
what a damaged spool loses is counted."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from metering.emitter import Emitter, EmitterMode
from metering.events import decode_event, encode_event, usage_event
from metering.spool import Record, Spool
from tests.integration.test_emitter import consume, dead_address, metric


def record(tenant: str, seq: int, pad: int = 0) -> Record:
    """An encoded event; ``pad`` dimensions of 250 random hex digits (lz4 cannot shrink them)."""
    dims = {"seq": str(seq)} | {f"pad{i}": secrets.token_hex(125) for i in range(pad)}
    ev = usage_event(tenant, "api.calls", 1, dims)
    return ev.subject.encode(), encode_event(ev)


def spool_slot(directory: Path, records: list[Record]) -> None:
    """A slot as a process that died during an outage leaves it."""
    with Spool(directory, max_bytes=1 << 30) as spool:
        assert spool.append(records) == len(records)


def wait_for(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def seqs_in_order(messages: list) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        ev = decode_event(m.value)
        out.setdefault(ev.tenant, []).append(int(ev.data.dimensions["seq"]))
    return out


@pytest.fixture
def make_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    made: list[str] = []

    def make(partitions: int = 1, **configs: str) -> str:
        name = f"test.replay.{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
        made.append(name)
        return name

    yield make
    admin.delete_topics(made)
    admin.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_a_spooled_record_kafka_refuses_is_dropped_and_the_records_behind_it_arrive(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, client: str
) -> None:
    """The topic takes records of at most 1500 bytes; the spool's oldest record is larger. It
    used to be retried for ever, and nothing behind it was ever sent. The broker refuses the
    whole record batch it is in (kafka-python's producer then fails every later record too),
    so the records refused with it are sent again one by one: only the large one is dropped,
    counted as refused."""
    topic = make_topic(**{"max.message.bytes": "1500"})
    big = record("acme", 0, pad=12)
    assert len(big[1]) > 3000
    spool_slot(tmp_path / "0", [big] + [record("acme", seq) for seq in range(1, 4)])
    refused_before = metric("metering_events_dropped_total", reason="refused")

    em = Emitter(
        kafka_bootstrap,
        topic=topic,
        spool_dir=tmp_path,
        retry_backoff=(0.2, 0.5),
        kafka_client=client,
    )
    try:
        em.emit(usage_event("acme", "api.calls", 1, {"seq": "4"}))  # behind the spool
        assert wait_for(lambda: em.mode is EmitterMode.DIRECT, 20), "the replay is stuck"
        assert em.flush(timeout=10)
        assert em.spool.pending_events == 0
    finally:
        em.close(timeout=5)

    assert metric("metering_events_dropped_total", reason="refused") - refused_before == 1
    assert seqs_in_order(consume(kafka_bootstrap, topic, expected=4, timeout_s=10)) == {
        "acme": [1, 2, 3, 4]
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_good_records_refused_with_a_large_one_in_the_direct_path_are_sent_again(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, client: str
) -> None:
    """Kafka is up and the emitter sends directly. One burst holds 20 small records and, among
    them, one larger than the topic takes: they travel in one record batch, which the broker
    refuses whole. The sender used to drop every record of that batch as refused; the good ones
    are now spooled and sent again one by one, and only the large one is dropped."""
    topic = make_topic(**{"max.message.bytes": "1500"})
    refused_before = metric("metering_events_dropped_total", reason="refused")
    em = Emitter(
        kafka_bootstrap,
        topic=topic,
        spool_dir=tmp_path,
        retry_backoff=(0.2, 0.5),
        kafka_client=client,
        linger_ms=200,  # the whole burst in one record batch
    )
    try:
        assert wait_for(lambda: em.mode is EmitterMode.DIRECT, 20)
        for seq in range(21):
            em.emit_encoded(*record("acme", seq, pad=12 if seq == 10 else 0))
        assert wait_for(
            lambda: metric("metering_events_dropped_total", reason="refused") > refused_before,
            20,
        ), "the large record was never refused"
        assert wait_for(lambda: em.mode is EmitterMode.DIRECT and em.flush(timeout=5), 20)
        assert em.spool.pending_events == 0
    finally:
        em.close(timeout=5)

    assert metric("metering_events_dropped_total", reason="refused") - refused_before == 1
    got = seqs_in_order(consume(kafka_bootstrap, topic, expected=20, timeout_s=10))
    assert sorted(got["acme"]) == [s for s in range(21) if s != 10]


@pytest.mark.timeout(60)
def test_a_slot_a_dead_process_left_is_replayed_while_another_process_runs(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Slot 1 was left by a process killed during an outage; slot 2 belongs to a live process
    (its lock held). The running emitter (slot 0) sends slot 1, in order, and leaves slot 2."""
    topic = make_topic(partitions=3)
    orphaned = [record(f"t-{seq % 3}", seq) for seq in range(300)]
    spool_slot(tmp_path / "1", orphaned)
    spool_slot(tmp_path / "2", [record("t-live", seq) for seq in range(1000, 1010)])
    live = Spool(tmp_path / "2", max_bytes=1 << 30)
    replayed_before = metric("metering_events_replayed_total")

    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path, retry_backoff=(0.2, 0.5))
    try:
        assert em.spool.directory == tmp_path / "0"
        got = wait_for(
            lambda: metric("metering_events_replayed_total") - replayed_before >= 300, 20
        )
        assert got, "slot 1 was not replayed"
        assert live.pending_events == 10
    finally:
        em.close(timeout=5)
        live.close()

    with Spool(tmp_path / "1", max_bytes=1 << 30) as slot:
        assert slot.pending_events == 0
    with Spool(tmp_path / "2", max_bytes=1 << 30) as slot:
        assert slot.pending_events == 10  # never touched while its owner lived
    got_seqs = seqs_in_order(consume(kafka_bootstrap, topic, expected=300, timeout_s=10))
    assert got_seqs == {f"t-{t}": list(range(t, 300, 3)) for t in range(3)}


def test_records_a_damaged_spool_loses_are_counted_as_dropped(tmp_path: Path) -> None:
    """Slot 0 has a damaged record in the middle of its segment: it and the 6 records after it
    are cut, a count the intact ones tell. Slot 1 ends in a torn record: a count that cannot be
    told, so one drop of its own reason. Neither was an event these emitters were asked to
    send, so their flush() is True."""
    key, value = record("acme", 0)
    one = 10 + len(key) + len(value)
    spool_slot(tmp_path / "0", [record("acme", seq) for seq in range(10)])
    seg = next((tmp_path / "0").glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[3 * one + 20] ^= 0xFF  # a byte of the 4th record's value
    seg.write_bytes(bytes(data))
    spool_slot(tmp_path / "1", [record("acme", seq) for seq in range(10, 12)])
    with open(next((tmp_path / "1").glob("*.seg")), "ab") as fh:
        fh.write(b"\x00\x00\x01\x00\x00\x04torn")
    corrupt_before = metric("metering_events_dropped_total", reason="spool_corrupt")
    cut_before = metric("metering_events_dropped_total", reason="spool_cut")

    em0 = Emitter(dead_address(), topic="unused", spool_dir=tmp_path)
    em1 = Emitter(dead_address(), topic="unused", spool_dir=tmp_path)
    try:
        assert (em0.spool.pending_events, em1.spool.pending_events) == (3, 2)
        assert metric("metering_events_dropped_total", reason="spool_corrupt") - corrupt_before == 7
        assert metric("metering_events_dropped_total", reason="spool_cut") - cut_before == 1
        assert em0.flush(timeout=5) and em1.flush(timeout=5)
    finally:
        em0.close(timeout=1)
        em1.close(timeout=1)

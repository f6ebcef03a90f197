"""The emitter's two Kafka clients: librdkafka (the default) and kafka-python. Both deliver, and
both put a tenant's events on the same partition, so the worker's per-tenant tables see one
partition per tenant whichever client produced the events."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kafka import KafkaProducer

from metering.emitter import Emitter, producer_config
from metering.events import decode_event, usage_event
from metering.kafka_producer import ConfluentProducer
from metering.topics import TopicSpec, ensure_topics
from tests.integration.test_emitter import consume


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = f"test.clients.{uuid.uuid4().hex[:10]}"
    ensure_topics(kafka_bootstrap, [TopicSpec(name, partitions=6, retention_ms=3_600_000)])
    return name


def test_both_clients_put_a_key_on_the_same_partition(kafka_bootstrap: str, topic: str) -> None:
    keys = [f"tenant-{i}".encode() for i in range(60)]
    rd = ConfluentProducer(**producer_config(kafka_bootstrap, client_id="test-rd"))
    py = KafkaProducer(**producer_config(kafka_bootstrap, client_id="test-py"))
    for key in keys:
        rd.send(topic, value=b"librdkafka", key=key)
        py.send(topic, value=b"kafka-python", key=key)
    rd.flush(20)
    py.flush(20)
    py.close()
    rd.close(5)

    messages = consume(kafka_bootstrap, topic, expected=2 * len(keys))
    assert len(messages) == 2 * len(keys)
    seen: dict[bytes, set[int]] = {}
    for m in messages:
        seen.setdefault(m.key, set()).add(m.partition)
    assert set(seen) == set(keys)
    assert all(len(parts) == 1 for parts in seen.values()), seen  # one partition per key
    assert len({p for parts in seen.values() for p in parts}) > 1  # and keys spread out


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_each_client_delivers_every_event(
    kafka_bootstrap: str, topic: str, tmp_path: Path, client: str
) -> None:
    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path, kafka_client=client)
    sent = [usage_event(f"acme-{i % 5}", "api.calls", i, {"seq": str(i)}) for i in range(200)]
    for ev in sent:
        em.emit(ev)
    em.close(timeout=20)
    assert em.spool.pending_events == 0
    got = {decode_event(m.value).id for m in consume(kafka_bootstrap, topic, len(sent))}
    assert got == {ev.id for ev in sent}


def test_an_unknown_client_name_is_refused(kafka_bootstrap: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kafka_client must be"):
        Emitter(kafka_bootstrap, spool_dir=tmp_path, kafka_client="librdkafka2")

"""``metering kafka dlq``: the newest dead letters read back from Kafka with their reasons, as
the sink wrote them (``streams.sink.DeadLetter``), for the operator who sees the dead-letter
count rise; read-only, and every text a producer sent shown printable."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from metering.cli import main
from streams.sink import DeadLetter, Record


@pytest.fixture
def dlq_topic(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> str:
    topic = f"usage.events.dlq.t{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        admin.close()
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("USAGE_EVENTS_DLQ_TOPIC", topic)
    return topic


def send_dead_letters(bootstrap: str, topic: str, letters: list[DeadLetter]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for i, letter in enumerate(letters):
            rec = letter.record
            producer.send(
                topic,
                key=rec.key,
                value=rec.value,
                headers=letter.headers() + letter.original_headers(),
                partition=i % 2,
            )
            time.sleep(0.01)  # each its own millisecond: "newest" is by Kafka's timestamp
        producer.flush(10)
    finally:
        producer.close()


def test_the_newest_dead_letters_are_listed_with_reasons_sources_and_printable_errors(
    kafka_bootstrap: str, dlq_topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def record(offset: int, key: bytes, value: bytes) -> Record:
        return Record("usage.events", 3, offset, key, value, [("traceparent", b"00-x")])

    send_dead_letters(
        kafka_bootstrap,
        dlq_topic,
        [
            DeadLetter(record(10, b"acme", b'{"id": "old"}'), "late", "event is 4000s old"),
            DeadLetter(record(11, b"acme", b"\xff\xfe not json"), "invalid", "bad JSON"),
            DeadLetter(
                record(12, b"beta\x1b[2K", b"{}"), "invalid", "data.meter: \x1b]0;pwned\x07 bad"
            ),
        ],
    )
    assert main(["kafka", "dlq"]) == 0
    out = capsys.readouterr().out
    assert "(3 dead letters: invalid 2, late 1)" in out
    assert "usage.events/3@11" in out and "event is 4000s old" in out
    assert "\x1b" not in out and "\\x1b]0;pwned\\x07" in out and "beta\\x1b[2K" in out

    assert main(["kafka", "dlq", "--limit", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["topic"] == dlq_topic
    # The newest of each partition is read, then the newest one kept.
    (newest,) = shown["dead_letters"]
    assert newest["reason"] == "invalid" and newest["source"] == "usage.events/3@12"
    assert newest["key"] == {"utf8": "beta\x1b[2K"} and newest["value"] == {"utf8": "{}"}

    assert main(["kafka", "dlq", "--limit", "3", "--json"]) == 0
    values = [d["value"] for d in json.loads(capsys.readouterr().out)["dead_letters"]]
    assert {"base64": "//4gbm90IGpzb24="} in values  # not UTF-8: base64, never guessed


def test_an_empty_or_missing_topic_and_a_bad_limit_are_answered_clearly(
    kafka_bootstrap: str,
    dlq_topic: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(["kafka", "dlq"]) == 0
    assert capsys.readouterr().out.strip() == "no dead letters"
    missing = f"usage.events.dlq.none{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("USAGE_EVENTS_DLQ_TOPIC", missing)
    assert main(["kafka", "dlq"]) == 1
    assert f"topic {missing!r} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["kafka", "dlq", "--limit", "0"])
    assert exit_.value.code == 2
    assert main(["kafka", "dlq", "--limit", "10001"]) == 1
    assert "--limit: at most 10000" in capsys.readouterr().err

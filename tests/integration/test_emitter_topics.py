"""``metering kafka init``: creates the events topic and its dead-letter topic with the configured
partitions and retention, and running it again changes nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from metering.cli import main


@pytest.fixture
def admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    yield client
    client.close()


def partitions(admin: KafkaAdminClient, topic: str) -> int:
    """The topic's partition count (a just-created topic may show none for a moment: the
    broker answers CreateTopics before its metadata has every partition)."""
    for _ in range(50):
        found = len(admin.describe_topics([topic])[0]["partitions"])
        if found:
            return found
        time.sleep(0.1)
    return 0


def retention_ms(admin: KafkaAdminClient, topic: str) -> int:
    """The topic's retention.ms (a just-created topic's configs may take a moment to show)."""
    for _ in range(50):
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        entry = configs["topic"].get(topic, {}).get("retention.ms")
        if entry is not None:
            return int(entry["value"])
        time.sleep(0.2)
    raise AssertionError(f"{topic} shows no retention.ms")


def test_kafka_init_creates_both_topics_as_configured_and_is_idempotent(
    kafka_bootstrap: str,
    admin: KafkaAdminClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events, dlq = f"usage.events.{uuid.uuid4().hex[:8]}", f"usage.events.dlq.{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("USAGE_EVENTS_TOPIC", events)
    monkeypatch.setenv("USAGE_EVENTS_DLQ_TOPIC", dlq)
    monkeypatch.setenv("USAGE_EVENTS_PARTITIONS", "4")
    monkeypatch.setenv("USAGE_EVENTS_RETENTION_MS", "86400000")
    monkeypatch.setenv("USAGE_EVENTS_DLQ_RETENTION_MS", "172800000")

    assert main(["kafka", "init"]) == 0
    first = capsys.readouterr().out
    assert f"{events}: created (partitions=4, retention.ms=86400000)" in first
    assert f"{dlq}: created (partitions=2, retention.ms=172800000)" in first
    assert (partitions(admin, events), retention_ms(admin, events)) == (4, 86_400_000)
    assert (partitions(admin, dlq), retention_ms(admin, dlq)) == (2, 172_800_000)

    assert main(["kafka", "init"]) == 0
    second = capsys.readouterr().out
    assert f"{events}: exists" in second and f"{dlq}: exists" in second
    assert partitions(admin, events) == 4


def delete_topics(admin: KafkaAdminClient, names: list[str]) -> None:
    present = [name for name in names if name in admin.list_topics()]
    if present:
        admin.delete_topics(present)


def test_kafka_init_reports_an_existing_topics_own_partitions_and_retention(
    kafka_bootstrap: str,
    admin: KafkaAdminClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a topic that exists, ``kafka init`` prints what Kafka has (not what the settings ask
    for), says where the settings differ, and changes nothing."""
    run = uuid.uuid4().hex[:8]
    events, dlq = f"init-report.{run}.events", f"init-report.{run}.dlq"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("USAGE_EVENTS_TOPIC", events)
    monkeypatch.setenv("USAGE_EVENTS_DLQ_TOPIC", dlq)
    monkeypatch.setenv("USAGE_EVENTS_PARTITIONS", "4")
    monkeypatch.setenv("USAGE_EVENTS_RETENTION_MS", "86400000")
    monkeypatch.setenv("USAGE_EVENTS_DLQ_RETENTION_MS", "172800000")
    try:
        assert main(["kafka", "init"]) == 0
        assert f"{events}: created (partitions=4, retention.ms=86400000)" in capsys.readouterr().out
        assert (partitions(admin, events), retention_ms(admin, events)) == (4, 86_400_000)
        assert (partitions(admin, dlq), retention_ms(admin, dlq)) == (2, 172_800_000)

        monkeypatch.setenv("USAGE_EVENTS_RETENTION_MS", "1000000")
        assert main(["kafka", "init", "--partitions", "9"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"{events}: exists (partitions=4, retention.ms=86400000; settings ask partitions=9,"
            " retention.ms=1000000: existing topics are left as they are)",
            f"{dlq}: exists (partitions=2, retention.ms=172800000; settings ask partitions=4:"
            " existing topics are left as they are)",
        ]
        assert (partitions(admin, events), retention_ms(admin, events)) == (4, 86_400_000)
        assert (partitions(admin, dlq), retention_ms(admin, dlq)) == (2, 172_800_000)

        monkeypatch.setenv("USAGE_EVENTS_RETENTION_MS", "86400000")
        assert main(["kafka", "init"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"{events}: exists (partitions=4, retention.ms=86400000)",
            f"{dlq}: exists (partitions=2, retention.ms=172800000)",
        ]
    finally:
        delete_topics(admin, [events, dlq])


def test_kafka_init_reports_the_retention_a_topic_has_by_default(
    kafka_bootstrap: str,
    admin: KafkaAdminClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A topic made elsewhere with no retention.ms of its own shows the broker's default."""
    run = uuid.uuid4().hex[:8]
    events, dlq = f"init-report.{run}.events", f"init-report.{run}.dlq"
    admin.create_topics([NewTopic(events, num_partitions=1, replication_factor=1)])
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("USAGE_EVENTS_TOPIC", events)
    monkeypatch.setenv("USAGE_EVENTS_DLQ_TOPIC", dlq)
    monkeypatch.setenv("USAGE_EVENTS_PARTITIONS", "2")
    try:
        assert partitions(admin, events) == 1
        assert main(["kafka", "init"]) == 0
        line = next(
            line for line in capsys.readouterr().out.splitlines() if line.startswith(events)
        )
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, events)], config_filter="all"
        )
        default = int(configs["topic"][events]["retention.ms"]["value"])
        assert line.startswith(f"{events}: exists (partitions=1, retention.ms={default}; ")
        assert "settings ask partitions=2" in line
    finally:
        delete_topics(admin, [events, dlq])


def test_kafka_init_refuses_zero_partitions_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USAGE_EVENTS_PARTITIONS", "0")
    assert main(["kafka", "init"]) == 2
    assert "USAGE_EVENTS_PARTITIONS='0'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-3", "six"])
def test_kafka_init_refuses_a_bad_partitions_flag_with_a_usage_error(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["kafka", "init", "--partitions", bad])
    assert exit_info.value.code == 2
    assert "argument --partitions" in capsys.readouterr().err


def test_kafka_init_partitions_flag_overrides_the_setting(
    kafka_bootstrap: str, admin: KafkaAdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = f"usage.events.{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("USAGE_EVENTS_TOPIC", events)
    monkeypatch.setenv("USAGE_EVENTS_DLQ_TOPIC", f"{events}.dlq")
    assert main(["kafka", "init", "--partitions", "3"]) == 0
    assert partitions(admin, events) == 3
    assert partitions(admin, f"{events}.dlq") == 1


def test_drop_topics_deletes_only_the_topics_under_its_prefix(
    kafka_bootstrap: str, admin: KafkaAdminClient
) -> None:
    from metering.topics import TopicSpec, drop_topics, ensure_topics

    run = f"drop-{uuid.uuid4().hex[:8]}"
    mine = [f"{run}.events", f"{run}-changelog"]
    other = f"keep-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [TopicSpec(name, 1, 3_600_000) for name in [*mine, other]])
    assert drop_topics(kafka_bootstrap, run) == sorted(mine)
    deadline = time.monotonic() + 30
    while set(mine) & set(admin.list_topics()):  # deletion completes asynchronously
        assert time.monotonic() < deadline, "the dropped topics are still listed"
        time.sleep(0.2)
    assert other in admin.list_topics()
    with pytest.raises(ValueError, match="too short"):
        drop_topics(kafka_bootstrap, "usage")
    drop_topics(kafka_bootstrap, other)

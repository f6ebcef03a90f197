"""The Kafka topics of the pipeline, created with explicit partitions and retention (idempotent)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import TopicAlreadyExistsError

from metering.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    replication: int = 1

    def new_topic(self) -> NewTopic:
        return NewTopic(
            name=self.name,
            num_partitions=self.partitions,
            replication_factor=self.replication,
            topic_configs={"retention.ms": str(self.retention_ms), "cleanup.policy": "delete"},
        )


def pipeline_topics(settings: Settings) -> list[TopicSpec]:
    return [
        TopicSpec(
            settings.usage_events_topic,
            settings.usage_events_partitions,
            settings.usage_events_retention_ms,
        ),
        TopicSpec(
            settings.usage_events_dlq_topic,
            max(1, settings.usage_events_partitions // 2),
            settings.usage_events_dlq_retention_ms,
        ),
    ]


def ensure_topics(bootstrap: str, specs: list[TopicSpec], timeout_ms: int = 15000) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Existing topics are
    left as they are (partitions are never reduced)."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, client_id="metering-topics"
    )
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created = []
        for spec in missing:
            try:
                admin.create_topics([spec.new_topic()], timeout_ms=timeout_ms)
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


@dataclass(frozen=True)
class TopicState:
    """What Kafka says an existing topic has (``None``: it did not say)."""

    name: str
    partitions: int | None
    retention_ms: int | None

    def differences(self, spec: TopicSpec) -> dict[str, int]:
        """The values ``spec`` asks for where they differ from the topic's (known) ones."""
        asked = {}
        if self.partitions is not None and self.partitions != spec.partitions:
            asked["partitions"] = spec.partitions
        if self.retention_ms is not None and self.retention_ms != spec.retention_ms:
            asked["retention.ms"] = spec.retention_ms
        return asked


def describe_topics(
    bootstrap: str, names: list[str], timeout_ms: int = 15000
) -> dict[str, TopicState]:
    """The partition count (cluster metadata) and ``retention.ms`` (the topic's effective
    config, a default included) of each named topic, as Kafka has them now."""
    if not names:
        return {}
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, client_id="metering-topics"
    )
    try:
        partitions: dict[str, int | None] = dict.fromkeys(names)
        retention: dict[str, int | None] = dict.fromkeys(names)
        resources = [
            ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": None})
            for name in names
        ]
        # A topic made a moment ago (by another process) may show no partitions or configs yet.
        deadline = time.monotonic() + 2
        while True:
            for topic in admin.describe_topics(names):
                name = topic.get("name") or topic.get("topic")
                if name in partitions and not topic.get("error_code") and topic["partitions"]:
                    partitions[name] = len(topic["partitions"])
            configs = admin.describe_configs(resources, config_filter="all").get("topic", {})
            for name in names:
                value = (configs.get(name, {}).get("retention.ms") or {}).get("value")
                if value is not None and value.lstrip("-").isdigit():
                    retention[name] = int(value)
            known = all(partitions.values()) and all(v is not None for v in retention.values())
            if known or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return {name: TopicState(name, partitions[name], retention[name]) for name in names}
    finally:
        admin.close()


def drop_topics(bootstrap: str, prefix: str, timeout_ms: int = 30000) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a benchmark's or a test run's own,
    including the internal topics Faust made for its group); return the names deleted.

    For throw-away topics only: a prefix shorter than 8 characters is refused, so a slip cannot
    take the pipeline's own topics with it."""
    if len(prefix) < 8:
        raise ValueError(f"prefix {prefix!r} is too short to drop topics by (8+ characters)")
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, client_id="metering-topics"
    )
    try:
        doomed = sorted(t for t in admin.list_topics() if t.startswith(prefix))
        if doomed:
            admin.delete_topics(doomed, timeout_ms=timeout_ms)
        return doomed
    finally:
        admin.close()

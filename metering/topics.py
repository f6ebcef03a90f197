"""The Kafka topics of the pipeline, created with explicit partitions and retention (idempotent)."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
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

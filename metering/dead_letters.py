"""Reading the dead-letter topic back: what an operator asks when the dead-letter count on the
dashboard rises (``metering kafka dlq``). Read-only: no consumer group, nothing committed.

A dead letter (``streams.sink.DeadLetter``) is the original message's key and value with
``dlq.reason`` (``invalid`` or ``late``), ``dlq.error`` and where it came from (``dlq.topic``,
``dlq.partition``, ``dlq.offset``) as headers, then the original message's own headers."""

from __future__ import annotations

import base64
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

#: The headers a dead letter carries ahead of its original message's.
DLQ_HEADERS = ("dlq.reason", "dlq.error", "dlq.topic", "dlq.partition", "dlq.offset")


@dataclass(frozen=True)
class DeadLetterView:
    """One dead letter as read back."""

    partition: int
    offset: int
    time: dt.datetime  # when Kafka took it
    key: bytes | None
    value: bytes | None
    reason: str
    error: str
    source: str  # topic/partition@offset of the original message, or "" if unknown

    def to_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "reason": self.reason,
            "error": self.error,
            "source": self.source,
            "key": _text(self.key),
            "value": _text(self.value),
        }


def _text(raw: bytes | None) -> dict[str, str] | None:
    """Bytes for JSON: UTF-8 text as it is, anything else as base64 (named, never guessed)."""
    if raw is None:
        return None
    try:
        return {"utf8": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode("ascii")}


def _view(message: Any) -> DeadLetterView:
    headers: dict[str, str] = {}
    for name, value in message.headers or ():
        if name in DLQ_HEADERS and name not in headers:  # the dead letter's own come first
            headers[name] = (value or b"").decode("utf-8", "replace")
    where = ""
    if "dlq.topic" in headers:
        where = (
            f"{headers['dlq.topic']}/{headers.get('dlq.partition', '?')}"
            f"@{headers.get('dlq.offset', '?')}"
        )
    return DeadLetterView(
        partition=message.partition,
        offset=message.offset,
        time=dt.datetime.fromtimestamp(message.timestamp / 1000, dt.UTC),
        key=message.key,
        value=message.value,
        reason=headers.get("dlq.reason", "(none)"),
        error=headers.get("dlq.error", ""),
        source=where,
    )


def read_dead_letters(
    bootstrap: str, topic: str, limit: int, *, timeout: float = 15.0
) -> list[DeadLetterView]:
    """The newest ``limit`` dead letters of ``topic`` (oldest first), at most ``limit`` per
    partition read and the newest ``limit`` of those kept. Raises ``kafka.errors.KafkaError``
    when Kafka cannot be reached, and ``LookupError`` when the topic does not exist."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        client_id="metering-dlq",
        isolation_level="read_committed",  # as the sink reads: no aborted batch's letters
        request_timeout_ms=int(timeout * 1000),
    )
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(f"topic {topic!r} does not exist (USAGE_EVENTS_DLQ_TOPIC)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        begins = consumer.beginning_offsets(tps)
        pending = {}
        for tp in tps:
            start = max(begins[tp], ends[tp] - limit)
            if start < ends[tp]:
                consumer.seek(tp, start)
                pending[tp] = ends[tp]
        found: list[DeadLetterView] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for tp, messages in consumer.poll(timeout_ms=200).items():
                found.extend(_view(m) for m in messages if m.offset < pending.get(tp, 0))
            for tp in list(pending):  # transaction markers move the position past the end too
                if consumer.position(tp) >= pending[tp]:
                    del pending[tp]
        found.sort(key=lambda d: (d.time, d.partition, d.offset))
        return found[-limit:]
    finally:
        consumer.close()


__all__ = ["DLQ_HEADERS", "DeadLetterView", "read_dead_letters"]

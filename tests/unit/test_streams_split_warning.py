"""A worker on the embedded engine that owns only some partitions says so (``streams.app``).

With several workers each writing its own embedded folder, each folder answers for its
partitions only, and an evicted worker's rows are in no other folder to recover them from; the
integration test ``test_a_second_worker_joining_mid_stream_keeps_totals_exact`` shows the
warning in a real worker's log.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

import streams.app as sa


def test_a_split_embedded_assignment_names_the_partitions_and_the_way_out() -> None:
    message = sa.embedded_split_warning(True, "usage.events", {0, 2}, {0, 1, 2, 3})
    assert message is not None
    assert "owns 2 of the 4 partitions of usage.events ([0, 2])" in message
    assert "CLICKHOUSE_URL=http(s)://" in message


@pytest.mark.parametrize(
    ("embedded", "owned", "partitions"),
    [
        (False, {0, 2}, {0, 1, 2, 3}),  # a ClickHouse server: every worker sees every row
        (True, {0, 1, 2, 3}, {0, 1, 2, 3}),  # one worker owns them all
        (True, set(), {0, 1, 2, 3}),  # nothing assigned (yet)
        (True, {0, 1}, set()),  # the topic's metadata not known yet
    ],
)
def test_nothing_split_says_nothing(embedded: bool, owned: set[int], partitions: set[int]) -> None:
    assert sa.embedded_split_warning(embedded, "usage.events", owned, partitions) is None


def test_the_warning_is_logged_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    topic = sa.settings.usage_events_topic
    kafka: Any = SimpleNamespace(
        assignment=lambda: {TopicPartition(topic, 1), TopicPartition("other", 0)},
        partitions_for_topic=lambda t: {0, 1, 2} if t == topic else None,
    )
    monkeypatch.setattr(sa, "_state", {"consumer": SimpleNamespace(consumer=kafka)})
    monkeypatch.setattr(sa.settings, "clickhouse_url", "chdb:///tmp/x")
    sa._warn_if_split()
    sa._warn_if_split()
    warnings = [r for r in caplog.records if "owns 1 of the 3 partitions" in r.getMessage()]
    assert len(warnings) == 1

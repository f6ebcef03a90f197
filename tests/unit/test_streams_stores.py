"""The worker's tables recover each key by its marks (``streams.stores.MarkedMemoryStore``).

The changelog records are applied the way Faust's recovery applies them (the store's
``apply_changelog_batch``, JSON-decoded values), to the real tables of :mod:`streams.app` (not
started). The stall audit saw the case on two real workers: a worker evicted from the group
flushed, on waking, the table writes it had buffered; they landed after the new owner's, and
the recovery that followed (the rebalance its return caused) loaded the older value."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

import streams.app as sa
from streams.handoff import superseded, usage
from streams.stores import MarkedMemoryStore

SRC0, SRC1 = "usage.events:0", "usage.events:1"
KEY = "acme|requests|2026-03-02"


def recover(table: Any, records: list[tuple[Any, Any]], partition: int = 0) -> None:
    events = [
        SimpleNamespace(key=k, value=v, message=SimpleNamespace(value=v, partition=partition))
        for k, v in records
    ]
    table.data.apply_changelog_batch(events, to_key=table._to_key, to_value=table._to_value)


@pytest.fixture
def daily() -> Iterator[Any]:
    table = sa.tenant_daily_usage
    table.data.clear()
    yield table
    table.data.clear()


def skipped() -> float:
    return REGISTRY.get_sample_value("streams_changelog_superseded_total") or 0.0


def test_the_worker_tables_use_the_marked_store() -> None:
    assert isinstance(sa.tenant_daily_usage.data, MarkedMemoryStore)
    assert isinstance(sa.tenant_recent_usage.table.data, MarkedMemoryStore)


def test_an_evicted_workers_late_record_does_not_replace_the_newer_value(daily: Any) -> None:
    """The new owner wrote 51 (marks 7488); the evicted worker's buffered 16 (marks 3072)
    landed after it (the audit's figures): recovery keeps 51, and the next batch too."""
    before = skipped()
    new = {"q": 51.0, "m": {SRC0: 7488}}
    stale = {"q": 16.0, "m": {SRC0: 3072}}
    recover(daily, [(KEY, {"q": 10.0, "m": {SRC0: 2000}}), (KEY, new), (KEY, stale)])
    assert daily.data[KEY] == new
    recover(daily, [(KEY, stale)])  # in a later batch of the same recovery
    assert usage(daily.data[KEY]) == 51.0
    assert skipped() == before + 2


def test_newer_values_and_deletions_still_apply_in_order(daily: Any) -> None:
    other = "globex|requests|2026-03-02"
    recover(
        daily,
        [
            (KEY, {"q": 5.0, "m": {SRC0: 10}}),
            (KEY, {"q": 8.0, "m": {SRC0: 10, SRC1: 4}}),  # another source's range: newer
            (other, {"q": 1.0, "m": {SRC0: 3}}),
            (other, None),  # the sweep's tombstone
            ("initech|requests|2026-03-02", 2.5),  # the earlier format: no marks, last wins
            ("initech|requests|2026-03-02", 1.5),
        ],
    )
    assert daily.data[KEY] == {"q": 8.0, "m": {SRC0: 10, SRC1: 4}}
    assert other not in daily.data
    assert daily.data["initech|requests|2026-03-02"] == 1.5
    recover(daily, [(other, {"q": 2.0, "m": {SRC0: 5}})])  # written again after the deletion
    assert usage(daily.data[other]) == 2.0


def test_the_windowed_table_recovers_by_marks_too() -> None:
    windows = sa.tenant_recent_usage.table
    windows.data.clear()
    try:
        key = ["acme|requests", [1_772_409_000.0, 1_772_409_299.9]]
        new = {"q": 9.0, "m": {SRC0: 40}}
        recover(windows, [(key, new), (key, {"q": 4.0, "m": {SRC0: 20}})])
        assert windows.data[("acme|requests", (1_772_409_000.0, 1_772_409_299.9))] == new
    finally:
        windows.data.clear()


@pytest.mark.parametrize(
    ("value", "current", "older"),
    [
        ({"q": 1, "m": {SRC0: 3}}, {"q": 2, "m": {SRC0: 5}}, True),
        ({"q": 1, "m": {SRC0: 3}}, {"q": 2, "m": {SRC0: 3, SRC1: 1}}, True),  # a source missing
        ({"q": 2, "m": {SRC0: 5}}, {"q": 1, "m": {SRC0: 3}}, False),  # newer
        ({"q": 1, "m": {SRC0: 3}}, {"q": 1, "m": {SRC0: 3}}, False),  # the same write again
        ({"q": 3, "m": {SRC0: 9, SRC1: 1}}, {"q": 2, "m": {SRC1: 5}}, False),  # neither older
        ({"q": 3, "m": {SRC0: 1}}, None, False),  # nothing held
        (7.5, {"q": 2, "m": {SRC0: 5}}, False),  # the earlier float format: no marks
        ({"q": 1, "m": {}}, {"q": 2, "m": {SRC0: 5}}, True),  # a legacy-only value
        ({"q": 1, "m": {SRC0: "x"}}, {"q": 2, "m": {SRC0: 5}}, False),  # not ours: applied
    ],
)
def test_superseded(value: Any, current: Any, older: bool) -> None:
    assert superseded(value, current) is older

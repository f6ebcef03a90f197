"""The worker's table sweep on the real Faust tables of :mod:`streams.app` (not started).

Entries are loaded the way changelog recovery loads them (the memory store's
``apply_changelog_batch``: no expiry is registered for them, which is why Faust never removed
windows recovered after a restart); the tombstones the sweep sends are recorded instead of
produced. The worker test ``test_the_sweep_deletes_recovered_closed_days_and_expired_windows``
runs it against Kafka.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.partitioner.default import murmur2

import streams.app as sa
from streams.handoff import first_open_day

PARTITIONS = 4
NOW = dt.datetime(2026, 3, 9, 12, 0, 30, tzinfo=dt.UTC).timestamp()


def partition_of(key: str, partitions: int) -> int:
    """The partition the Java (and kafka-python) default partitioner gives ``key``: computed
    here independently of the producer Faust uses (aiokafka)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def recover(table: Any, records: list[tuple[Any, Any, int]]) -> None:
    """Apply changelog records ``(key, value, partition)`` (JSON-decoded, as Faust reads them:
    window keys arrive as lists) the way Faust's recovery does."""
    events = [
        SimpleNamespace(key=k, value=v, message=SimpleNamespace(value=v, partition=p))
        for k, v, p in records
    ]
    table.data.apply_changelog_batch(events, to_key=table._to_key, to_value=table._to_value)


@pytest.fixture
def tables(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[tuple[int, Any, Any]]]]:
    """The two tables, emptied, with their changelog sends recorded per table."""
    sent: dict[str, list[tuple[int, Any, Any]]] = {"daily": [], "windows": []}
    for name, table in (
        ("daily", sa.tenant_daily_usage),
        ("windows", sa.tenant_recent_usage.table),
    ):
        table.data.clear()

        def send(partition: int, key: Any, value: Any, *, _name: str = name, **kw: Any) -> None:
            assert kw == {"value_serializer": "raw"} and value is None  # a tombstone
            sent[_name].append((partition, key, value))

        monkeypatch.setattr(table, "send_changelog", send)
    yield sent
    for table in (sa.tenant_daily_usage, sa.tenant_recent_usage.table):
        table.data.clear()


def value(q: float) -> dict[str, Any]:
    return {"q": q, "m": {"usage.events:0": 3}}


def test_the_sweep_deletes_recovered_closed_days_and_expired_windows_with_tombstones(
    tables: dict[str, list[tuple[int, Any, Any]]],
) -> None:
    tenants = ["acme", "globex", "initech", "umbrella"]
    part = {t: partition_of(t, PARTITIONS) for t in tenants}  # the producer's partitioner
    owned = {part["acme"], part["globex"]}
    first_open = first_open_day(NOW, sa.settings.event_max_lateness)
    closed, kept = first_open - dt.timedelta(days=1), first_open
    expires = sa.WINDOW_EXPIRES.total_seconds()
    old_window = [NOW - expires - 7200.0, NOW - expires - 7200.0 + 299.9]  # hours old
    just_old = [NOW - expires - 300.0, NOW - expires - 0.1]
    fresh = [NOW - 240.0, NOW + 59.9]
    daily_records = []
    window_records = []
    for t in tenants:
        daily_records += [
            (f"{t}|requests|{closed}", value(1), part[t]),
            (f"{t}|{closed - dt.timedelta(days=30)}", 7.5, part[t]),  # earlier format and value
            (f"{t}|tokens|{kept}", value(2), part[t]),
        ]
        window_records += [
            ([f"{t}|requests", old_window], value(3), part[t]),
            ([t, just_old], value(4), part[t]),  # the earlier (tenant, window) key
            ([f"{t}|tokens", fresh], value(5), part[t]),
        ]
    recover(sa.tenant_daily_usage, daily_records)
    recover(sa.tenant_recent_usage.table, window_records)
    windows = sa.tenant_recent_usage.table
    assert len(windows.data) == 12 and (("acme|requests", tuple(old_window)) in windows.data)

    assert sa.sweep_tables(NOW, PARTITIONS, owned) == (8, 8)

    assert sorted(sa.tenant_daily_usage.data.keys()) == sorted(
        f"{t}|tokens|{kept}" for t in tenants
    )
    assert sorted(windows.data.keys()) == sorted((f"{t}|tokens", tuple(fresh)) for t in tenants)
    # Tombstones for the owned partitions' keys, each in its key's own partition (the one its
    # records came from); the other partitions' keys only left this worker's memory.
    mine = [t for t in tenants if part[t] in owned]
    assert mine and len(mine) < len(tenants)
    assert sorted(tables["daily"]) == sorted(
        (part[t], k, None)
        for t in mine
        for k in (f"{t}|requests|{closed}", f"{t}|{closed - dt.timedelta(days=30)}")
    )
    assert sorted(tables["windows"], key=repr) == sorted(
        [
            (part[t], k, None)
            for t in mine
            for k in ((f"{t}|requests", tuple(old_window)), (t, tuple(just_old)))
        ],
        key=repr,
    )

    # Nothing more to sweep.
    tables["daily"].clear()
    tables["windows"].clear()
    assert sa.sweep_tables(NOW, PARTITIONS, owned) == (0, 0)
    assert tables == {"daily": [], "windows": []}


def test_the_sweep_is_bounded_per_round(
    tables: dict[str, list[tuple[int, Any, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sa, "SWEEP_LIMIT", 3)
    closed = first_open_day(NOW, sa.settings.event_max_lateness) - dt.timedelta(days=1)
    stale = [NOW - 7200.0, NOW - 7200.0 + 299.9]
    recover(sa.tenant_daily_usage, [(f"t{i}|requests|{closed}", value(1), 0) for i in range(5)])
    recover(
        sa.tenant_recent_usage.table, [([f"t{i}|requests", stale], value(1), 0) for i in range(5)]
    )
    assert sa.sweep_tables(NOW, PARTITIONS, set(range(PARTITIONS))) == (3, 3)
    assert sa.sweep_tables(NOW, PARTITIONS, set(range(PARTITIONS))) == (2, 2)
    assert sa.sweep_tables(NOW, PARTITIONS, set(range(PARTITIONS))) == (0, 0)
    assert len(tables["daily"]) == len(tables["windows"]) == 5


def test_a_tenants_partition_is_the_one_its_hand_offs_go_to() -> None:
    """The changelog partition of a tenant's keys: ``accepted_usage`` is keyed by tenant (raw
    bytes) and partitioned by the Java default (murmur2), here computed independently."""
    for i in range(200):
        tenant = f"tenant-{i}"
        for n in (1, 2, 4, 7):
            assert sa.tenant_partition(tenant, n) == partition_of(tenant, n)


def test_fausts_own_window_expiry_comes_only_after_the_sweep() -> None:
    """Faust's expiry pops a window from memory without a tombstone (the changelog brings it
    back at the next restart): it must not get there before the sweep, which runs every
    ``SWEEP_INTERVAL`` s and deletes a window ``WINDOW_EXPIRES`` after its end, with one."""
    window = sa.tenant_recent_usage.table.window
    assert window is not None
    expires = sa.WINDOW_EXPIRES.total_seconds()
    for minute in range(29_400_000, 29_400_000 + 5):
        for end in (minute * 60 - 0.1, minute * 60 + 239.9):  # the windows' ends, and others
            last_sweep = end + expires + sa.SWEEP_INTERVAL  # it is deleted by then
            assert not window.stale(end, last_sweep + 1.0)
            assert window.stale(end, end + expires + 3 * sa.SWEEP_INTERVAL)  # a backstop still


async def test_a_sweep_deletes_a_backlog_larger_than_one_slice(
    tables: dict[str, list[tuple[int, Any, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More windows expired than one slice deletes (a tenant sending fresh meter names makes
    ``SWEEP_LIMIT`` of them a minute): one sweep runs slices until none is left, each with its
    tombstone, instead of leaving the rest to Faust's own expiry, which sends none."""
    monkeypatch.setattr(sa, "SWEEP_LIMIT", 3)
    topic = sa.accepted_usage.get_topic_name()
    monkeypatch.setattr(
        sa.app,
        "_consumer",
        SimpleNamespace(topic_partitions=lambda t: PARTITIONS if t == topic else None),
    )
    owned = [SimpleNamespace(topic=topic, partition=p) for p in range(PARTITIONS)]
    monkeypatch.setattr(sa.app, "assignor", SimpleNamespace(assigned_actives=lambda: owned))
    closed = first_open_day(NOW, sa.settings.event_max_lateness) - dt.timedelta(days=1)
    stale = [NOW - 7200.0, NOW - 7200.0 + 299.9]
    recover(sa.tenant_daily_usage, [(f"t{i}|requests|{closed}", value(1), 0) for i in range(7)])
    recover(sa.tenant_recent_usage.table, [([f"t{i}|m{i}", stale], value(1), 0) for i in range(11)])
    assert await sa.sweep_all(lambda: NOW) == (7, 11)
    assert len(tables["daily"]) == 7 and len(tables["windows"]) == 11
    assert not sa.tenant_daily_usage.data and not sa.tenant_recent_usage.table.data

"""A closed day's Redis counters expire an hour after the day ends (acquire.lua's EXAT), before
the day is final in ClickHouse and the quota DB: reconcile marks them expired instead of
reporting every tenant as drifting."""

from __future__ import annotations

import datetime as dt

from limiter.scripts import DAY_GRACE_SECONDS
from metering.reconcile import compare, counters_expired, format_report

DAY = dt.date(2026, 12, 6)
END = dt.datetime(2026, 12, 7, tzinfo=dt.UTC)


def test_counters_expire_the_grace_after_the_day_ends() -> None:
    grace = dt.timedelta(seconds=DAY_GRACE_SECONDS)
    assert not counters_expired(DAY, END - dt.timedelta(hours=1))  # the day is live
    assert not counters_expired(DAY, END + grace - dt.timedelta(milliseconds=1))
    assert counters_expired(DAY, END + grace)
    assert counters_expired(DAY, END + dt.timedelta(days=3))
    assert not counters_expired(DAY + dt.timedelta(days=1), END + grace)  # the next day


def test_an_expired_counter_is_left_out_and_clickhouse_agreeing_with_the_quota_db_is_ok() -> None:
    rows = compare({}, {"a": 115, "b": 3}, {"a": 115, "b": 3}, counters_expired=True)
    assert [(r.tenant, r.expired, r.agrees, r.drift) for r in rows] == [
        ("a", True, True, {}),
        ("b", True, True, {}),
    ]
    assert rows[0].as_dict()["expired"] is True and rows[0].as_dict()["redis"] is None
    report = format_report(rows, DAY)
    assert "2 tenants, 0 with drift; 2 Redis counters expired" in report
    assert "expired         115         115  ok" in report


def test_clickhouse_and_the_quota_db_apart_on_a_closed_day_is_still_drift() -> None:
    (row,) = compare({}, {"a": 1115}, {"a": 3}, counters_expired=True)
    assert row.expired and not row.agrees
    assert row.drift == {"quota_db": -1112}
    assert "DRIFT quota_db -1112" in format_report([row], DAY)


def test_a_counter_still_there_after_the_grace_is_compared() -> None:
    """A limiter with a longer grace keeps its counters: they are data, not expired."""
    (row,) = compare({"a": 9}, {"a": 7}, {"a": 7}, counters_expired=True)
    assert not row.expired and row.drift == {"redis": 2}


def test_a_missing_counter_of_a_live_day_is_still_drift_unless_there_is_no_usage() -> None:
    rows = compare({}, {"a": 5, "b": 0}, {"a": 5, "b": 0})
    by = {r.tenant: r for r in rows}
    assert not by["a"].expired and by["a"].drift == {"redis": -5}
    assert by["b"].agrees  # no decisions today: no counter, nothing to count
    assert "1 with drift" in format_report(rows, DAY) and "expired" not in format_report(rows, DAY)


def test_a_cluster_clients_time_reply_counts_by_its_earliest_master() -> None:
    """A Cluster client answers ``TIME`` per node: the day's counters count as expired once
    every master's clock has passed the expiry, so the earliest answer is the one taken."""
    from metering.reconcile import _server_time

    one = _server_time((1_700_000_000, 250_000))
    assert one == dt.datetime(2023, 11, 14, 22, 13, 20, 250_000, tzinfo=dt.UTC)
    per_node = {"10.0.0.1:7000": (1_700_000_005, 0), "10.0.0.2:7000": (1_700_000_000, 250_000)}
    assert _server_time(per_node) == one

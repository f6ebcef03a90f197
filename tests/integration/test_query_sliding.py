"""Sliding windows on the real engine: rolling totals per tenant and the top tenants."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from metering.queries import UsageQueries
from metering.query_sql import QueryError
from tests.integration.query_schema import at, insert_events, scratch_database

NOW = at("2026-06-01T12:00:30Z")  # within minute 12:00
MINUTE = dt.timedelta(minutes=1)


def _at_minute(offset: int, second: int = 10) -> dt.datetime:
    """A time in the minute ``offset`` minutes from NOW's minute (0 = the current minute)."""
    return at("2026-06-01T12:00:00Z") + offset * MINUTE + dt.timedelta(seconds=second)


@pytest.fixture(scope="module")
def sliding(clickhouse_client: Any) -> Iterator[UsageQueries]:
    """solo: 5 three minutes ago, 2 a minute ago, 1 now (and a rejected 50 now).
    t01..t12: tenant tNN has NN*10 within the last hour; "old" has 10,000 61 minutes ago."""
    events: list[dict[str, Any]] = [
        {"tenant": "solo", "meter": "requests", "time": _at_minute(-3), "quantity": 5},
        {"tenant": "solo", "meter": "requests", "time": _at_minute(-1), "quantity": 2},
        {"tenant": "solo", "meter": "requests", "time": _at_minute(0), "quantity": 1},
        {
            "tenant": "solo",
            "meter": "requests",
            "time": _at_minute(0, 20),
            "quantity": 50,
            "decision": "rejected",
        },
        {"tenant": "old", "meter": "requests", "time": _at_minute(-60), "quantity": 10_000},
    ]
    for n in range(1, 13):
        # Split over two minutes inside the hour, so each total is a sum of rollup rows.
        for offset in (-59, -n):
            events.append(
                {
                    "tenant": f"t{n:02d}",
                    "meter": "requests",
                    "time": _at_minute(offset),
                    "quantity": n * 5,
                }
            )
    events.append({"tenant": "t12", "meter": "tokens", "time": _at_minute(-2), "quantity": 10**6})
    with scratch_database(clickhouse_client) as db:
        insert_events(clickhouse_client, db, events)
        yield UsageQueries(clickhouse_client, db)


def test_rolling_two_minute_sums_at_each_of_the_last_four_minutes(sliding: UsageQueries) -> None:
    result = sliding.sliding("solo", "requests", 2, points=4, now=NOW)
    assert [
        (p.window_start.strftime("%H:%M"), p.window_end.strftime("%H:%M"), p.value)
        for p in result.points
    ] == [
        ("11:56", "11:58", 5.0),
        ("11:57", "11:59", 5.0),
        ("11:58", "12:00", 2.0),
        ("11:59", "12:01", 3.0),
    ]


def test_the_last_n_minutes_include_the_current_one(sliding: UsageQueries) -> None:
    for minutes, total in [(1, 1.0), (2, 3.0), (3, 3.0), (4, 8.0), (60, 8.0)]:
        result = sliding.sliding("solo", "requests", minutes, now=NOW)
        assert [p.value for p in result.points] == [total], minutes
        assert result.points[0].window_end == at("2026-06-01T12:01:00Z")


def test_rolling_counts_and_rejections(sliding: UsageQueries) -> None:
    counts = sliding.sliding("solo", "requests", 60, now=NOW, aggregation="COUNT")
    assert [p.value for p in counts.points] == [3]
    rejected = sliding.sliding("solo", "requests", 60, now=NOW, decision="rejected")
    assert [p.value for p in rejected.points] == [50.0]


def test_rolling_sums_from_the_rollup_equal_the_raw_events(sliding: UsageQueries) -> None:
    fast = sliding.sliding("solo", "requests", 3, points=10, now=NOW)
    assert fast == sliding.sliding("solo", "requests", 3, points=10, now=NOW, force_raw=True)


def test_the_top_tenants_of_the_last_hour_largest_first(sliding: UsageQueries) -> None:
    top = sliding.top_tenants("requests", 60, 10, now=NOW)
    assert [(t.tenant, t.value) for t in top.tenants] == [
        (f"t{n:02d}", float(n * 10)) for n in range(12, 2, -1)
    ]
    assert (top.window_start, top.window_end) == (
        at("2026-06-01T11:01:00Z"),
        at("2026-06-01T12:01:00Z"),
    )
    assert top == sliding.top_tenants("requests", 60, 10, now=NOW, force_raw=True)


def test_a_longer_window_reaches_older_usage(sliding: UsageQueries) -> None:
    top = sliding.top_tenants("requests", 61, 1, now=NOW)
    assert [(t.tenant, t.value) for t in top.tenants] == [("old", 10_000.0)]


def test_ties_are_ranked_by_tenant_id(sliding: UsageQueries) -> None:
    # Over the last 3 minutes: solo has 2 events, t01 and t02 one each.
    top = sliding.top_tenants("requests", 3, 3, now=NOW, aggregation="COUNT")
    assert [(t.tenant, t.value) for t in top.tenants] == [("solo", 2), ("t01", 1), ("t02", 1)]


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda q: q.sliding("solo", "requests", 0, now=NOW), "minutes"),
        (lambda q: q.sliding("solo", "requests", 60, points=0, now=NOW), "points"),
        (lambda q: q.sliding("solo", "requests", 60, aggregation="MAX", now=NOW), "aggregation"),
        (lambda q: q.sliding("so'lo", "requests", 60, now=NOW), "tenant"),
        (lambda q: q.top_tenants("requests", 60, 0, now=NOW), "limit"),
        (lambda q: q.top_tenants("requests; --", 60, 10, now=NOW), "meter"),
    ],
)
def test_bad_sliding_parameters_are_refused(sliding: UsageQueries, call: Any, param: str) -> None:
    with pytest.raises(QueryError) as err:
        call(sliding)
    assert err.value.param == param

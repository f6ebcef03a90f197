"""Usage queries on the real engine, with data whose answers are known by construction.

The hourly data set has one event of quantity 1 at half past every UTC hour, so a window's SUM
is the number of hours it lasts: 23 on the day clocks spring forward, 25 when they fall back.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

import pytest

from metering.queries import UsageQueries, UsageResult
from metering.query_sql import Aggregation, UsageQuery
from tests.integration.query_schema import at, insert_events, scratch_database

HOUR = dt.timedelta(hours=1)


def _hourly(start: str, end: str) -> list[dict[str, Any]]:
    t, stop, out = at(start), at(end), []
    while t < stop:
        out.append({"tenant": "hourly", "meter": "requests", "time": t, "quantity": 1})
        t += HOUR
    return out


@pytest.fixture(scope="module")
def hourly(clickhouse_client: Any) -> Iterator[UsageQueries]:
    with scratch_database(clickhouse_client) as db:
        events = _hourly("2026-02-27T00:30:00Z", "2026-04-03T00:00:00Z")
        events += _hourly("2026-10-20T00:30:00Z", "2026-11-05T00:00:00Z")
        insert_events(clickhouse_client, db, events)
        yield UsageQueries(clickhouse_client, db)


def _windows(result: UsageResult) -> list[tuple[str, str, float | int]]:
    return [(r.window_start.isoformat(), r.window_end.isoformat(), r.value) for r in result.rows]


def _ask(queries: UsageQueries, start: str, end: str, **kw: Any) -> UsageResult:
    return queries.usage(
        UsageQuery(
            tenant=kw.pop("tenant", "hourly"),
            meter=kw.pop("meter", "requests"),
            start=at(start),
            end=at(end),
            **kw,
        )
    )


# --- windows and time zones ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "start", "end", "expected"),
    [
        (
            "Europe/Berlin",
            "2026-03-28T00:00:00+01:00",
            "2026-03-31T00:00:00+02:00",
            [
                ("2026-03-28T00:00:00+01:00", "2026-03-29T00:00:00+01:00", 24.0),
                ("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", 23.0),
                ("2026-03-30T00:00:00+02:00", "2026-03-31T00:00:00+02:00", 24.0),
            ],
        ),
        (
            "America/New_York",
            "2026-03-07T00:00:00-05:00",
            "2026-03-10T00:00:00-04:00",
            [
                ("2026-03-07T00:00:00-05:00", "2026-03-08T00:00:00-05:00", 24.0),
                ("2026-03-08T00:00:00-05:00", "2026-03-09T00:00:00-04:00", 23.0),
                ("2026-03-09T00:00:00-04:00", "2026-03-10T00:00:00-04:00", 24.0),
            ],
        ),
        (
            "Europe/Berlin",
            "2026-10-24T00:00:00+02:00",
            "2026-10-27T00:00:00+01:00",
            [
                ("2026-10-24T00:00:00+02:00", "2026-10-25T00:00:00+02:00", 24.0),
                ("2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00", 25.0),
                ("2026-10-26T00:00:00+01:00", "2026-10-27T00:00:00+01:00", 24.0),
            ],
        ),
        (
            "America/New_York",
            "2026-10-31T00:00:00-04:00",
            "2026-11-03T00:00:00-05:00",
            [
                ("2026-10-31T00:00:00-04:00", "2026-11-01T00:00:00-04:00", 24.0),
                ("2026-11-01T00:00:00-04:00", "2026-11-02T00:00:00-05:00", 25.0),
                ("2026-11-02T00:00:00-05:00", "2026-11-03T00:00:00-05:00", 24.0),
            ],
        ),
    ],
)
def test_day_windows_run_from_local_midnight_to_local_midnight_across_dst(
    hourly: UsageQueries, tz: str, start: str, end: str, expected: list[Any]
) -> None:
    result = _ask(hourly, start, end, window="DAY", tz=tz)
    assert _windows(result) == expected
    assert result.tables == ("usage_hour",)  # whole-hour zone: hourly rollup, no raw read


def test_hour_windows_skip_the_missing_local_hour_when_clocks_spring_forward(
    hourly: UsageQueries,
) -> None:
    result = _ask(
        hourly,
        "2026-03-29T00:00:00+01:00",
        "2026-03-29T05:00:00+02:00",
        window="HOUR",
        tz="Europe/Berlin",
    )
    assert _windows(result) == [
        ("2026-03-29T00:00:00+01:00", "2026-03-29T01:00:00+01:00", 1.0),
        ("2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", 1.0),
        ("2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00", 1.0),
        ("2026-03-29T04:00:00+02:00", "2026-03-29T05:00:00+02:00", 1.0),
    ]


def test_hour_windows_repeat_the_local_hour_when_clocks_fall_back(hourly: UsageQueries) -> None:
    result = _ask(
        hourly,
        "2026-11-01T00:00:00-04:00",
        "2026-11-01T03:00:00-05:00",
        window="HOUR",
        tz="America/New_York",
    )
    starts = [r.window_start.isoformat() for r in result.rows]
    assert starts == [
        "2026-11-01T00:00:00-04:00",
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T02:00:00-05:00",
    ]
    assert [r.value for r in result.rows] == [1.0] * 4
    # The JSON answer (the API's, `metering usage --json`) tells the repeated hours apart too.
    data = result.to_dict()["data"]
    assert [(d["window_start"], d["window_end"]) for d in data] == [
        ("2026-11-01T00:00:00-04:00", "2026-11-01T01:00:00-04:00"),
        ("2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00"),
        ("2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"),
        ("2026-11-01T02:00:00-05:00", "2026-11-01T03:00:00-05:00"),
    ]


@pytest.mark.parametrize(
    ("tz", "start", "end", "hours"),
    [
        ("UTC", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", 744),
        ("Europe/Berlin", "2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00", 743),
        ("America/New_York", "2026-03-01T00:00:00-05:00", "2026-04-01T00:00:00-04:00", 743),
    ],
)
def test_month_window_is_the_local_calendar_month(
    hourly: UsageQueries, tz: str, start: str, end: str, hours: int
) -> None:
    result = _ask(hourly, start, end, window="MONTH", tz=tz)
    assert [(r.window_start, r.window_end, r.value) for r in result.rows] == [
        (at(start), at(end), float(hours))
    ]
    assert result.path == "rollup"


def test_month_windows_report_whole_months_for_a_range_cutting_them(
    hourly: UsageQueries,
) -> None:
    result = _ask(
        hourly,
        "2026-02-28T00:00:00+01:00",
        "2026-04-02T00:00:00+02:00",
        window="MONTH",
        tz="Europe/Berlin",
    )
    # Feb 28 (24 h; data starts Feb 27) + March (743 h) + April 1 (24 h): values cover the range,
    # windows are whole local months.
    assert _windows(result) == [
        ("2026-02-01T00:00:00+01:00", "2026-03-01T00:00:00+01:00", 24.0),
        ("2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00", 743.0),
        ("2026-04-01T00:00:00+02:00", "2026-05-01T00:00:00+02:00", 24.0),
    ]


def test_minute_windows_over_an_hour_give_one_event_each_half_past(hourly: UsageQueries) -> None:
    result = _ask(hourly, "2026-03-10T10:00:00Z", "2026-03-10T13:00:00Z", window="MINUTE")
    assert _windows(result) == [
        (f"2026-03-10T{h}:30:00+00:00", f"2026-03-10T{h}:31:00+00:00", 1.0)
        for h in ("10", "11", "12")
    ]
    assert result.tables == ("usage_minute",)


def test_utc_days_are_read_from_the_daily_rollup(hourly: UsageQueries) -> None:
    result = _ask(hourly, "2026-03-01T00:00:00Z", "2026-03-04T00:00:00Z", window="DAY")
    assert [r.value for r in result.rows] == [24.0, 24.0, 24.0]
    assert result.tables == ("usage_day",)


def test_a_half_hour_zone_gets_local_days_from_the_minute_rollup(hourly: UsageQueries) -> None:
    result = _ask(
        hourly,
        "2026-03-10T00:00:00+05:30",
        "2026-03-12T00:00:00+05:30",
        window="DAY",
        tz="Asia/Kolkata",
    )
    assert _windows(result) == [
        ("2026-03-10T00:00:00+05:30", "2026-03-11T00:00:00+05:30", 24.0),
        ("2026-03-11T00:00:00+05:30", "2026-03-12T00:00:00+05:30", 24.0),
    ]
    assert result.tables == ("usage_minute",)
    raw = hourly.usage(result.query, force_raw=True)
    assert raw.rows == result.rows and raw.tables == ("usage_events",)


def test_without_a_window_the_answer_is_one_total_over_the_range(hourly: UsageQueries) -> None:
    result = _ask(hourly, "2026-03-01T00:00:00Z", "2026-03-03T12:00:00Z")
    assert [(r.window_start, r.window_end, r.value) for r in result.rows] == [
        (at("2026-03-01T00:00:00Z"), at("2026-03-03T12:00:00Z"), 60.0)
    ]
    assert result.tables == ("usage_hour",)  # 60 hours: one read beats days + hours


# --- aggregations, decisions, groups and filters -------------------------------------------------

T0 = at("2026-05-10T10:15:00Z")


@pytest.fixture(scope="module")
def shop(clickhouse_client: Any) -> Iterator[UsageQueries]:
    """acme/tokens: quantities 3, 5, 5, 2 (in that order) in one minute, then a rejected 100.
    shop/requests: route x method quantities 1, 2, 4, 8 and 16 without dimensions."""
    with scratch_database(clickhouse_client) as db:
        sec = dt.timedelta(seconds=1)
        events: list[dict[str, Any]] = [
            {"tenant": "acme", "meter": "tokens", "time": T0 + i * sec, "quantity": q}
            for i, q in enumerate([3, 5, 5, 2], start=1)
        ]
        events += [
            {
                "tenant": "acme",
                "meter": "tokens",
                "time": T0 + 5 * sec,
                "quantity": 100,
                "decision": "rejected",
            },
            {"tenant": "acme", "meter": "storage", "time": T0, "quantity": 7},
            {"tenant": "other", "meter": "tokens", "time": T0, "quantity": 1000},
        ]
        groups = [("/a", "GET", 1), ("/a", "POST", 2), ("/b", "GET", 4), ("/b", "POST", 8)]
        events += [
            {
                "tenant": "shop",
                "meter": "requests",
                "time": T0 + i * sec,
                "quantity": q,
                "dimensions": {"route": route, "method": method},
            }
            for i, (route, method, q) in enumerate(groups)
        ]
        events.append({"tenant": "shop", "meter": "requests", "time": T0, "quantity": 16})
        insert_events(clickhouse_client, db, events)
        yield UsageQueries(clickhouse_client, db)


EXPECTED = {"SUM": 15.0, "COUNT": 4, "MAX": 5.0, "UNIQUE_COUNT": 3, "LATEST": 2.0}
WINDOW_STARTS = {
    None: "2026-05-01T00:00:00+00:00",
    "MINUTE": "2026-05-10T10:15:00+00:00",
    "HOUR": "2026-05-10T10:00:00+00:00",
    "DAY": "2026-05-10T00:00:00+00:00",
    "MONTH": "2026-05-01T00:00:00+00:00",
}


@pytest.mark.parametrize("window", list(WINDOW_STARTS))
@pytest.mark.parametrize("aggregation", list(EXPECTED))
def test_each_aggregation_in_each_window(
    shop: UsageQueries, window: str | None, aggregation: str
) -> None:
    result = _ask(
        shop,
        "2026-05-01T00:00:00Z",
        "2026-06-01T00:00:00Z",
        tenant="acme",
        meter="tokens",
        window=window,
        aggregation=aggregation,
    )
    assert [(r.window_start.isoformat(), r.value) for r in result.rows] == [
        (WINDOW_STARTS[window], EXPECTED[aggregation])
    ]


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        ("billable", {"SUM": 15.0, "COUNT": 4, "MAX": 5.0, "LATEST": 2.0}),
        ("rejected", {"SUM": 100.0, "COUNT": 1, "MAX": 100.0, "LATEST": 100.0}),
        ("all", {"SUM": 115.0, "COUNT": 5, "MAX": 100.0, "LATEST": 100.0}),
    ],
)
def test_rejected_decisions_count_only_when_asked_for(
    shop: UsageQueries, decision: str, expected: dict[str, float]
) -> None:
    for aggregation, value in expected.items():
        for force_raw in (False, True):
            result = shop.usage(
                UsageQuery(
                    "acme",
                    "tokens",
                    at("2026-05-10T00:00:00Z"),
                    at("2026-05-11T00:00:00Z"),
                    aggregation=aggregation,
                    decision=decision,
                ),
                force_raw=force_raw,
            )
            assert [r.value for r in result.rows] == [value], (aggregation, force_raw)


def _shop(shop: UsageQueries, **kw: Any) -> list[tuple[dict[str, str | None], float | int]]:
    result = _ask(shop, "2026-05-10T00:00:00Z", "2026-05-11T00:00:00Z", tenant="shop", **kw)
    assert result.path == "raw"  # rollups carry no dimensions
    return [(r.group, r.value) for r in result.rows]


def test_group_by_a_dimension_adds_up_each_value_and_the_events_without_it(
    shop: UsageQueries,
) -> None:
    assert _shop(shop, group_by=["route"]) == [
        ({"route": "/a"}, 3.0),
        ({"route": "/b"}, 12.0),
        ({"route": None}, 16.0),
    ]


def test_group_by_two_dimensions_in_day_windows(shop: UsageQueries) -> None:
    assert _shop(shop, group_by=["route", "method"], window="DAY", aggregation="COUNT") == [
        ({"route": "/a", "method": "GET"}, 1),
        ({"route": "/a", "method": "POST"}, 1),
        ({"route": "/b", "method": "GET"}, 1),
        ({"route": "/b", "method": "POST"}, 1),
        ({"route": None, "method": None}, 1),
    ]


@pytest.mark.parametrize(
    ("filters", "total"),
    [
        ({"route": ["/a"]}, 3.0),
        ({"route": ["/a", "/b"]}, 15.0),
        ({"route": ["/a"], "method": ["POST"]}, 2.0),
        ({"method": ["GET"]}, 5.0),
        ({"nope": ["x"]}, None),
        ({"route": ["/a' OR '1'='1"]}, None),
        # An empty value matches events that carry the dimension empty, not those without it
        # (dimensions['route'] reads '' for an event that has no route).
        ({"route": [""]}, None),
        ({"nope": [""]}, None),
    ],
)
def test_filters_or_values_of_a_dimension_and_and_dimensions(
    shop: UsageQueries, filters: dict[str, list[str]], total: float | None
) -> None:
    assert _shop(shop, filters=filters) == ([] if total is None else [({}, total)])


# --- empty ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize("window", list(WINDOW_STARTS))
@pytest.mark.parametrize("aggregation", list(EXPECTED))
def test_a_range_without_events_answers_no_rows(
    shop: UsageQueries, window: str | None, aggregation: str
) -> None:
    for start, end in [
        ("2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"),  # rollup only
        ("2027-01-01T00:00:00.001Z", "2027-01-01T00:00:00.002Z"),  # raw only
    ]:
        result = _ask(
            shop, start, end, tenant="acme", meter="tokens", window=window, aggregation=aggregation
        )
        assert result.rows == []


# --- the rollup path and the raw path agree ------------------------------------------------------

DENSE_FROM, DENSE_TO = "2026-03-25T13:07:11.250Z", "2026-04-03T22:59:58.500Z"


def _dense_events() -> list[dict[str, Any]]:
    """3,000 events at distinct millisecond times over ten days spanning Berlin's spring DST
    change, quantities multiples of 0.25 (so every sum is exact in floating point)."""
    rng = random.Random(20260329)
    base = at("2026-03-25T00:00:00Z")
    offsets = rng.sample(range(10 * 86400 * 1000), 3000)
    return [
        {
            "tenant": "dense",
            "meter": "requests",
            "time": base + dt.timedelta(milliseconds=ms),
            "quantity": rng.randrange(0, 200) / 4,
            "decision": "rejected" if rng.random() < 0.1 else "",
        }
        for ms in offsets
    ]


@pytest.fixture(scope="module")
def dense(clickhouse_client: Any) -> Iterator[UsageQueries]:
    with scratch_database(clickhouse_client) as db:
        insert_events(clickhouse_client, db, _dense_events())
        yield UsageQueries(clickhouse_client, db)


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("window", [None, "MINUTE", "HOUR", "DAY", "MONTH"])
def test_rollups_with_raw_edges_answer_exactly_as_the_raw_events(
    dense: UsageQueries, tz: str, window: str | None
) -> None:
    for aggregation in Aggregation:
        q = UsageQuery(
            "dense",
            "requests",
            at(DENSE_FROM),
            at(DENSE_TO),
            window=window,
            tz=tz,
            aggregation=aggregation,
        )
        mixed, raw = dense.usage(q), dense.usage(q, force_raw=True)
        assert mixed.path == "mixed" and "usage_events" in mixed.tables
        assert raw.path == "raw"
        assert mixed.rows == raw.rows, aggregation
        assert mixed.rows, "the range holds events"


@pytest.mark.parametrize(
    ("window", "tz", "table"),
    [
        ("MINUTE", "UTC", "usage_minute"),
        ("MINUTE", "Europe/Berlin", "usage_minute"),
        ("MINUTE", "Asia/Kolkata", "usage_minute"),
        ("HOUR", "Europe/Berlin", "usage_hour"),
        ("HOUR", "Asia/Kolkata", "usage_minute"),
        ("DAY", "UTC", "usage_day"),
        ("DAY", "America/New_York", "usage_hour"),
        (None, "UTC", "usage_day"),
    ],
)
def test_a_range_of_whole_buckets_is_one_rollup_read_answering_as_the_raw_events(
    dense: UsageQueries, window: str | None, tz: str, table: str
) -> None:
    # Whole UTC days inside the data, across Berlin's and New York's DST changes: one segment,
    # read by one flat SELECT (a bucket the size of the window is taken as the window itself).
    for aggregation in Aggregation:
        q = UsageQuery(
            "dense",
            "requests",
            at("2026-03-27T00:00:00Z"),
            at("2026-04-01T00:00:00Z"),
            window=window,
            tz=tz,
            aggregation=aggregation,
        )
        rolled, raw = dense.usage(q), dense.usage(q, force_raw=True)
        assert (rolled.path, rolled.tables) == ("rollup", (table,))
        assert rolled.rows == raw.rows, aggregation
        assert rolled.rows, "the range holds events"


def test_the_totals_over_both_paths_are_the_events_added_up(dense: UsageQueries) -> None:
    start, end = at(DENSE_FROM), at(DENSE_TO)
    billable = [
        e for e in _dense_events() if start <= e["time"] < end and e["decision"] != "rejected"
    ]
    latest = max(billable, key=lambda e: e["time"])["quantity"]
    expected = {
        "SUM": sum(e["quantity"] for e in billable),
        "COUNT": len(billable),
        "MAX": max(e["quantity"] for e in billable),
        "UNIQUE_COUNT": len({e["quantity"] for e in billable}),
        "LATEST": latest,
    }
    for aggregation, value in expected.items():
        q = UsageQuery("dense", "requests", start, end, aggregation=aggregation)
        assert dense.usage(q).rows[0].value == value
        assert dense.usage(q, force_raw=True).rows[0].value == value

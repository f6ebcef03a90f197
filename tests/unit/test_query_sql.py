"""SQL building without a database: validation, rollup choice, range segments, binding."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.api.routes_usage import _wants_csv
from metering.queries import rfc3339, rolling_sums
from metering.query_sql import (
    DAY_ROLLUP,
    HOUR_ROLLUP,
    MINUTE_ROLLUP,
    QueryError,
    UsageQuery,
    Window,
    build_minute_series,
    build_statement,
    build_top_tenants,
    build_usage,
    coarsest_rollup,
    segments,
)

UTC = dt.UTC
A = dt.datetime(2026, 3, 1, tzinfo=UTC)
B = dt.datetime(2026, 4, 1, tzinfo=UTC)


def q(**kw: Any) -> UsageQuery:
    base: dict[str, Any] = {"tenant": "acme", "meter": "requests", "start": A, "end": B}
    return UsageQuery(**{**base, **kw})


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tenant": "acme'--"}, "tenant"),
        ({"tenant": ""}, "tenant"),
        ({"meter": "req uests"}, "meter"),
        ({"meter": "x" * 65}, "meter"),
        ({"start": dt.datetime(2026, 3, 1)}, "from"),  # naive
        ({"start": A + dt.timedelta(microseconds=1)}, "from"),
        ({"start": dt.datetime(1900, 1, 1, tzinfo=UTC)}, "from"),
        ({"end": dt.datetime(2200, 1, 1, tzinfo=UTC)}, "to"),
        # Before year 1 once in UTC, and after year 9999: out of range, not an OverflowError.
        ({"start": dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))}, "from"),
        ({"end": dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-2)))}, "to"),
        ({"end": A}, "to"),
        ({"start": dt.datetime(2010, 1, 1, tzinfo=UTC)}, "to"),  # more than ten years
        ({"window": "WEEK"}, "window"),
        ({"window": "MINUTE", "start": dt.datetime(2025, 1, 1, tzinfo=UTC)}, "window"),
        ({"tz": "Europe/Nowhere"}, "tz"),
        ({"tz": "../etc/localtime"}, "tz"),
        ({"tz": "UTC'); DROP TABLE x; --"}, "tz"),
        ({"aggregation": "AVG"}, "aggregation"),
        ({"aggregation": "SUM) --"}, "aggregation"),
        ({"group_by": ("route'",)}, "group_by"),
        ({"group_by": ("a", "b", "c", "d", "e", "f")}, "group_by"),
        ({"group_by": ("route", "route")}, "group_by"),
        ({"group_by": "route"}, "group_by"),
        ({"filters": {"route]": ["x"]}}, "filter"),
        ({"filters": {"route": []}}, "filter"),
        ({"filters": {"route": ["x" * 257]}}, "filter"),
        ({"filters": {"route": ["\udcff"]}}, "filter"),  # undecodable bytes of a command line
        ({"filters": {f"d{i}": ["x"] for i in range(11)}}, "filter"),
        ({"decision": "maybe"}, "decision"),
    ],
)
def test_each_bad_parameter_is_named(kw: dict[str, Any], param: str) -> None:
    with pytest.raises(QueryError) as err:
        q(**kw)
    assert err.value.param == param


def test_enums_are_case_insensitive_and_times_are_held_in_utc() -> None:
    berlin = dt.timezone(dt.timedelta(hours=1))
    query = q(
        window="day", aggregation="unique_count", start=dt.datetime(2026, 3, 1, 1, tzinfo=berlin)
    )
    assert query.window is Window.DAY and query.aggregation.value == "UNIQUE_COUNT"
    assert query.start == A and query.start.tzinfo is UTC


# --- which rollup answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "tz", "rollup"),
    [
        (None, "Asia/Kolkata", DAY_ROLLUP),
        ("DAY", "UTC", DAY_ROLLUP),
        ("MONTH", "UTC", DAY_ROLLUP),
        ("DAY", "Europe/Berlin", HOUR_ROLLUP),
        ("MONTH", "America/New_York", HOUR_ROLLUP),
        ("HOUR", "Europe/Berlin", HOUR_ROLLUP),
        ("DAY", "Asia/Kolkata", MINUTE_ROLLUP),  # +05:30
        ("HOUR", "Asia/Kathmandu", MINUTE_ROLLUP),  # +05:45
        ("MINUTE", "UTC", MINUTE_ROLLUP),
        ("DAY", "Australia/Lord_Howe", MINUTE_ROLLUP),  # +10:30 / +11:00
    ],
)
def test_the_coarsest_rollup_whose_buckets_fit_in_one_window(
    window: str | None, tz: str, rollup: Any
) -> None:
    assert coarsest_rollup(Window(window) if window else None, tz, A, B) == rollup


def test_a_zone_that_changed_to_a_half_hour_offset_in_range_gets_minute_buckets() -> None:
    # Venezuela used -04:30 from 2007-12-09 to 2016-05-01.
    start = dt.datetime(2007, 12, 1, tzinfo=UTC)
    assert (
        coarsest_rollup(Window.DAY, "America/Caracas", start, start + dt.timedelta(days=30))
        == MINUTE_ROLLUP
    )
    later = dt.datetime(2020, 1, 1, tzinfo=UTC)
    assert (
        coarsest_rollup(Window.DAY, "America/Caracas", later, later + dt.timedelta(days=30))
        == HOUR_ROLLUP
    )


# --- segments ------------------------------------------------------------------------------------


def test_an_unaligned_range_is_raw_then_minute_hour_day_then_back() -> None:
    start = int(dt.datetime(2026, 3, 1, 22, 58, 30, tzinfo=UTC).timestamp() * 1000)
    end = int(dt.datetime(2026, 3, 4, 1, 2, 3, tzinfo=UTC).timestamp() * 1000)
    parts = segments(start, end, DAY_ROLLUP)
    assert [s.rollup.table if s.rollup else "raw" for s in parts] == [
        "raw",
        "usage_minute",
        "usage_hour",
        "usage_day",
        "usage_hour",
        "usage_minute",
        "raw",
    ]


def test_a_range_inside_one_minute_is_raw_only() -> None:
    parts = segments(1_000, 59_000, DAY_ROLLUP)
    assert [(s.lo_ms, s.hi_ms, s.rollup) for s in parts] == [(1_000, 59_000, None)]


@given(
    start=st.integers(0, 40 * 86_400_000),
    length=st.integers(1, 40 * 86_400_000),
    coarsest=st.sampled_from([None, MINUTE_ROLLUP, HOUR_ROLLUP, DAY_ROLLUP]),
    max_buckets=st.sampled_from([0, 10, 2000]),
)
def test_segments_cover_the_range_exactly_with_aligned_rollup_parts(
    start: int, length: int, coarsest: Any, max_buckets: int
) -> None:
    end = start + length
    parts = segments(start, end, coarsest, max_buckets)
    assert parts[0].lo_ms == start and parts[-1].hi_ms == end
    for a, b in itertools.pairwise(parts):
        assert a.hi_ms == b.lo_ms
    for s in parts:
        assert s.lo_ms < s.hi_ms
        if s.rollup is not None:
            size = s.rollup.seconds * 1000
            assert s.lo_ms % size == 0 and s.hi_ms % size == 0
            assert coarsest is not None and s.rollup.seconds <= coarsest.seconds
    assert len(parts) <= 7


# --- binding: caller values never reach the SQL text ---------------------------------------------


def test_values_are_bound_as_parameters_never_spliced() -> None:
    query = q(
        tenant="acme.corp",
        window="DAY",
        tz="America/New_York",
        group_by=("route",),
        filters={"route": ["/x' OR '1'='1"], "method": ["GET"]},
    )
    sql = build_usage(query, "metering")
    for value in ("acme.corp", "America/New_York", "route", "/x' OR '1'='1", "GET", "method"):
        assert value not in sql.sql
    assert sql.parameters["tenant"] == "acme.corp"
    assert sql.parameters["fv0"] == ["/x' OR '1'='1"]
    assert set(re.findall(r"\{(\w+):", sql.sql)) == set(sql.parameters)


@pytest.mark.parametrize(
    "built",
    [
        lambda: build_statement("acme", A, B, "metering"),
        lambda: build_minute_series("acme", "requests", 60, 3600, "metering"),
        lambda: build_top_tenants("requests", 60, 3600, 10, "metering"),
    ],
)
def test_every_builder_binds_all_its_placeholders(built: Any) -> None:
    sql = built()
    assert set(re.findall(r"\{(\w+):", sql.sql)) == set(sql.parameters)
    assert "acme" not in sql.sql and "'requests'" not in sql.sql


def test_the_database_name_must_be_an_identifier() -> None:
    with pytest.raises(ValueError, match="database"):
        build_usage(q(), "metering; DROP")


def test_group_by_and_filters_read_the_raw_events() -> None:
    assert build_usage(q(window="DAY", group_by=("route",)), "m").tables == ("usage_events",)
    assert build_usage(q(filters={"route": ["/a"]}), "m").tables == ("usage_events",)
    assert build_usage(q(window="DAY"), "m").tables == ("usage_day",)


# --- small pure helpers --------------------------------------------------------------------------


def test_rolling_sums_add_the_minutes_of_each_window() -> None:
    values = {0: 1.0, 60: 2.0, 180: 4.0}
    assert rolling_sums(values, 120, 4, 2) == [(120, 3.0), (180, 2.0), (240, 4.0), (300, 4.0)]


def test_rolling_sums_are_exact_for_decimal_quantities() -> None:
    values = {60 * i: 0.1 for i in range(10)}
    assert rolling_sums(values, 600, 1, 10) == [(600, 1.0)]


def test_rfc3339_keeps_the_offset_and_drops_zero_fractions() -> None:
    t = dt.datetime(2026, 3, 29, 3, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert rfc3339(t) == "2026-03-29T03:00:00+02:00"
    assert rfc3339(t.replace(microsecond=250_000)) == "2026-03-29T03:00:00.250+02:00"


@pytest.mark.parametrize(
    ("accept", "csv"),
    [
        ("text/csv", True),
        ("application/json", False),
        ("", False),
        ("*/*", False),
        ("text/csv;q=0.5, application/json", False),
        ("application/json;q=0.5, text/csv", True),
        ("text/csv;q=0", False),
    ],
)
def test_csv_only_when_preferred(accept: str, csv: bool) -> None:
    assert _wants_csv(accept) is csv

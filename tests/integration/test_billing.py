"""Billing statements on the real engine: a tenant's local calendar month, per meter, exact.

The data has one ``requests`` event of 1 and one ``tokens`` event of 0.5 at half past every UTC
hour, so a month's statement counts the hours the month lasts in the tenant's time zone.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from typing import Any

import pytest

from metering.billing import billing_statement, month_period
from metering.queries import UsageQueries
from metering.query_sql import QueryError, UsageQuery
from tests.integration.query_schema import at, insert_events, scratch_database


@pytest.fixture(scope="module")
def billing(clickhouse_client: Any) -> Iterator[UsageQueries]:
    t, stop, events = at("2026-02-25T00:30:00Z"), at("2026-04-05T00:00:00Z"), []
    while t < stop:
        events.append({"tenant": "acme", "meter": "requests", "time": t, "quantity": 1})
        events.append({"tenant": "acme", "meter": "tokens", "time": t, "quantity": 0.5})
        t += dt.timedelta(hours=1)
    events += [
        # Rejected decisions are never billed.
        {
            "tenant": "acme",
            "meter": "requests",
            "time": at("2026-03-15T12:00:00Z"),
            "quantity": 1000,
            "decision": "rejected",
        },
        # Ten tenths make one: the statement shows 1, whatever order ClickHouse adds in.
        *[
            {
                "tenant": "tenths",
                "meter": "gb",
                "time": at("2026-03-10T00:00:00Z") + dt.timedelta(minutes=7 * i, milliseconds=i),
                "quantity": 0.1,
            }
            for i in range(10)
        ],
        {
            "tenant": "other",
            "meter": "requests",
            "time": at("2026-03-15T12:00:00Z"),
            "quantity": 99,
        },
    ]
    with scratch_database(clickhouse_client) as db:
        insert_events(clickhouse_client, db, events)
        yield UsageQueries(clickhouse_client, db)


@pytest.mark.parametrize(
    ("tz", "start", "end", "hours"),
    [
        ("UTC", "2026-03-01T00:00:00+00:00", "2026-04-01T00:00:00+00:00", 744),
        ("Europe/Berlin", "2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00", 743),
        ("America/New_York", "2026-03-01T00:00:00-05:00", "2026-04-01T00:00:00-04:00", 743),
        ("Asia/Kolkata", "2026-03-01T00:00:00+05:30", "2026-04-01T00:00:00+05:30", 744),
    ],
)
def test_a_statement_covers_the_tenants_local_month_per_meter(
    billing: UsageQueries, tz: str, start: str, end: str, hours: int
) -> None:
    statement = billing_statement(billing, "acme", "2026-03", tz)
    assert statement.to_dict() == {
        "tenant": "acme",
        "month": "2026-03",
        "tz": tz,
        "period_start": start,
        "period_end": end,
        "lines": [
            {"meter": "requests", "quantity": hours, "events": hours},
            {"meter": "tokens", "quantity": hours / 2, "events": hours},
        ],
    }
    assert billing_statement(billing, "acme", "2026-03", tz, force_raw=True) == statement


def test_fractional_quantities_add_up_to_the_decimal_total(billing: UsageQueries) -> None:
    for force_raw in (False, True):
        statement = billing_statement(billing, "tenths", "2026-03", force_raw=force_raw)
        assert statement.to_dict()["lines"] == [{"meter": "gb", "quantity": 1, "events": 10}]


def test_the_csv_has_a_header_and_one_row_per_meter(billing: UsageQueries) -> None:
    text = billing_statement(billing, "acme", "2026-03", "Europe/Berlin").to_csv()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [
        ["tenant", "month", "tz", "period_start", "period_end", "meter", "quantity", "events"],
        [
            "acme",
            "2026-03",
            "Europe/Berlin",
            "2026-03-01T00:00:00+01:00",
            "2026-04-01T00:00:00+02:00",
            "requests",
            "743",
            "743",
        ],
        [
            "acme",
            "2026-03",
            "Europe/Berlin",
            "2026-03-01T00:00:00+01:00",
            "2026-04-01T00:00:00+02:00",
            "tokens",
            "371.5",
            "743",
        ],
    ]


def test_a_month_without_usage_is_an_empty_statement(billing: UsageQueries) -> None:
    statement = billing_statement(billing, "acme", "2025-12", "UTC")
    assert statement.lines == ()
    assert statement.to_csv().splitlines() == [
        "tenant,month,tz,period_start,period_end,meter,quantity,events"
    ]


def test_a_partial_month_counts_what_exists(billing: UsageQueries) -> None:
    # Data starts 2026-02-25 00:30 UTC: four days of February.
    lines = billing_statement(billing, "acme", "2026-02").to_dict()["lines"]
    assert lines == [
        {"meter": "requests", "quantity": 96, "events": 96},
        {"meter": "tokens", "quantity": 48, "events": 96},
    ]


@pytest.mark.parametrize(
    "month",
    # the last: 2026-03 in full-width digits, which \d matches and a latin-1 header cannot carry
    [
        "2026-3",
        "2026-00",
        "2026-13",
        "26-03",
        "2026-03-01",
        "",
        "\uff12\uff10\uff12\uff16-\uff10\uff13",
    ],
)
def test_a_month_that_is_not_yyyy_mm_is_refused(month: str) -> None:
    with pytest.raises(QueryError) as err:
        month_period(month, "UTC")
    assert err.value.param == "month"


def test_the_period_is_local_midnight_to_local_midnight() -> None:
    start, end = month_period("2026-10", "Europe/Berlin")
    assert (start.isoformat(), end.isoformat()) == (
        "2026-10-01T00:00:00+02:00",
        "2026-11-01T00:00:00+01:00",
    )
    assert end.astimezone(dt.UTC) - start.astimezone(dt.UTC) == dt.timedelta(days=31, hours=1)


@pytest.mark.parametrize(
    ("month", "tz"), [("1970-01", "Asia/Tokyo"), ("2099-12", "America/New_York")]
)
def test_a_month_reaching_outside_the_stored_times_is_refused_naming_the_month(
    month: str, tz: str
) -> None:
    """1970-01 in Tokyo starts in 1969 UTC: the error names ``month`` (it named ``from``, a
    parameter the billing route does not have)."""
    with pytest.raises(QueryError) as err:
        month_period(month, tz)
    assert err.value.param == "month"
    assert "outside the times stored" in str(err.value)
    month_period(month, "UTC")  # the same month in UTC is within them


# The zones the billing audit found a release apart between this machine's zoneinfo (2025b) and
# the embedded ClickHouse's (2026c), or between the tzdata package (2026f) and ClickHouse's.
DRIFTED_ZONES = [
    "America/Vancouver",
    "America/Edmonton",
    "Africa/Casablanca",
    "Europe/Chisinau",
    "America/Winnipeg",
    "America/Havana",
]


@pytest.fixture(scope="module")
def autumn(clickhouse_client: Any) -> Iterator[UsageQueries]:
    """One ``requests`` event of 1 at half past every UTC hour, 2026-10-25 to 2026-12-05: the
    months around the changes the drifted zones' databases disagree on."""
    t, stop, events = at("2026-10-25T00:30:00Z"), at("2026-12-05T00:00:00Z"), []
    while t < stop:
        events.append({"tenant": "acme", "meter": "requests", "time": t, "quantity": 1})
        t += dt.timedelta(hours=1)
    with scratch_database(clickhouse_client) as db:
        insert_events(clickhouse_client, db, events)
        yield UsageQueries(clickhouse_client, db)


@pytest.mark.parametrize("tz", [*DRIFTED_ZONES, "Europe/Berlin"])
@pytest.mark.parametrize("month", ["2026-03", "2026-11"])
def test_a_statement_and_the_month_window_agree_or_the_zone_is_refused(
    billing: UsageQueries, autumn: UsageQueries, tz: str, month: str
) -> None:
    """The billing audit: a statement's month bounds came from Python's zone database and the
    MONTH windows from ClickHouse's, a release apart: for America/Vancouver's November 2026 the
    two billed different hours. On any machine, either the databases agree on the zone in that
    month (and so do the two answers), or both refuse it on ``tz``, naming the disagreement."""
    queries = billing if month == "2026-03" else autumn
    try:
        statement = billing_statement(queries, "acme", month, tz)
    except QueryError as exc:
        assert exc.param == "tz" and "disagree" in str(exc), exc
        first = at(f"{month}-01T00:00:00Z")
        with pytest.raises(QueryError, match="disagree"):
            queries.usage(
                UsageQuery(
                    tenant="acme",
                    meter="requests",
                    start=first - dt.timedelta(days=1),
                    end=first + dt.timedelta(days=31),
                    window="MONTH",
                    tz=tz,
                )
            )
        return
    window = queries.usage(
        UsageQuery(
            tenant="acme",
            meter="requests",
            start=statement.period_start - dt.timedelta(days=1),
            end=statement.period_end + dt.timedelta(days=1),
            window="MONTH",
            tz=tz,
        )
    )
    rows = {(r.window_start, r.window_end): r.value for r in window.rows}
    assert (statement.period_start, statement.period_end) in rows, (statement, rows)
    billed = {line.meter: line.quantity for line in statement.lines}["requests"]
    assert billed == rows[statement.period_start, statement.period_end]


def _drift(monkeypatch: pytest.MonkeyPatch, at_instant: str) -> None:
    """Python's side of the zone check made to give an offset an hour ahead for the hour from
    ``at_instant``, and the per-process cache of the check emptied."""
    import metering.queries as queries_module

    real = queries_module.python_offsets
    change = int(at(at_instant).timestamp())

    def drifted(tz: str, starts: range) -> list[int]:
        out = real(tz, starts)
        moved = range(change, change + 3600)
        return [o + 3600 if t in moved else o for t, o in zip(starts, out, strict=True)]

    monkeypatch.setattr(queries_module, "python_offsets", drifted)
    monkeypatch.setattr(queries_module, "_ZONE_YEARS", {})


def test_a_zone_whose_offsets_differ_between_the_databases_is_refused(
    billing: UsageQueries, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check itself, wherever the two databases happen to agree: Python's side made to
    move Europe/Berlin's spring change by an hour."""
    import metering.queries as queries_module

    real = queries_module.python_offsets
    _drift(monkeypatch, "2026-03-29T01:00:00Z")
    refused = r"Europe/Berlin: .* disagree .* 2026 \(at 2026-03-29T01:00Z"
    with pytest.raises(QueryError, match=refused):
        billing_statement(billing, "acme", "2026-03", "Europe/Berlin")
    assert billing_statement(billing, "acme", "2025-12", "UTC").lines == ()  # UTC: no check
    monkeypatch.setattr(queries_module, "python_offsets", real)
    monkeypatch.setattr(queries_module, "_ZONE_YEARS", {})
    assert billing_statement(billing, "acme", "2026-03", "Europe/Berlin").lines


def test_a_month_window_is_checked_from_its_own_start_not_the_questions(
    billing: UsageQueries, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: a MONTH window begins up to a month before the question, and Python labels
    it; a difference at that month's start (20 days before the question) was not looked at,
    and the window came back labelled at a time that is no month start."""
    _drift(monkeypatch, "2026-02-28T23:00:00Z")  # Berlin's March begins then
    question = {
        "tenant": "acme",
        "meter": "requests",
        "start": at("2026-03-20T00:00:00Z"),
        "end": at("2026-03-25T00:00:00Z"),
        "tz": "Europe/Berlin",
    }
    with pytest.raises(QueryError, match="at 2026-02-28T23:00Z"):
        billing.usage(UsageQuery(**question, window="MONTH"))
    assert billing.usage(UsageQuery(**question, window="DAY")).rows  # its windows: unaffected


def test_the_zone_check_asks_clickhouse_once_per_zone_and_year_in_a_process(
    billing: UsageQueries, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review: the API makes a UsageQueries per request, and the check's memory was per
    object, so every request in a zone other than UTC paid ~25 ms a year of its span (220 ms
    for ten years)."""
    import metering.queries as queries_module

    monkeypatch.setattr(queries_module, "_ZONE_YEARS", {})
    asked: list[str] = []

    class Counting(UsageQueries):
        def run(self, query: Any) -> list[tuple[Any, ...]]:
            asked.append(query.sql)
            return super().run(query)

    for _ in range(3):  # three requests, three objects
        Counting(billing.client, billing.database).check_zone(
            "Asia/Kolkata", at("2024-06-01T00:00:00Z"), at("2026-06-01T00:00:00Z")
        )
    assert len(asked) == 3  # 2024, 2025, 2026: once each

from __future__ import annotations

import datetime as dt

from metering.reconcile import compare, day_key, format_report


def test_three_sources_in_agreement_report_no_drift() -> None:
    rows = compare({"a": 5, "b": 7}, {"a": 5, "b": 7}, {"a": 5, "b": 7})
    assert [r.agrees for r in rows] == [True, True]
    assert "2 tenants, 0 with drift" in format_report(rows, dt.date(2026, 11, 28))


def test_drift_is_reported_per_source_against_clickhouse() -> None:
    rows = compare({"a": 10, "b": 7}, {"a": 9, "b": 7}, {"a": 9, "c": 3})
    by = {r.tenant: r for r in rows}
    assert by["a"].drift == {"redis": 1}
    assert by["b"].drift == {"quota_db": -7}
    assert by["c"].drift == {"quota_db": 3}
    assert not by["c"].agrees
    report = format_report(rows, dt.date(2026, 11, 28))
    assert "3 tenants, 3 with drift" in report
    assert "redis +1" in report


def test_a_tenant_seen_nowhere_with_usage_zero_everywhere_agrees() -> None:
    (row,) = compare({"a": 0}, {}, {})
    assert row.agrees


def test_day_key_matches_the_limiter_key_layout() -> None:
    assert day_key("acme", dt.date(2026, 1, 2)) == "rl:{acme}:day:20260102"

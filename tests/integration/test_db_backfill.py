"""``metering db backfill``: the days a worker no longer reads, from ClickHouse into the quota DB
(an upgrade's totals older than the worker's catch-up, a quota DB restored from a backup)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from metering.clickhouse.client import adopt_embedded_client
from metering.clickhouse.schema import migrate
from metering.quota_db import QuotaStore
from metering.quota_db import migrate as migrate_quota_db
from streams.sink import EVENT_COLUMNS

TODAY = dt.datetime.now(dt.UTC).date()


def decision(i: int, tenant: str, days_ago: int, qty: float, meter: str = "requests") -> list:  # type: ignore[type-arg]
    at = dt.datetime.combine(TODAY - dt.timedelta(days=days_ago), dt.time(12), tzinfo=dt.UTC)
    row = [f"e{i}", "metering.ratelimit", "urn:t", tenant, meter, "allowed", 1, at, qty, {}]
    return [*row, "t", 0, i]


@pytest.fixture
def cli(  # type: ignore[no-untyped-def]
    clickhouse_client, clickhouse_db, clickhouse_url, tmp_path: Path, monkeypatch
) -> Iterator[QuotaStore]:
    from metering.settings import get_settings

    migrate(clickhouse_client, clickhouse_db)
    adopt_embedded_client(clickhouse_url, clickhouse_client)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_url)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", clickhouse_db)
    monkeypatch.setenv("QUOTA_DB_URL", url)
    get_settings.cache_clear()
    yield QuotaStore(url)
    get_settings.cache_clear()


def test_days_before_the_workers_catch_up_are_written_with_the_measure_in_force(
    cli: QuotaStore, clickhouse_client, clickhouse_db: str, tenant: str, capsys
) -> None:
    from metering.cli import main

    rows = [decision(1, tenant, 40, 3), decision(2, tenant, 40, 4, meter="queries")]
    rows += [decision(3, tenant, 35, 9), decision(4, tenant, 0, 1)]
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows, column_names=EVENT_COLUMNS)
    old, older = TODAY - dt.timedelta(days=35), TODAY - dt.timedelta(days=40)
    # What the release before left: another measure, and larger (its totals only ever rose).
    cli.upsert_daily_usage([(tenant, older, 900), (tenant, old, 800)])
    assert main(["db", "backfill", "--since", older.isoformat()]) == 0
    assert capsys.readouterr().out == (
        f"quota DB: 3 day totals of 1 tenants, {older} to {TODAY}"
        " (allowed limiter decisions, every meter)\n"
    )
    assert [cli.daily_usage(tenant, d) for d in (older, old, TODAY)] == [7, 9, 1]
    assert cli.earliest_day_of_another_measure("decisions", older) is None
    # Again: nothing changes (absolute totals).
    assert main(["db", "backfill", "--since", older.isoformat(), "--until", str(TODAY)]) == 0
    assert [cli.daily_usage(tenant, d) for d in (older, old, TODAY)] == [7, 9, 1]


def test_totals_clickhouse_has_none_for_are_zeroed_and_replace_lowers_raised_ones(
    cli: QuotaStore, clickhouse_client, clickhouse_db: str, tenant: str, capsys
) -> None:
    """The second review's cases: a tenant-day of another measure with no total of this one
    kept its old total (only the pairs ClickHouse returned were written); and a total of this
    measure raised by a worker of the release before could not be lowered by anything."""
    from metering.cli import main

    day = TODAY - dt.timedelta(days=3)
    clickhouse_client.insert(
        f"{clickhouse_db}.usage_events", [decision(1, tenant, 3, 4)], column_names=EVENT_COLUMNS
    )
    quiet, raised = f"{tenant}-q", f"{tenant}-r"
    cli.upsert_daily_usage([(quiet, day, 500)])  # another measure; no decisions that day
    cli.upsert_daily_usage([(raised, day, 300), (tenant, day, 60)], measure="decisions")
    outside = day - dt.timedelta(days=1)
    cli.upsert_daily_usage([(quiet, outside, 200)])  # a day not asked for: left alone
    assert main(["db", "backfill", "--since", str(day), "--until", str(day)]) == 0
    assert [cli.daily_usage(t, day) for t in (tenant, quiet, raised)] == [60, 0, 300]
    assert main(["db", "backfill", "--since", str(day), "--until", str(day), "--replace"]) == 0
    assert [cli.daily_usage(t, day) for t in (tenant, quiet, raised)] == [4, 0, 0]
    assert cli.daily_usage(quiet, outside) == 200
    capsys.readouterr()


def test_bad_days_are_refused_naming_them(cli: QuotaStore, capsys) -> None:  # type: ignore[no-untyped-def]
    from metering.cli import main

    assert main(["db", "backfill", "--since", "2026-12-05", "--until", "2026-12-01"]) == 1
    assert "--since 2026-12-05 is after --until 2026-12-01" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["db", "backfill", "--since", "last week"])
    assert exit_.value.code == 2
    assert "'last week' is not a day (YYYY-MM-DD)" in capsys.readouterr().err
    # It was a traceback (OverflowError), and ClickHouse clamps other days silently.
    assert main(["db", "backfill", "--since", "2026-12-01", "--until", "9999-12-31"]) == 1
    assert capsys.readouterr().err == (
        "metering: --until 9999-12-31 is outside ClickHouse's days (1970-01-01 to 2149-06-05)\n"
    )
    assert main(["db", "backfill", "--since", "1969-12-31", "--until", "1970-01-02"]) == 1
    assert "--since 1969-12-31 is outside ClickHouse's days" in capsys.readouterr().err


def test_an_engine_another_process_holds_is_named_in_one_line(
    clickhouse_client, clickhouse_url: str, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    if not clickhouse_url.startswith("chdb:"):
        pytest.skip("needs the embedded engine")
    # This process runs the engine on the session's folder: a second process cannot open it.
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "db", "backfill", "--since", str(TODAY)],
        env={
            **os.environ,
            "CLICKHOUSE_URL": clickhouse_url,
            "QUOTA_DB_URL": f"sqlite:///{tmp_path / 'quota.db'}",
            "METERING_DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"metering: the embedded ClickHouse is in use by another process (pid {os.getpid()}):"
        " stop it first (a running worker backfills the open days itself)\n"
    )

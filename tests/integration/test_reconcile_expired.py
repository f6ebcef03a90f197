"""`metering reconcile` and ``GET /v1/admin/reconcile`` of a closed UTC day, with the real Redis
(where the day's counters have expired, as acquire.lua's EXAT makes them), ClickHouse and a
quota DB: the day is checked as ClickHouse against the quota DB, and only a difference there is
drift (it used to report every tenant, exit code 1)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from metering import reconcile
from metering.clickhouse.client import adopt_embedded_client
from metering.clickhouse.schema import migrate
from metering.quota_db import DailyUsageRow, QuotaStore
from metering.quota_db import migrate as migrate_quota_db
from streams.sink import EVENT_COLUMNS
from tests.integration.test_reconcile import own_database

USED = 115


@pytest.fixture
def closed_day(clickhouse_client, clickhouse_db, clickhouse_url, redis_url, tmp_path: Path):
    """A tenant's usage two days ago in ClickHouse and the quota DB, and no counter in Redis."""
    yield from _usage_without_counter(
        clickhouse_client, clickhouse_db, clickhouse_url, redis_url, tmp_path, days_ago=2
    )


@pytest.fixture
def open_day(clickhouse_client, clickhouse_db, clickhouse_url, redis_url, tmp_path: Path):
    """The same today: a missing counter is drift (Redis restarted empty, a key deleted)."""
    yield from _usage_without_counter(
        clickhouse_client, clickhouse_db, clickhouse_url, redis_url, tmp_path, days_ago=0
    )


def _usage_without_counter(  # type: ignore[no-untyped-def]
    clickhouse_client, clickhouse_db, clickhouse_url, redis_url, tmp_path: Path, days_ago: int
):
    migrate(clickhouse_client, clickhouse_db)
    db_url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(db_url)
    store = QuotaStore(db_url)
    tenant = f"rec-exp-{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now(dt.UTC)
    day = now.date() - dt.timedelta(days=days_ago)
    at = min(dt.datetime.combine(day, dt.time(23, 59, 59), tzinfo=dt.UTC), now)
    row = [uuid.uuid4().hex, "metering.ratelimit", "urn:t", tenant, "requests", "allowed", 1]
    row += [at, USED, {}]
    clickhouse_client.insert(
        f"{clickhouse_db}.usage_events", [[*row, "t", 0, 0]], column_names=EVENT_COLUMNS
    )
    store.upsert_daily_usage([(tenant, day, float(USED))])
    redis_db = own_database(redis_url)
    client = redis.Redis.from_url(redis_db)
    assert not client.exists(reconcile.day_key(tenant, day))  # long expired
    client.close()
    adopt_embedded_client(clickhouse_url, clickhouse_client)
    yield {"tenant": tenant, "day": day, "store": store, "db_url": db_url, "redis_url": redis_db}


def _cli_env(day: dict, clickhouse_url, clickhouse_db, monkeypatch):  # type: ignore[no-untyped-def]
    from metering.settings import get_settings

    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_url)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", clickhouse_db)
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", day["redis_url"])
    monkeypatch.setenv("QUOTA_DB_URL", day["db_url"])
    for var in ("RATE_LIMIT_REDIS_CLUSTER_NODES", "RATE_LIMIT_REDIS_SENTINELS"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield day
    get_settings.cache_clear()


@pytest.fixture
def cli_env(closed_day, clickhouse_url, clickhouse_db, monkeypatch):
    yield from _cli_env(closed_day, clickhouse_url, clickhouse_db, monkeypatch)


@pytest.fixture
def open_day_env(open_day, clickhouse_url, clickhouse_db, monkeypatch):
    yield from _cli_env(open_day, clickhouse_url, clickhouse_db, monkeypatch)


class _HostAhead(dt.datetime):
    """This host's clock three days ahead of the Redis server's."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
        return dt.datetime.now(tz) + dt.timedelta(days=3)


def test_counters_expire_by_the_redis_servers_clock_not_the_hosts(
    open_day_env, capsys, monkeypatch
) -> None:
    """Today's counter is missing (Redis restarted empty): drift, exit code 1, even when the
    host running reconcile has a clock past the counters' expiry (it marked the row expired,
    exit code 0); acquire.lua expires them by the server's ``TIME``."""
    from types import SimpleNamespace

    import metering.commands.reconcile as command
    from metering.cli import main

    monkeypatch.setattr(
        command,
        "dt",
        SimpleNamespace(date=dt.date, datetime=_HostAhead, UTC=dt.UTC, timedelta=dt.timedelta),
    )
    assert main(["reconcile", "--day", open_day_env["day"].isoformat(), "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)["tenants"]
    assert (row["redis"], row["expired"], row["agrees"]) == (None, False, False)
    client = redis.Redis.from_url(open_day_env["redis_url"])
    assert reconcile.redis_now(client).date() == open_day_env["day"]
    client.close()


def test_a_closed_day_whose_counters_expired_reconciles_with_exit_code_0(cli_env, capsys) -> None:
    from metering.cli import main

    tenant, day = cli_env["tenant"], cli_env["day"].isoformat()
    assert main(["reconcile", "--day", day, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["tenants"]
    assert row == {
        "tenant": tenant,
        "redis": None,
        "clickhouse": USED,
        "quota_db": USED,
        "expired": True,
        "agrees": True,
        "drift": {},
    }
    assert main(["reconcile", "--day", day]) == 0
    text = capsys.readouterr().out
    assert f"{tenant}" in text and "expired" in text and "1 tenants, 0 with drift" in text


def test_clickhouse_apart_from_the_quota_db_on_a_closed_day_is_drift_with_exit_code_1(
    cli_env, capsys
) -> None:
    from metering.cli import main

    with cli_env["store"].engine.begin() as db:  # a backfill that fell behind
        db.execute(
            update(DailyUsageRow)
            .where(DailyUsageRow.tenant == cli_env["tenant"], DailyUsageRow.day == cli_env["day"])
            .values(used=3)
        )
    assert main(["reconcile", "--day", cli_env["day"].isoformat()]) == 1
    text = capsys.readouterr().out
    assert "DRIFT quota_db -112" in text and "redis" not in text.split("DRIFT")[1]
    assert "1 tenants, 1 with drift" in text


async def test_the_api_route_marks_expired_counters_and_counts_no_drift(
    closed_day, clickhouse_client, clickhouse_db, kafka_bootstrap, tmp_path: Path
) -> None:
    from tests.integration.api_support import admin, api_client, api_settings

    settings = api_settings(
        tmp_path / "api",
        closed_day["redis_url"],
        kafka_bootstrap,
        quota_db_url=closed_day["db_url"],
        clickhouse_database=clickhouse_db,
    )
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        r = await client.get(
            "/v1/admin/reconcile", params={"day": closed_day["day"].isoformat()}, headers=admin()
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["drifted"] == 0
    (row,) = body["tenants"]
    assert (row["tenant"], row["redis"], row["expired"], row["agrees"]) == (
        closed_day["tenant"],
        None,
        True,
        True,
    )

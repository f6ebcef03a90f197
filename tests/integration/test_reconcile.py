"""Reconciliation over the real path: limiter decisions in Redis, their events through the real
Emitter (lz4, as in production) into Kafka, the sink into ClickHouse, the backfill into the
quota DB. The three sources agree; a drift the test introduces in one of them is found, named
and counted, by the functions, the CLI and the API route."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import update

from limiter import Quota, RateLimiter
from metering import reconcile
from metering.clickhouse.client import adopt_embedded_client
from metering.clickhouse.schema import migrate
from metering.emitter import Emitter
from metering.events import decision_event, usage_event
from metering.quota_db import DailyUsageRow, QuotaStore
from metering.quota_db import migrate as migrate_quota_db
from streams.backfill import Backfill
from tests.integration.streams_support import unique_topics
from tests.integration.test_streams_sink import make_sink, run_until_caught_up

ALLOWED = {"a": 7, "b": 3}  # allowed decisions per tenant (suffixes; tenants are unique per run)
#: each tenant's route meter (RATE_LIMIT_ROUTE_METERS): the daily counter counts every meter
METERS = {"a": "requests", "b": "queries"}
RECONCILE_DB = 9  # a Redis database of its own, so the report holds this test's tenants only


def own_database(url: str) -> str:
    base, _, last = url.rstrip("/").rpartition("/")
    return f"{base}/{RECONCILE_DB}" if last.isdigit() else f"{url.rstrip('/')}/{RECONCILE_DB}"


@pytest.fixture
def pipeline(clickhouse_client, clickhouse_db, redis_url, kafka_bootstrap, tmp_path: Path):
    """Run decisions through the whole pipeline once; return what the test needs to look."""
    migrate(clickhouse_client, clickhouse_db)
    db_url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(db_url)
    store = QuotaStore(db_url)
    topic, dlq = unique_topics(kafka_bootstrap)
    run = uuid.uuid4().hex[:8]
    tenants = {k: f"rec-{k}-{run}" for k in ALLOWED}
    redis_url = own_database(redis_url)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # this test's own database (see RECONCILE_DB)
    limiter = RateLimiter(client)
    emitter = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path / "spool")
    quota = Quota(rate_per_sec=1000.0, burst=1000, daily_limit=1_000_000)
    for key, n in ALLOWED.items():
        meter = METERS[key]
        for _ in range(n):
            decision = limiter.acquire(tenants[key], 1, quota=quota)
            assert decision.allowed
            emitter.emit(decision_event(tenants[key], decision, meter=meter, cost=1, route="/x"))
        refused = limiter.acquire(tenants[key], 2000, quota=quota)  # over the burst: no count
        assert not refused.allowed
        emitter.emit(decision_event(tenants[key], refused, meter=meter, cost=2000, route="/x"))
    # The tenant's own usage on the limiter's default meter: billed, never in its daily count.
    emitter.emit(usage_event(tenants["a"], "requests", 500))
    assert emitter.flush(30)
    emitter.close()
    sink = make_sink(clickhouse_client, clickhouse_db, topic)
    asyncio.run(run_until_caught_up(sink, kafka_bootstrap, f"g-{topic}", dlq))
    Backfill(clickhouse_client, clickhouse_db, store, lateness_seconds=3600).run_once()
    day = dt.datetime.now(dt.UTC).date()
    yield {
        "client": client,
        "store": store,
        "tenants": tenants,
        "day": day,
        "db_url": db_url,
        "redis_url": redis_url,
    }
    for t in tenants.values():
        client.delete(reconcile.day_key(t, day), f"rl:{{{t}}}:tb")
    limiter.close()
    client.close()


def rows_for(pipeline, clickhouse_client, clickhouse_db) -> dict[str, reconcile.ReconcileRow]:
    day = pipeline["day"]
    rows = reconcile.compare(
        reconcile.redis_daily_counters(pipeline["client"], day),
        reconcile.clickhouse_daily_totals(clickhouse_client, clickhouse_db, day, "requests"),
        pipeline["store"].daily_usage_for_day(day),
    )
    mine = set(pipeline["tenants"].values())
    return {r.tenant: r for r in rows if r.tenant in mine}


def test_the_three_sources_agree_after_the_pipeline_ran(
    pipeline, clickhouse_client, clickhouse_db
) -> None:
    rows = rows_for(pipeline, clickhouse_client, clickhouse_db)
    for key, n in ALLOWED.items():
        row = rows[pipeline["tenants"][key]]
        assert (row.redis, row.clickhouse, row.quota_db) == (n, n, n)
        assert row.agrees and row.drift == {}


def test_a_drift_introduced_in_redis_and_in_the_quota_db_is_found(
    pipeline, clickhouse_client, clickhouse_db
) -> None:
    a, b = pipeline["tenants"]["a"], pipeline["tenants"]["b"]
    pipeline["client"].incrby(reconcile.day_key(a, pipeline["day"]), 2)  # a counter ran ahead
    with pipeline["store"].engine.begin() as db:  # a backfill that fell behind
        db.execute(
            update(DailyUsageRow)
            .where(DailyUsageRow.tenant == b, DailyUsageRow.day == pipeline["day"])
            .values(used=1)
        )
    rows = rows_for(pipeline, clickhouse_client, clickhouse_db)
    assert rows[a].drift == {"redis": 2}
    assert rows[b].drift == {"quota_db": -2}
    report = reconcile.format_report(rows.values(), pipeline["day"])
    assert "2 tenants, 2 with drift" in report


def test_the_cli_reports_drift_with_exit_code_1_and_none_with_0(
    pipeline, clickhouse_client, clickhouse_db, clickhouse_url, monkeypatch, capsys
) -> None:
    from metering.cli import main
    from metering.settings import get_settings

    adopt_embedded_client(clickhouse_url, clickhouse_client)
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_url)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", clickhouse_db)
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", pipeline["redis_url"])
    monkeypatch.setenv("QUOTA_DB_URL", pipeline["db_url"])
    get_settings.cache_clear()
    try:
        assert main(["reconcile", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {
            t["tenant"]: (t["redis"], t["clickhouse"], t["quota_db"]) for t in out["tenants"]
        } == {pipeline["tenants"][k]: (n, n, n) for k, n in ALLOWED.items()}
        a = pipeline["tenants"]["a"]
        pipeline["client"].incrby(reconcile.day_key(a, pipeline["day"]), 1)
        assert main(["reconcile"]) == 1
        text = capsys.readouterr().out
        assert f"{a}" in text and "DRIFT redis +1" in text
    finally:
        get_settings.cache_clear()


async def test_the_api_route_answers_admins_with_the_same_rows_and_refuses_tenants(
    pipeline, clickhouse_client, clickhouse_db, kafka_bootstrap, tmp_path: Path
) -> None:
    from tests.integration.api_support import admin, api_client, api_settings, auth

    settings = api_settings(
        tmp_path / "api",
        pipeline["redis_url"],
        kafka_bootstrap,
        quota_db_url=pipeline["db_url"],
        clickhouse_database=clickhouse_db,
    )
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        # (a refused request still passes the rate limiter and counts for its tenant, so the
        # refusal is checked with a tenant outside this test's day)
        refused = await client.get("/v1/admin/reconcile", headers=auth(f"other-{uuid.uuid4().hex}"))
        assert refused.status_code == 403
        assert refused.headers["content-type"].startswith("application/problem+json")
        bad = await client.get("/v1/admin/reconcile", params={"day": "yesterday"}, headers=admin())
        assert bad.status_code == 422
        r = await client.get("/v1/admin/reconcile", headers=admin())
        assert r.status_code == 200
        body = r.json()
        got = {
            t["tenant"]: (t["redis"], t["clickhouse"], t["quota_db"], t["agrees"])
            for t in body["tenants"]
            if t["tenant"] in set(pipeline["tenants"].values())
        }
        assert got == {pipeline["tenants"][k]: (n, n, n, True) for k, n in ALLOWED.items()}
        # The operator's own calls are not metered, so reconciling adds no drift of its own.
        again = (await client.get("/v1/admin/reconcile", headers=admin())).json()
        assert again["tenants"] == body["tenants"]
        assert "ratelimit" not in {k.lower() for k in r.headers}


def test_a_fractional_total_copied_exactly_is_not_drift(
    clickhouse_client, clickhouse_db, tmp_path: Path
) -> None:
    """ClickHouse's total and the quota DB's are rounded the same way (up), so 2.5 and 2.5
    agree (ClickHouse's used to be rounded to even: 2 against 3)."""
    from streams.sink import EVENT_COLUMNS

    migrate(clickhouse_client, clickhouse_db)
    db_url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(db_url)
    store = QuotaStore(db_url)
    tenant = f"rec-frac-{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    row = [uuid.uuid4().hex, "metering.ratelimit", "urn:t", tenant, "requests", "allowed", 1]
    row += [now, 2.5, {}]
    clickhouse_client.insert(
        f"{clickhouse_db}.usage_events", [[*row, "t", 0, 0]], column_names=EVENT_COLUMNS
    )
    Backfill(
        clickhouse_client, clickhouse_db, store, meter="requests", lateness_seconds=3600
    ).run_once(now)
    rows = reconcile.compare(
        {tenant: 3},  # the day counter in Redis counts whole units
        reconcile.clickhouse_daily_totals(clickhouse_client, clickhouse_db, now.date(), "requests"),
        store.daily_usage_for_day(now.date()),
    )
    (mine,) = [r for r in rows if r.tenant == tenant]
    assert (mine.clickhouse, mine.quota_db) == (3, 3)
    assert mine.drift == {}


@pytest.fixture
def cli_env(clickhouse_client, clickhouse_url, tmp_path: Path, monkeypatch):  # type: ignore[no-untyped-def]
    """The reconcile command's settings on the session's engine and a fresh quota DB."""
    from metering.settings import get_settings

    adopt_embedded_client(clickhouse_url, clickhouse_client)
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_url)
    monkeypatch.setenv("QUOTA_DB_URL", f"sqlite:///{tmp_path / 'quota.db'}")
    for var in ("RATE_LIMIT_REDIS_CLUSTER_NODES", "RATE_LIMIT_REDIS_SENTINELS"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_cli_with_redis_down_says_so_in_one_line_without_the_password(
    cli_env, clickhouse_db, monkeypatch, capsys
) -> None:
    import socket

    from metering.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CLICKHOUSE_DATABASE", clickhouse_db)
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", f"redis://:s3cretpw@127.0.0.1:{port}/0")
    assert main(["reconcile"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"metering: Redis (RATE_LIMIT_REDIS_URL=redis://:***@127.0.0.1:{port}/0): "
    )
    assert "Connection refused" in err
    assert "s3cretpw" not in err and err.count("\n") == 1


def test_the_cli_on_an_unmigrated_clickhouse_says_to_migrate(
    cli_env, redis_url, clickhouse_url, monkeypatch, capsys
) -> None:
    from metering.cli import main

    monkeypatch.setenv("CLICKHOUSE_DATABASE", "never_migrated")
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", own_database(redis_url))
    assert main(["reconcile"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"metering: ClickHouse (CLICKHOUSE_URL={clickhouse_url}): Code: 81.")
    assert err.endswith("(UNKNOWN_DATABASE); run `metering db migrate`\n")


def test_the_cli_names_a_holder_of_the_engine_that_serves_no_api(
    clickhouse_client, clickhouse_url, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    if not clickhouse_url.startswith("chdb:"):
        pytest.skip("needs the embedded engine")
    # This process runs the engine on the session's folder: a second process cannot open it.
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "reconcile"],
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
    assert "Traceback" not in proc.stderr
    # It used to say "a running `metering up`" and ask port 8000, where nothing listened.
    assert proc.returncode == 1
    assert proc.stderr == (
        f"metering: the embedded ClickHouse is in use by another process (pid {os.getpid()}), "
        "which serves no API; stop it, or pass --api URL of a `metering up` or `metering api` "
        "that owns the folder\n"
    )  # and nothing of the engine's own error (it is not opened)


def test_the_cli_asks_the_api_that_holds_the_engine_at_its_own_port(
    redis_url: str, tmp_path: Path
) -> None:
    """`metering api` on a port of its own holds the embedded folder once it has answered a
    usage query: reconcile finds it by the folder's pid and asks it there, not at 8000."""
    import subprocess
    import sys

    import httpx

    from tests.integration.api_support import admin
    from tests.integration.test_api_server import api_environ, start_api, wait_until_serving

    env = {
        "CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}",
        "QUOTA_DB_URL": f"sqlite:///{tmp_path / 'quota.db'}",
        "METERING_DATA_DIR": str(tmp_path),
        "RATE_LIMIT_REDIS_URL": own_database(redis_url),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # not needed: events wait in the spool
    }
    subprocess.run(  # in a process of its own: this one runs the session's engine
        [sys.executable, "-m", "metering.cli", "db", "migrate"],
        env=api_environ(env),
        check=True,
        capture_output=True,
        timeout=120,
    )
    # The API's measure, which this shell does not set: the report says what the API compared.
    api, url = start_api({**env, "WORKER_BACKFILL_MEASURE": "meter"})
    try:
        wait_until_serving(url, api)
        r = httpx.get(f"{url}/v1/admin/reconcile", headers=admin(), timeout=60)
        assert r.status_code == 200, r.text  # the API has opened the engine now
        proc = subprocess.run(
            [sys.executable, "-m", "metering.cli", "reconcile", "--json"],
            env=api_environ(env),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        api.terminate()
        api.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        f"metering reconcile: the embedded ClickHouse is in use by `metering api` "
        f"(pid {api.pid}); asking it at {url}\n"
    )
    assert json.loads(proc.stdout) == {
        "day": dt.datetime.now(dt.UTC).date().isoformat(),
        "measure": "meter",
        "meter": "requests",
        "tenants": [],
    }


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_the_counters_are_read_page_by_page_in_pipelined_round_trips(
    redis_url: str, topology: str, request: pytest.FixtureRequest
) -> None:
    """2,500 tenants' counters (more than one read's worth), on a single node and spread over a
    Cluster's masters: each read once, sync and async, and another day's key is left out.
    (The scale audit's reconcile read them one GET per round trip.)"""
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import ClusterNode, RedisCluster

    day = dt.date(2031, 5, 17)  # a day no other test counts in
    prefix = f"rc-{uuid.uuid4().hex[:8]}"
    want = {f"{prefix}-{i}": i + 1 for i in range(2500)}
    if topology == "single":
        client: Any = redis.Redis.from_url(redis_url)
        aclient: Any = aredis.Redis.from_url(redis_url)
    else:
        nodes = request.getfixturevalue("redis_cluster_nodes")
        hosts = [n.rsplit(":", 1) for n in nodes.split(",")]
        client = RedisCluster(startup_nodes=[ClusterNode(h, int(p)) for h, p in hosts])
        aclient = AsyncRedisCluster(
            startup_nodes=[aredis.cluster.ClusterNode(h, int(p)) for h, p in hosts]
        )
    keys = [reconcile.day_key(t, day) for t in want]
    other_day = reconcile.day_key(f"{prefix}-x", day + dt.timedelta(days=1))
    try:
        pipe = client.pipeline(transaction=False)
        for used, key in zip(want.values(), keys, strict=True):
            pipe.set(key, used, ex=600)
        pipe.set(other_day, 5, ex=600)
        pipe.execute()

        got = reconcile.redis_daily_counters(client, day)
        agot = await reconcile.aredis_daily_counters(aclient, day)
        mine = {t: v for t, v in got.items() if t.startswith(prefix)}
        assert mine == want
        assert {t: v for t, v in agot.items() if t.startswith(prefix)} == want
    finally:
        pipe = client.pipeline(transaction=False)
        for key in [*keys, other_day]:
            pipe.delete(key)
        pipe.execute()
        client.close()
        await aclient.aclose()

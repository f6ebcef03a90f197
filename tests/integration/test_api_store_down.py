"""A store the API depends on fails: every endpoint answers, none with a 500.

The request is fine and the service cannot serve it now, so an endpoint whose store (the quota
DB, ClickHouse) is down, unreachable or not migrated answers 503 with a problem naming the store
and a Retry-After, and tells the client nothing of the store's address or error text. Endpoints
that do not need the failed store go on answering. A Redis that takes no command on the
configured database is answered by the limiter's fail mode, and refused at start-up."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from limiter.redis_factory import check_redis_setup
from metering.api import problems
from metering.settings import SettingsError, load_settings
from tests.integration.api_support import admin, api_client, api_settings, auth, problem
from tests.integration.test_api_isolation import requests_on

NOW = dt.datetime.now(dt.UTC)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_for(tmp_path: Path, redis_url: str, kafka_bootstrap: str, **over: Any) -> Any:
    """The API's settings on the real Redis and Kafka, the stores as ``over`` names them (the
    quota DB is not migrated here: it may be down)."""
    return api_settings(
        tmp_path, redis_url, kafka_bootstrap, topics=True, migrate_quota_db=False, **over
    )


def reconcile_call() -> tuple[str, str, dict[str, Any]]:
    return ("GET", "/v1/admin/reconcile", {"params": {"day": f"{NOW:%Y-%m-%d}"}})


def check_store_down(r: Any, store: str, secret_text: str) -> None:
    assert r.status_code == 503, (r.request.url, r.status_code, r.text[:300])
    body = problem(r)
    assert body["type"] == "urn:metering:problem:store-unavailable"
    assert body["store"] == store
    assert store in body["detail"]
    assert secret_text not in r.text  # nothing of the store's address reaches the client
    assert r.headers["retry-after"] == "5"


QUOTA_DB_ENDPOINTS = {"/v1/tenants/{t}/quota"}
CLICKHOUSE_ENDPOINTS = {"/v1/usage", "/v1/usage/sliding", "/v1/billing", "/v1/usage/top"}


def kind(url: str, tenant: str) -> str:
    if url.startswith("/v1/billing/"):
        return "/v1/billing"
    return url.replace(tenant, "{t}")


@pytest.mark.parametrize("how", ["unreachable", "not migrated"])
async def test_the_quota_db_failing_is_a_503_naming_it_on_its_endpoints(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str, clickhouse_client: Any, how: str
) -> None:
    port = dead_port()
    url = (
        f"postgresql://metering:hunter2@127.0.0.1:{port}/metering"
        if how == "unreachable"
        else f"sqlite:///{tmp_path / 'never-migrated.db'}"
    )
    settings = settings_for(tmp_path, redis_url, kafka_bootstrap, quota_db_url=url)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    seen = set()
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        for method, path, kwargs in [*requests_on(tenant), reconcile_call()]:
            r = await client.request(method, path, headers=admin(), **kwargs)
            assert r.status_code != 500, (method, path, r.text[:300])
            if kind(path, tenant) in QUOTA_DB_ENDPOINTS:
                check_store_down(r, "the quota DB", str(port) if how == "unreachable" else "sqlite")
                seen.add((method, path))
        # A tenant's own read of its quota gets the same answer as an admin's.
        r = await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
        check_store_down(r, "the quota DB", "hunter2")
    assert len(seen) == 2  # GET and PUT


async def test_clickhouse_unreachable_is_a_503_naming_it_on_the_usage_endpoints(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str
) -> None:
    port = dead_port()
    settings = settings_for(
        tmp_path,
        redis_url,
        kafka_bootstrap,
        quota_db_url=f"sqlite:///{tmp_path / 'quota.db'}",
        clickhouse_url=f"http://metering:hunter2@127.0.0.1:{port}",
    )
    from metering.quota_db import migrate

    migrate(settings.quota_db_url)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    answered: dict[str, int] = {}
    async with api_client(settings) as client:
        for method, path, kwargs in [*requests_on(tenant), reconcile_call()]:
            r = await client.request(method, path, headers=admin(), **kwargs)
            answered[f"{method} {kind(path, tenant)}"] = r.status_code
            assert r.status_code != 500, (method, path, r.text[:300])
            if kind(path, tenant) in CLICKHOUSE_ENDPOINTS or path == "/v1/admin/reconcile":
                check_store_down(r, "ClickHouse", str(port))
    # The endpoints that do not read ClickHouse still serve.
    assert answered["GET /v1/tenants/{t}/quota"] == 200
    assert answered["PUT /v1/tenants/{t}/quota"] == 200
    assert answered["GET /v1/limits/{t}"] == 200
    assert answered["POST /v1/events"] == 202


async def test_a_redis_database_the_server_lacks_fails_open_not_500(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str
) -> None:
    """``redis://host/99`` on a server with 16 databases: every new connection's SELECT is
    refused. The limiter answers as for a Redis that is down (fail open by default), and the
    start-up check refuses the setting, naming it."""
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    settings = settings_for(
        tmp_path,
        f"{base}/99",
        kafka_bootstrap,
        quota_db_url=f"sqlite:///{tmp_path / 'quota.db'}",
    )
    from metering.quota_db import migrate

    migrate(settings.quota_db_url)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    async with api_client(settings) as client:
        r = await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
    assert r.status_code == 200, r.text[:300]
    assert r.headers.get("ratelimit-policy")  # decided by the fail mode, fields still set

    with pytest.raises(SettingsError, match=r"RATE_LIMIT_REDIS_URL: .*DB index is out of range"):
        check_redis_setup(settings)


def test_the_start_up_check_passes_a_good_redis_and_only_warns_of_an_absent_one(
    tmp_path: Path, redis_url: str
) -> None:
    good = load_settings(metering_data_dir=tmp_path, rate_limit_redis_url=redis_url)
    assert check_redis_setup(good) is None
    absent = load_settings(
        metering_data_dir=tmp_path, rate_limit_redis_url=f"redis://127.0.0.1:{dead_port()}/0"
    )
    warning = check_redis_setup(absent, timeout=0.5)
    assert warning is not None
    assert warning.startswith("RATE_LIMIT_REDIS_URL: Redis not reachable at start")


async def test_a_hung_clickhouse_server_is_a_503_within_the_query_timeout(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str
) -> None:
    """A ClickHouse server that takes the connection and never answers (a listening socket no
    one reads). clickhouse-connect waits 300 s by default; an API request held that long, with
    a thread of the pool. CLICKHOUSE_QUERY_TIMEOUT bounds it: a 503 naming ClickHouse."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]
        settings = settings_for(
            tmp_path,
            redis_url,
            kafka_bootstrap,
            quota_db_url=f"sqlite:///{tmp_path / 'quota.db'}",
            clickhouse_url=f"http://127.0.0.1:{port}",
            clickhouse_query_timeout=1,
        )
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        params: dict[str, str | int] = {"meter": "tokens", "minutes": 5}
        async with api_client(settings) as client:
            # A harness deadline, not an asserted speed: only the configured 1 s timeout
            # answers before it (clickhouse-connect's own default would hold the call 300 s).
            try:
                r = await asyncio.wait_for(
                    client.get("/v1/usage/sliding", params=params, headers=auth(tenant)), 60
                )
            except TimeoutError:
                pytest.fail("no answer within 60 s: CLICKHOUSE_QUERY_TIMEOUT was not applied")
    check_store_down(r, "ClickHouse", str(port))


async def test_readiness_and_live_limits_name_the_failed_store_but_never_its_address(
    tmp_path: Path,
    kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/readyz needs no credentials: it names each failed check and the kind of failure, not the
    address or the driver's text. /v1/limits with Redis down is a 503 with Retry-After, likewise
    without the address. The operator's log names the setting of the app's own settings (not
    the environment's), password masked."""
    redis_port, db_port = dead_port(), dead_port()
    settings = settings_for(
        tmp_path,
        f"redis://:sesame@127.0.0.1:{redis_port}/0",
        kafka_bootstrap,
        quota_db_url=f"postgresql://metering:hunter2@127.0.0.1:{db_port}/metering",
    )
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(problems, "_store_logged_at", {})  # no line held back by the throttle
    caplog.set_level("WARNING", logger="metering.api.problems")
    async with api_client(settings) as client:
        ready = await client.get("/readyz")
        limits = await client.get(f"/v1/limits/{tenant}", headers=auth(tenant))
    assert ready.status_code == 503  # the quota DB failed; Redis alone would be degraded
    checks = problem(ready)["checks"]
    assert settings.rate_limit_fail_mode == "open"
    assert checks["redis"].startswith("degraded: ") and checks["quota_db"].startswith("failed: ")
    assert problem(ready)["detail"] == "not ready: quota_db"
    assert limits.status_code == 503, limits.text[:300]
    assert problem(limits)["type"] == "urn:metering:problem:redis-down"
    assert limits.headers["retry-after"] == "5"
    for r in (ready, limits):
        for secret in (str(redis_port), str(db_port), "sesame", "hunter2", "127.0.0.1"):
            assert secret not in r.text, (r.request.url, secret, r.text[:300])
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert f"RATE_LIMIT_REDIS_URL=redis://:***@127.0.0.1:{redis_port}/0" in logged
    assert "sesame" not in logged and "hunter2" not in logged

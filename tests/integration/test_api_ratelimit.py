"""The API's request path on real Redis and Kafka: tokens, limits, headers, shadow mode,
exemptions, and quota changes taking effect at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import REGISTRY

import limiter.clock
import limiter.middleware
from limiter.keys import window_log_key, window_meta_key
from metering import reconcile
from metering.localstack import LocalStack
from tests.conftest import seconds_to_utc_midnight
from tests.integration.api_support import (
    AUDIENCE,
    admin,
    api_client,
    api_settings,
    auth,
    make_token,
    problem,
    put_quota,
    read_events,
)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, kafka_bootstrap: str):  # type: ignore[no-untyped-def]
    return api_settings(tmp_path, redis_url, kafka_bootstrap, topics=True)


# --- authentication ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token_kwargs", "reason"),
    [
        ({"ttl": -60}, "expired"),
        ({"key": "some-other-secret-0123456789abcdef"}, "signature"),
        ({"aud": "another-api"}, "audience"),
    ],
)
async def test_bad_tokens_get_401(settings, tenant: str, token_kwargs: dict, reason: str) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {make_token(tenant, **token_kwargs)}"}
    async with api_client(settings) as client:
        r = await client.get(f"/v1/tenants/{tenant}/quota", headers=headers)
        body = problem(r)
    assert r.status_code == 401
    assert reason in body["detail"]


async def test_a_spoofed_tenant_header_is_ignored(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    victim = f"{tenant}-victim"
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=100, burst=50, daily_limit=1000)
        await put_quota(client, victim, rate_per_sec=100, burst=50, daily_limit=1000)
        spoof = {**auth(tenant), "X-Tenant-Id": victim, "Tenant-Id": victim, "X-Tenant": victim}
        for _ in range(3):
            r = await client.get(f"/v1/tenants/{tenant}/quota", headers=spoof)
            assert r.status_code == 200
        # Reading another tenant with the header set is still refused.
        r = await client.get(f"/v1/tenants/{victim}/quota", headers=spoof)
        assert r.status_code == 403
        mine = (await client.get(f"/v1/limits/{tenant}", headers=admin())).json()
        theirs = (await client.get(f"/v1/limits/{victim}", headers=admin())).json()
    assert mine["daily"]["used"] == 4  # 3 reads + the refused one, all counted as ours
    assert theirs["daily"]["used"] == 0


# --- limits and fields ---------------------------------------------------------------------------
async def test_429_arrives_exactly_when_the_bucket_is_empty(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=0.5, burst=5, daily_limit=1000)
        responses = [
            await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant)) for _ in range(7)
        ]
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 5 + [429] * 2
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == [
        "4", "3", "2", "1", "0", "0", "0"
    ]  # fmt: skip
    assert {r.headers["x-ratelimit-limit"] for r in responses} == {"5"}
    assert responses[0].headers["ratelimit-policy"] == '"burst";q=5;w=10, "daily";q=1000;w=86400'
    assert responses[0].headers["ratelimit"].startswith('"burst";r=4;t=2, "daily";r=999;t=')
    rejected = responses[5]
    body = problem(rejected)
    assert body["type"].endswith("rate-limited")
    # One token at 0.5/s: a little under 2 s away, so Retry-After is 2.
    assert rejected.headers["retry-after"] == "2"
    assert rejected.headers["ratelimit"].startswith('"burst";r=0;')


async def test_daily_limit_gives_429_until_the_utc_day_ends(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=100, burst=100, daily_limit=3)
        responses = [
            await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant)) for _ in range(5)
        ]
        now = dt.datetime.now(dt.UTC)
        live = (await client.get(f"/v1/limits/{tenant}", headers=admin())).json()
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    rejected = responses[3]
    assert rejected.headers["x-ratelimit-limit"] == "3"
    assert rejected.headers["x-ratelimit-remaining"] == "0"
    to_midnight = seconds_to_utc_midnight(now.timestamp())
    assert abs(int(rejected.headers["retry-after"]) - to_midnight) <= 5
    assert abs(int(rejected.headers["x-ratelimit-reset"]) - (now.timestamp() + to_midnight)) <= 5
    assert '"daily";r=0;' in rejected.headers["ratelimit"]
    # The limiter's own counter agrees with what the headers said: 3 used, none more.
    assert live["daily"]["used"] == 3
    assert live["daily"]["remaining"] == 0


async def test_fields_match_the_limiters_live_state(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=0.01, burst=20, daily_limit=500)
        for _ in range(6):
            last = await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
        live = (await client.get(f"/v1/limits/{tenant}", headers=admin())).json()
    assert last.headers["x-ratelimit-remaining"] == "14"
    assert '"daily";r=494;' in last.headers["ratelimit"]
    assert live["daily"]["used"] == 6
    assert math.floor(live["bucket"]["tokens"]) == 14


async def test_the_live_window_leaves_out_what_has_left_it(  # type: ignore[no-untyped-def]
    settings, redis_url: str, tenant: str
) -> None:
    """GET /v1/limits reports the rolling window's units now, not the stored sum, which only
    the next acquire prunes of the entries that have aged out."""
    r = redis.Redis.from_url(redis_url)
    log_key = window_log_key(tenant)
    async with api_client(settings) as client:
        await put_quota(
            client,
            tenant,
            rate_per_sec=100,
            burst=50,
            daily_limit=1000,
            window_limit=100,
            window_seconds=60,
        )
        for _ in range(5):
            assert (
                await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
            ).is_success
        live = (await client.get(f"/v1/limits/{tenant}", headers=admin())).json()
        assert live["window"] == {"limit": 100, "seconds": 60, "used": 5}
        # Three of the five age out of the window (as if 61 s had passed for them).
        for member, score in r.zrange(log_key, 0, 2, withscores=True):
            r.zadd(log_key, {member: score - 61_000_000})
        live = (await client.get(f"/v1/limits/{tenant}", headers=admin())).json()
        assert live["window"]["used"] == 2
        assert r.hget(window_meta_key(tenant), "sum") == b"5"  # nothing pruned by reading
        # The limiter's next decision agrees: 2 in the window, and its own unit.
        assert (await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))).is_success
    assert r.hget(window_meta_key(tenant), "sum") == b"3"


async def test_shadow_mode_never_blocks_but_counts(
    tmp_path: Path, redis_url, kafka_bootstrap, tenant: str
) -> None:  # type: ignore[no-untyped-def]
    settings = api_settings(
        tmp_path, redis_url, kafka_bootstrap, topics=True, rate_limit_shadow_mode=True
    )
    rejections = REGISTRY.get_sample_value("rate_limiter_rejections_total", {"reason": "bucket"})
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=0.01, burst=2, daily_limit=1000)
        statuses = [
            (await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))).status_code
            for _ in range(5)
        ]
        live = (await client.get(f"/v1/limits/{tenant}", headers=admin())).json()
    assert statuses == [200] * 5
    assert live["daily"]["used"] == 2  # only what the limiter allowed was counted
    after = REGISTRY.get_sample_value("rate_limiter_rejections_total", {"reason": "bucket"})
    assert (after or 0) - (rejections or 0) >= 3
    events = read_events(settings, expected=5, subject=tenant)
    assert sorted(e.data.decision or "" for e in events) == ["allowed"] * 2 + ["rejected"] * 3
    assert all(e.data.dimensions["shadow"] == "true" for e in events)


async def test_shadow_mode_passes_an_unknown_tenant_on_and_records_the_refusal(
    tmp_path: Path, redis_url, kafka_bootstrap, tenant: str
) -> None:  # type: ignore[no-untyped-def]
    """With QUOTA_UNKNOWN_TENANT=reject a tenant the quota DB does not know gets 403; shadow
    mode never blocks, so its requests reach the API and the refusal is a rejected decision
    event with reason ``unknown_tenant``."""
    settings = api_settings(
        tmp_path,
        redis_url,
        kafka_bootstrap,
        topics=True,
        rate_limit_shadow_mode=True,
        quota_unknown_tenant="reject",
    )
    async with api_client(settings) as client:
        responses = [
            await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant)) for _ in range(2)
        ]
    assert [r.status_code for r in responses] == [200] * 2, responses[0].text
    events = read_events(settings, expected=2, subject=tenant)
    assert [(e.data.decision, e.data.dimensions["reason"]) for e in events] == [
        ("rejected", "unknown_tenant")
    ] * 2
    assert all(e.data.dimensions["shadow"] == "true" for e in events)


async def test_exempt_paths_are_never_limited(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=0.01, burst=1, daily_limit=1)
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            for _ in range(3):
                r = await client.get(path, headers=auth(tenant))
                assert r.status_code == 200, (path, r.text[:200])
                assert "ratelimit" not in r.headers
        live = (await client.get(f"/v1/limits/{tenant}", headers=admin())).json()
    assert live["daily"]["used"] == 0


async def test_every_decision_becomes_a_usage_event(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=0.01, burst=2, daily_limit=1000)
        for _ in range(3):
            await client.get(f"/v1/limits/{tenant}", headers=auth(tenant))
    events = read_events(settings, expected=3, subject=tenant)
    assert [(e.type, e.data.meter, e.data.quantity) for e in events] == [
        ("metering.ratelimit", "requests", 1.0)
    ] * 3
    assert [e.data.decision for e in events] == ["allowed", "allowed", "rejected"]
    assert {e.data.dimensions["route"] for e in events} == {"/v1/limits/{tenant}"}
    assert [e.billable for e in events] == [True, True, False]


async def test_requests_cancelled_at_shutdown_still_have_their_decisions_emitted(
    tmp_path: Path, kafka_bootstrap: str, dedicated_stack: LocalStack, tenant: str
) -> None:
    """uvicorn's graceful-shutdown timeout cancels the requests in flight and at once runs the
    lifespan's shutdown, which closes the emitter first. The decisions Redis makes for those
    requests arrive after that (here Redis holds them back 300 ms, ``CLIENT PAUSE``); the review
    found every one of them dropped by the closing emitter. Now the shutdown drains the limiter
    first: Redis counts the cancelled requests' decisions and each is emitted. (Before, with
    this pause, the shutdown closed the Redis connection before Redis ran the calls, so none
    was counted; the order itself is checked by the next test.)"""
    from metering.api.app import create_app

    redis_url = dedicated_stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
    settings = api_settings(
        tmp_path, redis_url, kafka_bootstrap, topics=True, rate_limit_redis_socket_timeout=5.0
    )
    raw = redis.Redis.from_url(redis_url)
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    batcher = app.state.context.limiter._batcher
    headers = auth(tenant)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        await client.get(f"/v1/limits/{tenant}", headers=headers)  # quota cached, scripts loaded
        raw.execute_command("CLIENT", "PAUSE", 300, "ALL")
        tasks = [
            asyncio.create_task(client.get(f"/v1/limits/{tenant}", headers=headers))
            for _ in range(32)
        ]
        for _ in range(500):  # until the calls are written and await their replies
            if batcher._inflight:
                break
            await asyncio.sleep(0)
        assert batcher._inflight
        for t in tasks:
            t.cancel()
        await lifespan.__aexit__(None, None, None)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert not any(isinstance(r, httpx.Response) for r in results)  # all cancelled in flight
    counted = int(raw.get(reconcile.day_key(tenant, dt.datetime.now(dt.UTC).date())) or 0)
    assert counted > 1  # the warm-up's and the cancelled requests' decisions
    events = read_events(settings, expected=counted, subject=tenant)
    assert len([e for e in events if e.data.decision == "allowed"]) == counted
    assert len({e.id for e in events}) == len(events)


async def test_the_shutdown_drains_the_limiter_before_it_closes_the_emitter(
    settings,  # type: ignore[no-untyped-def]
) -> None:
    from metering.api.app import create_app

    app = create_app(settings)
    context = app.state.context
    real_drain = context.limiter.drain
    emitter_open: list[bool] = []

    async def drain(timeout: float) -> bool:
        emitter_open.append(not context.emitter._closing)
        return await real_drain(timeout)

    context.limiter.drain = drain
    async with app.router.lifespan_context(app):
        pass
    assert emitter_open == [True]
    assert context.emitter._closing  # closed after


class _SkewedTime:
    """The ``time`` module as a host whose clock is ``skew`` seconds ahead of Redis's."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def time_ns(self) -> int:
        return time.time_ns() + int(self.skew * 1e9)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("past_midnight", [False, True])
async def test_a_skewed_host_clock_moves_no_decision_to_another_day(  # type: ignore[no-untyped-def]
    settings, redis_url: str, tenant: str, monkeypatch: pytest.MonkeyPatch, past_midnight: bool
) -> None:
    """The Redis server's clock is the clock of record: a request counted on its UTC day is on
    that day in the pipeline too (ClickHouse, the Faust tables, the backfill go by the event's
    time), however far the API host's clock is off; a host known off by more than a second
    stamps its events by the server's clock."""
    r = redis.Redis.from_url(redis_url)
    seconds, micros = r.time()
    server_now = seconds + micros / 1e6
    midnight = (int(server_now) // 86400 + 1) * 86400
    # The host is ahead: past Redis's next midnight, or by 3 s (unless that crosses it too).
    skew = midnight - server_now + 0.25 if past_midnight else 3.0
    monkeypatch.setattr(limiter.clock, "time", _SkewedTime(skew))
    monkeypatch.setattr(limiter.middleware, "time", _SkewedTime(skew))
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=100, burst=50, daily_limit=1000)
        for _ in range(3):
            assert (
                await client.get(f"/v1/limits/{tenant}", headers=auth(tenant))
            ).status_code == 200
    seconds, micros = r.time()
    server_after = seconds + micros / 1e6
    counted = {k.decode() for k in r.scan_iter(match=f"rl:{{{tenant}}}:day:*")}
    events = read_events(settings, expected=3, subject=tenant)
    server_days = {
        dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y%m%d") for t in (server_now, server_after)
    }
    assert len(events) == 3
    for e in events:
        assert f"rl:{{{tenant}}}:day:{e.time:%Y%m%d}" in counted
        assert e.time.strftime("%Y%m%d") in server_days
        if not past_midnight and len(server_days) == 1:  # stamped by the server's clock
            assert server_now - 1.5 <= e.time.timestamp() <= server_after + 1.5


async def test_route_costs_come_from_the_settings(
    tmp_path: Path, redis_url, kafka_bootstrap, tenant: str
) -> None:  # type: ignore[no-untyped-def]
    settings = api_settings(
        tmp_path,
        redis_url,
        kafka_bootstrap,
        rate_limit_route_costs={"GET /v1/limits/{tenant}": 4},
    )
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=0.01, burst=10, daily_limit=1000)
        r = await client.get(f"/v1/limits/{tenant}", headers=auth(tenant))
    assert r.headers["x-ratelimit-remaining"] == "6"
    assert r.json()["daily"]["used"] == 4


async def test_a_route_costing_more_than_the_burst_is_429_without_retry_after(
    tmp_path: Path, redis_url, kafka_bootstrap, tenant: str
) -> None:  # type: ignore[no-untyped-def]
    """A request costing more than the tenant's burst can never be allowed: no Retry-After
    (waiting never helps), and the detail says the cost can never fit the tenant's limit."""
    settings = api_settings(
        tmp_path,
        redis_url,
        kafka_bootstrap,
        rate_limit_route_costs={"GET /v1/limits/{tenant}": 5},
    )
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=10, burst=3, daily_limit=1000)
        responses = [
            await client.get(f"/v1/limits/{tenant}", headers=auth(tenant)) for _ in range(2)
        ]
    for r in responses:
        assert r.status_code == 429
        assert "retry-after" not in r.headers
        body = problem(r)
        assert body["type"] == "urn:metering:problem:cost-exceeds-limit"
        assert "costs 5" in body["detail"] and "burst of 3" in body["detail"]
        assert "can never" in body["detail"]
        assert r.headers["x-ratelimit-limit"] == "3"


# --- quotas --------------------------------------------------------------------------------------
async def test_quota_changes_need_admin(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    body = {"rate_per_sec": 1000, "burst": 1000, "daily_limit": 10**9}
    async with api_client(settings) as client:
        r = await client.put(f"/v1/tenants/{tenant}/quota", json=body, headers=auth(tenant))
        assert r.status_code == 403
        assert "metering:admin" in problem(r)["detail"]
        r = await client.put(f"/v1/tenants/{tenant}/quota", json=body, headers=admin())
        assert r.status_code == 200
        assert r.json()["version"] == 1


async def test_a_quota_change_applies_in_another_process_without_waiting_for_the_ttl(
    settings, tenant: str
) -> None:  # type: ignore[no-untyped-def]
    """Two apps stand for two API processes: the change made through one is enforced by the
    other at once (pub/sub invalidation; the cache TTLs here are 60 s)."""
    async with api_client(settings) as first, api_client(settings) as second:
        await put_quota(first, tenant, rate_per_sec=100, burst=50, daily_limit=1000)
        r = await second.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
        assert r.headers["x-ratelimit-limit"] == "50"  # the second app now caches burst 50
        await put_quota(first, tenant, rate_per_sec=100, burst=50, daily_limit=2)
        statuses = []
        for _ in range(3):
            r = await second.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
            statuses.append(r.status_code)
    # 1 used before the change; with daily_limit 2 only one more is allowed.
    assert statuses == [200, 429, 429]
    assert r.headers["x-ratelimit-limit"] == "2"


async def test_the_audience_is_required_when_configured(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    assert settings.jwt_audience == AUDIENCE
    no_aud = make_token(tenant)
    import jwt

    claims = jwt.decode(no_aud, options={"verify_signature": False})
    claims.pop("aud")
    token = jwt.encode(claims, "integration-secret-0123456789abcdef0123", algorithm="HS256")
    async with api_client(settings) as client:
        r = await client.get(
            f"/v1/tenants/{tenant}/quota", headers={"Authorization": f"Bearer {token}"}
        )
    assert r.status_code == 401


@pytest.mark.parametrize(("fail_mode", "status"), [("open", 200), ("closed", 503)])
async def test_with_redis_unreachable_the_fail_mode_decides(
    tmp_path: Path, kafka_bootstrap: str, tenant: str, fail_mode: str, status: int
) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    settings = api_settings(tmp_path, dead, kafka_bootstrap, rate_limit_fail_mode=fail_mode)
    async with api_client(settings) as client:
        responses = [
            await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant)) for _ in range(3)
        ]
        ready = await client.get("/readyz")
    assert [r.status_code for r in responses] == [status] * 3
    if status == 503:
        assert "Redis down" in problem(responses[0])["detail"]
        assert responses[0].headers["retry-after"].isdigit()
    # Readiness follows the fail mode: fail-open serves, so the instance stays in the load
    # balancer (Redis reported degraded); fail-closed refuses every request, so it is not ready.
    assert ready.status_code == status, ready.text
    if status == 200:
        body = ready.json()
        assert body["status"] == "degraded"
        assert body["checks"]["redis"].startswith("degraded: ")
        assert body["checks"]["quota_db"] == "ok"
    else:
        assert "redis" in problem(ready)["detail"]
        assert problem(ready)["checks"]["redis"].startswith("failed: ")
    assert dead.rsplit(":", 1)[1].split("/")[0] not in ready.text  # no address, either way


async def test_without_redis_the_fields_never_say_more_remain_than_the_limit(
    tmp_path: Path, kafka_bootstrap: str, tenant: str
) -> None:  # type: ignore[no-untyped-def]
    """Fail-open: the local ceiling (100 per second) lets the requests through and the fields
    describe the tenant's burst (the free plan's 10): what remains is at most those 10, in
    ``X-RateLimit-*`` and in ``RateLimit`` alike."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    settings = api_settings(
        tmp_path, dead, kafka_bootstrap, rate_limit_fail_mode="open", quota_default_plan="free"
    )
    async with api_client(settings) as client:
        responses = [
            await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant)) for _ in range(3)
        ]
    for r in responses:
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit"] == "10"
        assert r.headers["x-ratelimit-remaining"] == "10"
        assert '"burst";q=10;' in r.headers["ratelimit-policy"]
        assert r.headers["ratelimit"].startswith('"burst";r=10;')


async def test_the_api_logs_its_circuit_breaker_opening_once(
    tmp_path: Path, kafka_bootstrap: str, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    settings = api_settings(
        tmp_path, dead, kafka_bootstrap, rate_limit_breaker_failures=2, rate_limit_breaker_reset=60
    )
    caplog.set_level(logging.WARNING, logger="limiter.failure_policy")
    async with api_client(settings) as client:
        for _ in range(4):
            await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
    opened = [r.getMessage() for r in caplog.records if "circuit breaker open" in r.getMessage()]
    assert opened == ["Redis unavailable: circuit breaker open (was closed)"]


@pytest.mark.parametrize(("fail_mode", "status"), [("open", 200), ("closed", 503)])
async def test_a_limiter_key_of_another_type_gets_the_fail_mode_not_a_500(
    settings,
    redis_url: str,
    tenant: str,
    fail_mode: str,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # type: ignore[no-untyped-def]
    """Something else wrote a string where the tenant's token bucket (a hash) lives: every
    script call of that tenant gets WRONGTYPE until the key is deleted. Its requests are decided
    by the fail mode (they were each a 500), an error names the key, other tenants are decided
    by Redis, and the breaker stays closed (Redis is up)."""
    from limiter.keys import token_bucket_key

    raw = redis.Redis.from_url(redis_url)
    raw.set(token_bucket_key(tenant), "not a hash")
    other = f"{tenant}-other"
    settings = settings.model_copy(update={"rate_limit_fail_mode": fail_mode})
    try:
        with caplog.at_level(logging.ERROR, logger="limiter"):
            async with api_client(settings) as client:
                broken = [
                    await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
                    for _ in range(3)
                ]
                fine = await client.get(f"/v1/tenants/{other}/quota", headers=auth(other))
    finally:
        raw.delete(token_bucket_key(tenant))
        raw.close()
    assert [r.status_code for r in broken] == [status] * 3
    assert fine.status_code == 200 and fine.headers["x-ratelimit-remaining"] != ""
    errors = [r.getMessage() for r in caplog.records if "WRONGTYPE" in r.getMessage()]
    assert len(errors) == 1, errors  # once, not per request
    assert f"rl:{{{tenant}}}:" in errors[0] and f"fail-{fail_mode}" in errors[0]

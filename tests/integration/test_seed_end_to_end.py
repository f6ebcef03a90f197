"""The seed of a lost daily counter, end to end: requests through ``RateLimitMiddleware`` on
routes of three meters (``RATE_LIMIT_ROUTE_METERS``), their decisions through the real Emitter,
Kafka and the sink into ClickHouse, the backfill into the quota DB; then Redis loses the day's
counter, and the next requests are limited by what it had counted.

The last stop's audits found this broken: the backfill summed meter ``requests`` only, so with
routes on other meters a lost counter came back too low (40 more requests allowed on a limit of
60 after 50 used), and a tenant's own usage events on ``requests`` raised it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis
import redis.asyncio as aredis

from limiter import AsyncRateLimiter
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.middleware import RateLimitMiddleware
from limiter.quotas import QuotaCache
from metering.clickhouse.schema import migrate
from metering.emitter import Emitter
from metering.events import usage_event
from metering.quota_db import QuotaStore
from metering.quota_db import migrate as migrate_quota_db
from streams.backfill import Backfill
from tests.integration.limiter_support import server_day
from tests.integration.streams_support import unique_topics
from tests.integration.test_streams_sink import make_sink, run_until_caught_up

METERS = {"/search": "queries", "/export": "exports"}  # other paths: "requests"
DAILY_LIMIT = 60


async def test_a_lost_counter_is_seeded_with_the_decisions_of_every_meter(
    redis_url: str,
    kafka_bootstrap: str,
    clickhouse_client,  # type: ignore[no-untyped-def]
    clickhouse_db: str,
    tenant: str,
    tmp_path: Path,
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    store.set_quota(tenant, plan="custom", rate_per_sec=1000, burst=1000, daily_limit=DAILY_LIMIT)
    topic, dlq = unique_topics(kafka_bootstrap)
    emitter = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path / "spool")
    client = aredis.Redis.from_url(redis_url)

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():  # type: ignore[no-untyped-def]
        return {"type": "http.request", "body": b""}

    async def request(path: str) -> int:
        statuses: list[int] = []

        async def send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "method": "GET", "path": path, "state": {"tenant_id": tenant}}
        await middleware(scope, receive, send)
        return statuses[0]

    limiter = AsyncRateLimiter(client, QuotaCache(store))
    middleware = RateLimitMiddleware(app, limiter, emitter=emitter, meters=METERS)
    try:
        paths = ["/search", "/export", "/items"] * 16 + ["/search", "/search"]  # 50
        assert [await request(p) for p in paths] == [200] * 50
        # The tenant's own usage on the limiter's default meter: billed, never in its count.
        emitter.emit(usage_event(tenant, "requests", 500))
        assert emitter.flush(30)
        sink = make_sink(clickhouse_client, clickhouse_db, topic)
        await run_until_caught_up(sink, kafka_bootstrap, f"g-{topic}", dlq)
        Backfill(clickhouse_client, clickhouse_db, store, lateness_seconds=3600).run_once()
        raw = redis.Redis.from_url(redis_url)
        day = server_day(raw, token_bucket_key(tenant))
        assert store.daily_usage(tenant, day) == 50
        assert int(raw.get(daily_counter_key(tenant, day))) == 50

        raw.delete(daily_counter_key(tenant, day))  # Redis lost it (a restart, a failover)
        after = [await request(p) for p in ["/export", "/items", "/search"] * 5]
        assert after.count(200) == DAILY_LIMIT - 50  # then 429: the day is used up
        assert after == [200] * 10 + [429] * 5
        assert int(raw.get(daily_counter_key(tenant, day))) == DAILY_LIMIT
        raw.delete(daily_counter_key(tenant, day), token_bucket_key(tenant))
        raw.close()
    finally:
        await asyncio.to_thread(emitter.close)
        await client.aclose()

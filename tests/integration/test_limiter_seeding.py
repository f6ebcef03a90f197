"""The seeding protocol end to end, with the product's quota provider (limiter.quotas) over a
real quota DB: a day counter Redis lost is seeded from the backfilled usage, so losing Redis
does not hand a tenant a fresh day."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from limiter import AsyncRateLimiter, RateLimiter
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.quotas import QuotaCache
from metering.quota_db import QuotaStore, migrate
from tests.integration.limiter_support import server_day


@pytest.fixture
def store(tmp_path: Path) -> QuotaStore:
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate(url)
    return QuotaStore(url)


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_lost_day_counter_resumes_from_the_backfilled_usage(
    store: QuotaStore, redis_url: str, tenant: str, flavor: str
) -> None:
    raw = redis.Redis.from_url(redis_url)
    today = server_day(raw, token_bucket_key(tenant))
    store.set_quota(tenant, plan="custom", rate_per_sec=100, burst=100, daily_limit=50)
    store.upsert_daily_usage([(tenant, today, 47.2)])  # the worker's total: 48 after rounding up
    quotas = QuotaCache(store)
    if flavor == "sync":
        limiter = RateLimiter(redis.Redis.from_url(redis_url), quotas)
        decisions = [limiter.acquire(tenant) for _ in range(4)]
    else:
        client = aredis.Redis.from_url(redis_url)
        alimiter = AsyncRateLimiter(client, quotas)
        decisions = [await alimiter.acquire(tenant) for _ in range(4)]
        await client.aclose()

    assert [(d.allowed, d.daily_used) for d in decisions] == [
        (True, 49),
        (True, 50),
        (False, 50),
        (False, 50),
    ]
    assert decisions[-1].reason == "daily"
    assert int(raw.get(daily_counter_key(tenant, today))) == 50

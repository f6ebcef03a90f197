"""The seeding protocol end to end, with the product's quota provider (limiter.quotas) over a
real quota DB: a day counter Redis lost is seeded from the backfilled usage, so losing Redis
does not hand a tenant a fresh day."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.clock import epoch_day
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.quotas import QuotaCache
from limiter.scripts import NEED_SEED
from metering.quota_db import QuotaStore, migrate
from tests.integration.limiter_support import StaticQuotas, server_day


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


def answer_the_first_call_with(limiter: Any, reply: list[int]) -> None:
    """The limiter's first script call gets ``reply`` instead of going out; every later call
    goes to Redis. (Redis's clock cannot be set, so a reply from just before midnight is the
    only way to have midnight pass between two calls of one decision.)"""
    replies = [reply]
    if isinstance(limiter, RateLimiter):
        real_call = limiter._roundtrip

        def call(command: bytes) -> Any:
            return replies.pop() if replies else real_call(command)

        limiter._roundtrip = call  # type: ignore[method-assign]
    else:
        real_submit = limiter._batcher.submit

        async def submit(command: Any) -> Any:
            return replies.pop() if replies else await real_submit(command)

        limiter._batcher.submit = submit  # type: ignore[method-assign]


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_day_that_ends_during_the_seed_lookup_is_seeded_with_its_own_usage(
    redis_url: str, tenant: str, flavor: str
) -> None:
    """The first request of a day asks for the day's seed; midnight passes while the quota DB
    answers, so the call that brings the seed gets WRONG_DAY. The new day is seeded with its
    own backfilled usage, never with the usage of the day that just ended."""
    raw = redis.Redis.from_url(redis_url)
    today = server_day(raw, token_bucket_key(tenant))
    yesterday = today - dt.timedelta(days=1)
    quotas = StaticQuotas(
        {tenant: Quota(rate_per_sec=100, burst=100, daily_limit=1000)},
        {(tenant, yesterday): 900, (tenant, today): 5},
    )
    # acquire.lua's NEED_SEED for yesterday, answered at 23:59:59 of yesterday.
    last_second = epoch_day(today) * 86400 - 1
    need_seed = [NEED_SEED, 0, 0, 0, 0, 0, epoch_day(yesterday), last_second]
    client: Any = None
    if flavor == "sync":
        limiter: Any = RateLimiter(redis.Redis.from_url(redis_url), quotas)
        answer_the_first_call_with(limiter, need_seed)
        decision = limiter.acquire(tenant)
    else:
        client = aredis.Redis.from_url(redis_url)
        limiter = AsyncRateLimiter(client, quotas)
        answer_the_first_call_with(limiter, need_seed)
        decision = await limiter.acquire(tenant)
        await client.aclose()

    assert quotas.seed_calls == [(tenant, yesterday), (tenant, today)]
    assert (decision.allowed, decision.day, decision.daily_used) == (True, today, 6)
    assert int(raw.get(daily_counter_key(tenant, today))) == 6
    assert raw.get(daily_counter_key(tenant, yesterday)) is None

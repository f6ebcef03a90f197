"""The limiter after its Redis came back from a snapshot older than the counts (a crash of an
RDB-persisted server, a restore from a backup, a failover that lost the replication lag).

The day counter comes back lower than what was counted and what the quota DB's backfill holds
since. A missing counter was already seeded from the backfill; one that came back lower was
kept, and the tenant was allowed its day's units again (the audit: 1,600 allowed against a
daily limit of 1,000). The server answers ``NOSCRIPT`` after such a change (its script cache
is empty): the decision that sees it goes again carrying the tenant's seed, as does every
tenant's next decision, and the script raises a lower counter to the seed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.keys import daily_counter_key
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.localstack import LocalStack
from tests.integration.limiter_support import StaticQuotas, server_day, settings_for

QUOTA = Quota(rate_per_sec=10**6, burst=10**6, daily_limit=1000)


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_counter_restored_from_an_older_snapshot_is_raised_to_the_backfill(
    dedicated_stack: LocalStack, tenant: str, flavor: str
) -> None:
    """Two tenants, 300 units each in the snapshot, 900 counted and backfilled before the
    crash. After it, the first decision (which finds the scripts gone) and the other tenant's
    first decision (after the change was seen) each raise their counter to 900: each is
    allowed 100 more and then refused, as before the crash. The seed is asked once each."""
    url = dedicated_stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
    raw = redis.Redis.from_url(url)
    day = server_day(raw)
    tenants = [tenant, f"{tenant}-b"]
    provider = StaticQuotas(dict.fromkeys(tenants, QUOTA))
    s = settings_for("single", url=url)
    if flavor == "sync":
        limiter: Any = RateLimiter(redis_from_settings(s), provider)

        async def acquire(t: str) -> Any:
            return await asyncio.to_thread(limiter.acquire, t, 100)
    else:
        limiter = AsyncRateLimiter(async_redis_from_settings(s), provider)

        async def acquire(t: str) -> Any:
            return await limiter.acquire(t, 100)

    try:
        for t in tenants:
            counted = [await acquire(t) for _ in range(3)]
            assert [(d.allowed, d.degraded, d.daily_used) for d in counted] == [
                (True, False, 100 * (i + 1)) for i in range(3)
            ]
        raw.save()  # the snapshot: 300 counted for each
        for t in tenants:
            counted = [await acquire(t) for _ in range(6)]
            assert [d.daily_used for d in counted] == [100 * (i + 4) for i in range(6)]
            provider.seeds[(t, day)] = 900  # what the worker backfilled meanwhile
        seeds_asked = len(provider.seed_calls)  # each tenant's first decision of the day
        # A crash: SIGKILL, nothing saved; the server starts again from the snapshot.
        dedicated_stack.kill("redis", "redis")
        dedicated_stack.restart_member("redis", "redis")
        for t in tenants:
            assert int(raw.get(daily_counter_key(t, day))) == 300
        # Idle past the sync limiter's IDLE_CHECK_SECONDS: its kept connection, dead now, is
        # checked before use (a restart under load costs the decision that finds it dead).
        await asyncio.sleep(0.2)

        for t in tenants:
            after = [await acquire(t) for _ in range(3)]
            assert [(d.allowed, d.degraded, d.daily_used) for d in after] == [
                (True, False, 1000),
                (False, False, 1000),
                (False, False, 1000),
            ], (t, after)
            assert int(raw.get(daily_counter_key(t, day))) == 1000
        # Once each, not per decision.
        assert sorted(provider.seed_calls[seeds_asked:]) == sorted((t, day) for t in tenants)
    finally:
        raw.close()
        if flavor == "async":
            await limiter.redis.aclose()
        else:
            limiter.redis.close()

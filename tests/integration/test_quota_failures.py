"""When the quota's sources fail: a stopped database, a Redis that lost its counters.

Both use servers of their own (``dedicated_stack``): one is stopped, the other flushed.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import text

from limiter import RateLimiter
from limiter.quota_provider import UnknownTenant
from limiter.quotas import QuotaAdmin, QuotaCache, quota_cache_key
from metering.localstack import LocalStack
from metering.plans import plan_limits
from metering.quota_db import QuotaStore, make_engine, migrate
from tests.conftest import fresh_postgres_database


def stale_served() -> float:
    return REGISTRY.get_sample_value("tenant_quota_stale_served_total") or 0.0


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_with_the_database_stopped_the_limiter_keeps_deciding_with_the_cached_quota(
    dedicated_stack: LocalStack, r: redis.Redis, tenant: str
) -> None:
    url = dedicated_stack.up(["postgres"])["QUOTA_DB_URL"]
    migrate(url)
    store = QuotaStore(url)
    stranger = tenant + "-new"
    QuotaAdmin(store, r).set_quota(tenant, rate_per_sec=0.001, burst=3, daily_limit=500)
    lenient = QuotaCache(store, r, local_ttl=0.3, retry_interval=0.1, default_plan="free")
    strict = QuotaCache(store, r, local_ttl=0.3, retry_interval=0.1, unknown_tenant="reject")
    limiter, strict_limiter = RateLimiter(r, lenient), RateLimiter(r, strict)
    try:
        assert limiter.acquire(tenant).allowed  # quota now cached in memory (and in Redis)
        strict.get(tenant)

        dedicated_stack.down(["postgres"])
        r.delete(quota_cache_key(tenant))  # the Redis entry is gone too: only memory is left
        time.sleep(0.4)  # every cached entry has expired
        before = stale_served()

        second, third, fourth = (limiter.acquire(tenant) for _ in range(3))
        assert (second.allowed, third.allowed, fourth.allowed) == (True, True, False)
        assert fourth.reason == "bucket"
        assert fourth.limit == 3  # the tenant's own burst, not the default plan's
        assert fourth.daily_limit == 500
        assert strict.get(tenant).burst == 3
        assert stale_served() - before >= 4

        # A tenant never seen before cannot be looked up: the unknown-tenant policy answers.
        newcomer = limiter.acquire(stranger)
        assert newcomer.allowed
        assert (newcomer.limit, newcomer.daily_limit) == (
            plan_limits("free").burst,
            plan_limits("free").daily_limit,
        )
        with pytest.raises(UnknownTenant):
            strict_limiter.acquire(stranger)
    finally:
        lenient.close()
        strict.close()
        store.close()
        r.delete(quota_cache_key(tenant), quota_cache_key(stranger))


@pytest.fixture
def own_redis(dedicated_stack: LocalStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(dedicated_stack.up(["redis"])["RATE_LIMIT_REDIS_URL"])
    yield client
    client.close()


def test_a_flushed_redis_seeds_today_from_the_backfill_and_admits_only_the_rest(
    quota_db_url: str, own_redis: redis.Redis, tenant: str
) -> None:
    migrate(quota_db_url)
    store = QuotaStore(quota_db_url)
    QuotaAdmin(store, own_redis).set_quota(
        tenant, rate_per_sec=10_000.0, burst=5_000, daily_limit=1_000
    )
    seconds, _ = own_redis.time()
    today = dt.datetime.fromtimestamp(seconds, dt.UTC).date()  # Redis's clock is the clock
    store.upsert_daily_usage([(tenant, today, 900)])  # the worker's backfill for today
    cache = QuotaCache(store, own_redis)
    limiter = RateLimiter(own_redis, cache)
    try:
        assert cache.get(tenant).daily_limit == 1_000
        own_redis.flushall()  # the day counters are gone, as after a restart without persistence

        decisions = [limiter.acquire(tenant) for _ in range(101)]
        admitted = [d for d in decisions if d.allowed]
        assert len(admitted) == 100
        assert decisions[0].daily_used == 901
        assert decisions[-1].allowed is False
        assert decisions[-1].reason == "daily"
        assert decisions[-1].daily_used == 1_000
    finally:
        cache.close()
        store.close()


def test_a_slow_database_never_delays_a_known_tenant(
    postgres_url: str, r: redis.Redis, tenant: str
) -> None:
    for url in fresh_postgres_database(postgres_url):
        migrate(url)
        store = QuotaStore(url)
        QuotaAdmin(store, r).set_quota(tenant, rate_per_sec=1.0, burst=3, daily_limit=100)
        cache = QuotaCache(store, r, local_ttl=0.2).start()
        other = make_engine(url)
        try:
            assert cache.get(tenant).burst == 3
            r.delete(quota_cache_key(tenant))  # so the refresh has to ask the DB
            with other.connect() as lock:
                # The DB turns slow: every read of tenants waits for this transaction.
                lock.execute(text("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE"))
                lock.execute(
                    text("UPDATE tenants SET burst = 9, version = version + 1 WHERE id = :t"),
                    {"t": tenant},
                )
                time.sleep(0.25)  # the cached entry has expired
                assert cache.get(tenant).burst == 3  # answered from memory at once ...
                with other.connect() as probe:  # ... while its refresh waits on the lock
                    deadline = time.monotonic() + 5
                    while not probe.scalar(text(WAITING_ON_A_LOCK)):
                        assert time.monotonic() < deadline, "no refresh is waiting on the DB"
                        time.sleep(0.01)
                assert cache.get(tenant).burst == 3
                lock.commit()
            deadline = time.monotonic() + 10
            while cache.get(tenant).burst != 9:  # the refresh completes once the DB answers
                assert time.monotonic() < deadline, "the refresh never completed"
                time.sleep(0.01)
        finally:
            cache.close()
            store.close()
            other.dispose()
            r.delete(quota_cache_key(tenant))


WAITING_ON_A_LOCK = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)

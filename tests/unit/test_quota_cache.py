"""The in-process quota cache without Redis: what the request path pays and when it waits.

The quota DB is replaced by a plain in-memory store with the same two methods (no Redis is
involved: every test here passes ``redis=None``); the Redis and SQL layers are tested against
real servers in tests/integration/test_quota_cache.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy.exc import OperationalError

from limiter import CircuitBreaker, RateLimiter, quotas
from limiter.quota_provider import QuotaProvider, UnknownTenant
from limiter.quotas import QuotaCache
from metering.ids import InvalidIdentifier
from metering.plans import Limits, QuotaError, plan_limits
from metering.quota_db import TenantRecord


class MemoryStore:
    """Tenants in a dict; counts lookups; can fail (as a stopped DB does) or block."""

    def __init__(self) -> None:
        self.records: dict[str, TenantRecord] = {}
        self.lookups = 0
        self.down = False
        self.gate: threading.Event | None = None  # when set: lookups wait for it
        self.waiting = threading.Event()

    def put(self, tenant: str, burst: int, version: int = 1) -> None:
        self.records[tenant] = TenantRecord(tenant, "custom", Limits(10.0, burst, 1000), version)

    def get_tenant(self, tenant: str) -> TenantRecord | None:
        self.lookups += 1
        if self.gate is not None:
            self.waiting.set()
            assert self.gate.wait(5), "the test never released the store"
        if self.down:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("quota DB is down"))
        return self.records.get(tenant)

    def daily_usage(self, tenant: str, day: dt.date) -> int:
        if self.down:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("quota DB is down"))
        return 900


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Clock:
    """The cache's clock, moved only by the test: whether an entry is due for a refresh or has
    expired never depends on how fast a loaded machine runs the test."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Stands in for the ``time`` module limiter.quotas reads ``monotonic()`` from."""
    c = Clock()
    monkeypatch.setattr(quotas, "time", c)
    return c


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    s.put("acme", burst=20)
    return s


def make_cache(store: MemoryStore, **kw: object) -> QuotaCache:
    return QuotaCache(store, None, **kw)  # type: ignore[arg-type]


def test_the_cache_is_a_quota_provider(store: MemoryStore) -> None:
    assert isinstance(make_cache(store), QuotaProvider)


def test_a_warm_lookup_does_no_io_and_counts_a_local_hit(store: MemoryStore) -> None:
    cache = make_cache(store, local_ttl=60)
    hits = sample("tenant_quota_cache_hits_total", layer="local")
    assert cache.get("acme").burst == 20
    for _ in range(1000):
        assert cache.get("acme").burst == 20
    assert store.lookups == 1
    assert sample("tenant_quota_cache_hits_total", layer="local") - hits == 1000


def test_a_hot_tenant_is_refreshed_in_the_background_without_the_request_waiting(
    store: MemoryStore, clock: Clock
) -> None:
    cache = make_cache(store, local_ttl=0.2)
    cache.get("acme")
    store.put("acme", burst=30, version=2)
    store.gate = threading.Event()
    clock.advance(0.15)  # past half the TTL, not expired: the next lookup triggers a refresh
    assert cache.get("acme").burst == 20  # answered from memory while the store is blocked
    assert store.waiting.wait(5), "no background refresh reached the store"
    for _ in range(20):
        assert cache.get("acme").burst == 20  # still not waiting, refresh in flight
    store.gate.set()
    cache.close()  # joins the refresher: its refresh is installed
    assert cache.get("acme").burst == 30
    assert store.lookups == 2  # one refresh, however many lookups happened meanwhile


def test_db_down_serves_the_last_known_quota_and_counts_it_stale(
    store: MemoryStore, clock: Clock
) -> None:
    cache = make_cache(store, local_ttl=0.1, retry_interval=0.05)
    assert cache.get("acme").burst == 20
    store.down = True
    stale = sample("tenant_quota_stale_served_total")
    clock.advance(0.15)  # expired
    for _ in range(50):
        assert cache.get("acme").burst == 20
    assert sample("tenant_quota_stale_served_total") - stale == 50
    assert store.lookups == 2  # one retry: they are paced by retry_interval, not per request
    store.down = False
    store.put("acme", burst=25, version=2)
    clock.advance(0.06)
    assert cache.get("acme").burst == 20  # triggers the background retry, which now succeeds
    cache.close()  # joins the refresher: the retry's answer is installed
    assert cache.get("acme").burst == 25


def test_an_unknown_tenant_gets_the_default_plan_when_so_configured(store: MemoryStore) -> None:
    cache = make_cache(store, unknown_tenant="default", default_plan="pro")
    quota = cache.get("nobody")
    assert (quota.rate_per_sec, quota.burst) == (
        plan_limits("pro").rate_per_sec,
        plan_limits("pro").burst,
    )
    cache.get("nobody")
    assert store.lookups == 1  # the negative answer is cached too


def test_an_unknown_tenant_is_rejected_when_so_configured(store: MemoryStore) -> None:
    cache = make_cache(store, unknown_tenant="reject")
    for _ in range(3):
        with pytest.raises(UnknownTenant, match="nobody"):
            cache.get("nobody")
    assert store.lookups == 1


def test_a_tenant_first_seen_while_the_db_is_down_gets_the_unknown_policy_until_it_answers(
    store: MemoryStore, clock: Clock
) -> None:
    lenient = make_cache(store, unknown_tenant="default", retry_interval=0.05)
    strict = make_cache(store, unknown_tenant="reject", retry_interval=0.05)
    store.down = True
    assert lenient.get("acme").burst == plan_limits("free").burst
    with pytest.raises(UnknownTenant):
        strict.get("acme")
    store.down = False
    clock.advance(0.06)
    # Still the policy's answer; each lookup triggers the background retry.
    assert lenient.get("acme").burst == plan_limits("free").burst
    with pytest.raises(UnknownTenant):
        strict.get("acme")
    for cache in (lenient, strict):
        cache.close()  # joins the refresher: the retry's answer is installed
        assert cache.get("acme").burst == 20


def test_a_malformed_tenant_id_is_refused_before_any_lookup(store: MemoryStore) -> None:
    cache = make_cache(store)
    with pytest.raises(InvalidIdentifier):
        cache.get("x" * 65)
    with pytest.raises(InvalidIdentifier):
        cache.get("a{b}")
    assert store.lookups == 0


def test_an_older_published_change_never_replaces_a_newer_one(store: MemoryStore) -> None:
    cache = make_cache(store)
    cache.get("acme")
    new = {"rate_per_sec": 1.0, "burst": 3, "daily_limit": 10, "version": 3}
    old = {"rate_per_sec": 1.0, "burst": 2, "daily_limit": 10, "version": 2}
    assert cache.apply_change("acme", new)
    assert not cache.apply_change("acme", old)
    assert cache.get("acme").burst == 3
    assert not cache.apply_change("other", new)  # tenants not cached here are not added


def test_a_refresh_that_overlaps_a_change_is_discarded(store: MemoryStore, clock: Clock) -> None:
    cache = make_cache(store, local_ttl=0.2)
    cache.get("acme")
    store.gate = threading.Event()
    clock.advance(0.15)
    cache.get("acme")  # starts a refresh that reads the (old) row and blocks
    assert store.waiting.wait(5), "no background refresh reached the store"
    cache.apply_change("acme", {"rate_per_sec": 1.0, "burst": 7, "daily_limit": 10, "version": 2})
    store.gate.set()
    cache.close()  # joins the refresher: the overlapping refresh has finished
    assert cache.get("acme").burst == 7


def test_a_refresh_of_an_unknown_tenant_that_overlaps_its_creation_is_discarded(
    store: MemoryStore, clock: Clock
) -> None:
    """A tenant not in the DB is cached as unknown (version 0); a refresh reads "unknown" again
    while the change that creates it (version 1) is applied. No version orders the two (an
    unknown answer has none), so only the overlap itself tells the refresh's answer is stale:
    installed, it would serve the default plan until the next refresh."""
    cache = make_cache(store, local_ttl=0.2, unknown_tenant="default", default_plan="free")
    assert cache.get("newco").burst == plan_limits("free").burst
    store.gate = threading.Event()
    clock.advance(0.15)
    cache.get("newco")  # starts a refresh that reads "unknown" and blocks
    assert store.waiting.wait(5), "no background refresh reached the store"
    created = {"rate_per_sec": 1.0, "burst": 7, "daily_limit": 10, "version": 1}
    assert cache.apply_change("newco", created)
    store.gate.set()
    cache.close()  # joins the refresher: the overlapping refresh has finished
    assert cache.get("newco").burst == 7


def test_daily_seed_reads_the_backfill_and_never_raises(store: MemoryStore) -> None:
    cache = make_cache(store)
    assert cache.daily_seed("acme", dt.date(2026, 1, 2)) == 900
    store.down = True
    assert cache.daily_seed("acme", dt.date(2026, 1, 2)) == 0


async def test_aget_serves_from_memory_and_refreshes_as_a_task(
    store: MemoryStore, clock: Clock
) -> None:
    cache = make_cache(store, local_ttl=0.2)
    assert (await cache.aget("acme")).burst == 20
    store.put("acme", burst=40, version=2)
    clock.advance(0.15)
    assert (await cache.aget("acme")).burst == 20  # served, refresh scheduled
    refreshes = set(cache._tasks)
    assert len(refreshes) == 1
    await asyncio.wait_for(asyncio.gather(*refreshes), 5)
    assert (await cache.aget("acme")).burst == 40
    assert store.lookups == 2
    assert await cache.adaily_seed("acme", dt.date(2026, 1, 2)) == 900
    await cache.aclose()


def test_memory_is_bounded_by_max_entries(store: MemoryStore) -> None:
    for name in ("a1", "a2", "a3"):
        store.put(name, burst=5)
    cache = make_cache(store, max_entries=2)
    for name in ("a1", "a2", "a3"):
        cache.get(name)
    assert store.lookups == 3
    cache.get("a3")
    cache.get("a2")
    assert store.lookups == 3  # the two newest stayed
    cache.get("a1")
    assert store.lookups == 4  # the oldest was evicted


def test_a_full_cache_evicts_the_tenant_least_recently_refreshed(
    store: MemoryStore, clock: Clock
) -> None:
    """A tenant in use is reloaded every ``local_ttl``; each reload puts it last in the order of
    eviction, so a full cache drops tenants nobody asked for lately, not the first ever cached
    (a client cycling through many tenants pushed the busiest ones out, each then waiting on
    Redis or the DB for its next lookup)."""
    for name in ("a1", "a2", "a3"):
        store.put(name, burst=5)
    cache = make_cache(store, max_entries=2, local_ttl=5)
    cache.get("a1")
    cache.get("a2")
    clock.advance(6)
    cache.get("a1")  # expired and reloaded: in use
    assert store.lookups == 3
    cache.get("a3")  # full: a2, not refreshed since it was cached, makes room
    assert store.lookups == 4
    cache.get("a1")
    assert store.lookups == 4
    cache.get("a2")
    assert store.lookups == 5


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"default_plan": "gold"}, "unknown plan 'gold'"),
        ({"default_plan": "custom"}, "has no default limits"),
        ({"unknown_tenant": "allow"}, "unknown_tenant must be 'default' or 'reject'"),
        ({"local_ttl": 0}, "must be > 0"),
    ],
)
def test_a_misconfigured_cache_is_refused_at_construction(
    store: MemoryStore, kw: dict, message: str
) -> None:
    with pytest.raises(QuotaError, match=message):
        make_cache(store, **kw)


def test_a_limiter_shares_its_breaker_with_the_quota_cache_it_is_given(
    store: MemoryStore,
) -> None:
    """The cache's Redis read goes through the breaker of the limiter it serves: given one, the
    cache takes the limiter's; a limiter given none takes the cache's; a cache keeps its own."""
    client = redis.Redis(port=1)  # never connected: construction only
    mine = CircuitBreaker()
    cache = make_cache(store)
    assert RateLimiter(client, cache, breaker=mine).breaker is mine
    assert cache.breaker is mine
    assert RateLimiter(client, cache).breaker is mine  # a second limiter: the cache's breaker
    other = CircuitBreaker()
    assert RateLimiter(client, cache, breaker=other).breaker is other
    assert cache.breaker is mine  # it keeps the one it had
    fresh = make_cache(store)
    limiter = RateLimiter(client, fresh)
    assert fresh.breaker is limiter.breaker is not None
    client.close()


def test_a_fetched_older_version_never_replaces_a_newer_one_within_the_redis_ttl(
    store: MemoryStore,
) -> None:
    """A change applied here (published, or made by this process while Redis was down) is not
    undone by a source still holding the version before it: that is the stale Redis entry a
    change could not replace. Once such an entry must have expired (``redis_ttl`` after the
    newer version arrived), an older version can only be a tenant deleted and created again
    (versions restart at 1), and it is installed."""
    cache = make_cache(store, local_ttl=60, redis_ttl=30)
    assert cache.get("acme").burst == 20  # version 1
    payload = {"rate_per_sec": 10.0, "burst": 50, "daily_limit": 1000, "version": 2}
    assert cache.apply_change("acme", payload)
    cache._load_now("acme", cache._local["acme"])  # the source still says version 1
    assert cache.get("acme").burst == 50
    cache._local["acme"].since -= 31  # v2 arrived longer than the Redis TTL ago
    cache._load_now("acme", cache._local["acme"])
    assert cache.get("acme").burst == 20

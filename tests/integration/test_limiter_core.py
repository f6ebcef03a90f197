"""The limiter's decisions against real Redis: the same suite on a single node, a Sentinel
group and a 3-master Cluster, through the sync and the async limiter."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from limiter import AsyncRateLimiter, NoQuota, Quota, RateLimiter, UnknownTenant
from limiter.keys import daily_counter_key, token_bucket_key, window_log_key, window_meta_key
from tests.conftest import seconds_to_utc_midnight
from tests.integration.limiter_support import KINDS, StaticQuotas, Targets, server_day, server_time


@pytest.fixture(scope="module")
def targets(redis_url: str, redis_sentinels: tuple[str, str], redis_cluster_nodes: str) -> Targets:
    return Targets(redis_url, redis_sentinels, redis_cluster_nodes)


class Driver:
    """One limiter (sync or async) behind the same awaitable methods, plus a raw client."""

    def __init__(self, limiter: Any, raw: Any) -> None:
        self.limiter, self.raw = limiter, raw
        self.is_async = isinstance(limiter, AsyncRateLimiter)

    async def acquire(self, tenant: str, cost: int = 1, quota: Quota | None = None) -> Any:
        result = self.limiter.acquire(tenant, cost, quota)
        return await result if self.is_async else result

    async def settle(
        self, tenant: str, reserved: Any, actual: int, quota: Quota | None = None
    ) -> Any:
        result = self.limiter.settle(tenant, reserved, actual, quota)
        return await result if self.is_async else result

    def counter(self, tenant: str, day: dt.date | None = None) -> int | None:
        key = daily_counter_key(tenant, day or server_day(self.raw, token_bucket_key(tenant)))
        value = self.raw.get(key)
        return None if value is None else int(value)

    def bucket(self, tenant: str) -> dict[bytes, bytes]:
        return dict(self.raw.hgetall(token_bucket_key(tenant)))


@pytest.fixture(
    params=[(k, f) for k in KINDS for f in ("sync", "async")], ids=lambda p: f"{p[0]}-{p[1]}"
)
async def make(
    request: pytest.FixtureRequest, targets: Targets
) -> AsyncIterator[Callable[..., Driver]]:
    kind, flavor = request.param
    raw = targets.sync_client(kind)
    opened: list[Any] = []

    def factory(**kwargs: Any) -> Driver:
        if flavor == "sync":
            return Driver(RateLimiter(targets.sync_client(kind), **kwargs), raw)
        client = targets.async_client(kind)
        opened.append(client)
        return Driver(AsyncRateLimiter(client, **kwargs), raw)

    yield factory
    for client in opened:
        await client.aclose()
    raw.close()


SLOW = dict(rate_per_sec=0.001, burst=5, daily_limit=100)  # the bucket barely refills


async def test_bucket_allows_burst_then_rejects_and_a_rejection_changes_nothing(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    q = Quota(**SLOW)
    allowed = [await d.acquire(tenant, 1, q) for _ in range(5)]
    assert [x.allowed for x in allowed] == [True] * 5
    assert [x.remaining for x in allowed] == [4, 3, 2, 1, 0]
    assert [x.daily_used for x in allowed] == [1, 2, 3, 4, 5]
    before = (d.bucket(tenant), d.counter(tenant))

    rejected = await d.acquire(tenant, 1, q)

    assert (rejected.allowed, rejected.reason, rejected.degraded) == (False, "bucket", False)
    assert rejected.daily_used == 5 and rejected.remaining == 0
    assert 900 < rejected.retry_after <= 1000  # 1 token at 0.001/s, minus what refilled
    assert (d.bucket(tenant), d.counter(tenant)) == before


async def test_the_tokens_left_are_exact_at_the_largest_burst(
    make: Callable[..., Driver], tenant: str
) -> None:
    """The scripts returned milli-tokens, which a double cannot hold exactly past 2^53: with
    a burst of 10^15, one request left 999999999999999 tokens and the header said ...998."""
    d = make()
    q = Quota(rate_per_sec=10**6, burst=10**15, daily_limit=10**15)  # the slowest refill
    first = await d.acquire(tenant, 1, q)
    assert first.allowed and first.remaining == 10**15 - 1
    second = await d.acquire(tenant, 7, q)  # a microsecond refills the one taken first
    assert 10**15 - 8 <= second.remaining <= 10**15 - 7


async def test_daily_limit_is_exact_and_resets_at_next_utc_midnight(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    q = Quota(rate_per_sec=1000, burst=1000, daily_limit=7)
    decisions = [await d.acquire(tenant, 1, q) for _ in range(9)]
    assert [x.allowed for x in decisions] == [True] * 7 + [False] * 2
    last = decisions[-1]
    assert (last.reason, last.daily_used, last.daily_remaining) == ("daily", 7, 0)
    today = server_day(d.raw, token_bucket_key(tenant))
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    assert last.reset_at == midnight and last.day == today
    to_midnight = midnight.timestamp() - server_time(d.raw, token_bucket_key(tenant))
    assert abs(last.retry_after - to_midnight) < 5
    assert d.counter(tenant) == 7


async def test_a_cost_above_the_daily_limit_is_refused_for_good_without_a_wait(
    make: Callable[..., Driver], tenant: str
) -> None:
    """No day can take a cost above the daily limit: not "daily" with a wait until midnight
    (a client would retry then, and be refused again), but cost_exceeds_daily, retry_after 0,
    nothing taken; a cost that fits a fresh day is still "daily" with the wait."""
    d = make()
    q = Quota(rate_per_sec=1000, burst=1000, daily_limit=10)
    assert (await d.acquire(tenant, 4, q)).allowed
    too_big = await d.acquire(tenant, 11, q)
    assert (too_big.allowed, too_big.reason, too_big.retry_after) == (
        False,
        "cost_exceeds_daily",
        0.0,
    )
    assert too_big.daily_used == 4 and d.counter(tenant) == 4
    not_today = await d.acquire(tenant, 7, q)  # 4 + 7 > 10, but 7 fits a day
    assert (not_today.reason, not_today.retry_after > 0) == ("daily", True)


async def test_a_cost_is_taken_whole_or_not_at_all(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    q = Quota(rate_per_sec=0.001, burst=20, daily_limit=10)
    first = await d.acquire(tenant, 6, q)
    second = await d.acquire(tenant, 6, q)  # 6 + 6 > 10
    third = await d.acquire(tenant, 4, q)
    assert (first.allowed, second.allowed, third.allowed) == (True, False, True)
    assert second.reason == "daily" and second.daily_used == 6
    assert third.daily_used == 10 and third.remaining == 10
    assert d.counter(tenant) == 10


async def test_settle_adds_and_returns_exactly_the_difference(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    q = Quota(rate_per_sec=0.001, burst=50, daily_limit=100)
    reserved = await d.acquire(tenant, 5, q)
    assert (reserved.daily_used, reserved.remaining) == (5, 45)

    more = await d.settle(tenant, reserved, 8)  # the real cost was 3 more
    assert (more.delta, more.daily_used, more.remaining) == (3, 8, 42)
    assert d.counter(tenant) == 8

    second = await d.acquire(tenant, 4, q)
    less = await d.settle(tenant, second, 1)  # 3 given back
    assert (less.delta, less.daily_used, less.remaining) == (-3, 9, 41)
    assert d.counter(tenant) == 9

    floor = await d.settle(tenant, 100, 0, q)  # more given back than was ever used
    assert floor.daily_used == 0 and d.counter(tenant) == 0
    assert floor.remaining == 50  # the bucket never goes above its burst


async def test_settling_a_rejected_decision_is_refused(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    q = Quota(rate_per_sec=0.001, burst=1, daily_limit=100)
    await d.acquire(tenant, 1, q)
    rejected = await d.acquire(tenant, 1, q)
    with pytest.raises(ValueError, match="nothing to settle"):
        await d.settle(tenant, rejected, 1)
    assert d.counter(tenant) == 1


async def test_day_counter_ttl_ends_after_the_next_utc_midnight(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    await d.acquire(tenant, 1, Quota(**SLOW))
    key = daily_counter_key(tenant, server_day(d.raw, token_bucket_key(tenant)))
    ttl = d.raw.ttl(key)
    now = server_time(d.raw, key)
    to_midnight = seconds_to_utc_midnight(now)
    assert to_midnight < ttl <= to_midnight + 3600 + 1  # midnight plus one hour of grace


async def test_a_client_clock_on_the_wrong_day_never_counts_into_that_day(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    d.limiter.clock.offset = -3 * 86400.0  # the client believes it is three days ago
    decision = await d.acquire(tenant, 1, Quota(**SLOW))
    today = server_day(d.raw, token_bucket_key(tenant))
    assert decision.allowed and decision.day == today
    assert d.counter(tenant, today) == 1
    assert d.counter(tenant, today - dt.timedelta(days=3)) is None


async def test_the_slowest_bucket_allowed_still_expires(
    make: Callable[..., Driver], tenant: str
) -> None:
    """At MAX_REFILL_SECONDS a bucket's key still gets its expiry (twice the refill time) on
    the first write; beyond it, acquire.lua would never set one."""
    from limiter.quota import MAX_REFILL_SECONDS

    d = make()
    q = Quota(rate_per_sec=1, burst=MAX_REFILL_SECONDS, daily_limit=10)
    assert (await d.acquire(tenant, 1, q)).allowed
    ttl_ms = d.raw.pttl(token_bucket_key(tenant))
    assert 2 * MAX_REFILL_SECONDS * 1000 <= ttl_ms <= 2 * (MAX_REFILL_SECONDS + 1) * 1000


async def test_a_lowered_rate_keeps_the_bucket_until_it_would_refill_at_the_new_rate(
    make: Callable[..., Driver], tenant: str
) -> None:
    """A bucket's key may expire once the bucket would be full again. After the tenant's rate
    was lowered, the expiry set under the faster rate is pushed out by the next call, allowed
    or rejected, and a settle of a decision made under the old quota does not bring it back
    in: otherwise the key would vanish within seconds and the next call find a full burst."""
    d = make()
    fast = Quota(rate_per_sec=1000, burst=10, daily_limit=10**6)  # full in 0.01 s: kept ~2 s
    slow = Quota(rate_per_sec=0.5, burst=10, daily_limit=10**6)  # full in 20 s
    slow_refill_ms = 20_000

    emptied, key = tenant, token_bucket_key(tenant)
    assert (await d.acquire(emptied, 10, fast)).remaining == 0
    assert d.raw.pttl(key) < 3_000
    rejected = await d.acquire(emptied, 1, slow)
    assert (rejected.allowed, rejected.reason) == (False, "bucket")
    assert d.raw.pttl(key) > slow_refill_ms

    halved = f"{tenant}-b"
    key = token_bucket_key(halved)
    before = await d.acquire(halved, 5, fast)
    assert before.remaining == 5 and d.raw.pttl(key) < 3_000
    assert (await d.acquire(halved, 1, slow)).allowed
    assert d.raw.pttl(key) > slow_refill_ms
    assert (await d.settle(halved, before, 6)).applied  # under the fast quota it was made with
    assert d.raw.pttl(key) > slow_refill_ms


async def test_a_settle_for_today_by_a_skewed_clock_goes_to_the_servers_day(
    make: Callable[..., Driver], tenant: str
) -> None:
    """A settle given a reserved cost (not a decision) means "today": the client's idea of the
    day is checked against the server's, so near midnight or with a skewed clock the correction
    never lands in yesterday's counter (alive for its grace hour) or a day that is not counted."""
    d = make()
    q = Quota(**SLOW)
    assert (await d.acquire(tenant, 1, q)).allowed
    today = server_day(d.raw, token_bucket_key(tenant))
    yesterday = today - dt.timedelta(days=1)
    d.raw.set(daily_counter_key(tenant, yesterday), 5, ex=600)  # in its grace hour
    d.limiter.clock.offset = -86400.0  # the client believes it is yesterday
    settled = await d.settle(tenant, 1, 4, q)  # 3 more than reserved
    assert settled.applied and settled.daily_used == 4
    assert d.counter(tenant, today) == 4
    assert d.counter(tenant, yesterday) == 5


async def test_a_missing_day_counter_is_seeded_from_the_quota_provider(
    make: Callable[..., Driver], tenant: str
) -> None:
    d0 = make()
    today = server_day(d0.raw, token_bucket_key(tenant))
    quotas = StaticQuotas(
        {tenant: Quota(rate_per_sec=1000, burst=1000, daily_limit=42)}, {(tenant, today): 40}
    )
    d = make(quotas=quotas)
    decisions = [await d.acquire(tenant) for _ in range(3)]
    assert [(x.allowed, x.daily_used) for x in decisions] == [(True, 41), (True, 42), (False, 42)]
    assert quotas.seed_calls == [(tenant, today)]  # asked once: the counter exists after

    d.raw.delete(daily_counter_key(tenant, today))  # Redis lost the day (restart, failover)
    quotas.seeds[(tenant, today)] = 42  # what the quota DB backfilled meanwhile
    again = await d.acquire(tenant)
    assert (again.allowed, again.reason, again.daily_used) == (False, "daily", 42)
    assert len(quotas.seed_calls) == 2 and d.counter(tenant) == 42


async def test_without_a_provider_a_lost_day_starts_at_zero(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    assert (await d.acquire(tenant, 3, Quota(**SLOW))).daily_used == 3


async def test_quota_comes_from_the_provider_or_is_refused(
    make: Callable[..., Driver], tenant: str
) -> None:
    with pytest.raises(NoQuota):
        await make().acquire(tenant)
    with pytest.raises(UnknownTenant):
        await make(quotas=StaticQuotas({})).acquire(tenant)


async def test_rolling_window_admits_no_more_than_its_limit_in_any_window(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    q = Quota(rate_per_sec=1000, burst=1000, daily_limit=10**6, window_limit=5, window_seconds=1)
    first = [await d.acquire(tenant, 1, q) for _ in range(6)]
    assert [x.allowed for x in first] == [True] * 5 + [False]
    assert first[-1].reason == "window" and 0 < first[-1].retry_after <= 1.0
    assert first[4].window_remaining == 0

    # Hammer it for a while; bracket each allowed call by the server's clock.
    key = token_bucket_key(tenant)
    allowed: list[tuple[float, float]] = []
    end = time.monotonic() + 2.2
    while time.monotonic() < end:
        before = server_time(d.raw, key)
        decision = await d.acquire(tenant, 1, q)
        after = server_time(d.raw, key)
        if decision.allowed:
            allowed.append((before, after))
        else:
            assert decision.reason == "window"
    assert len(allowed) >= 5  # the window did open again
    # Any 6 allowed calls span more than the window: the 6th is > 1 s after the 1st.
    for i in range(len(allowed) - 5):
        assert allowed[i + 5][1] - allowed[i][0] > 1.0
    assert d.raw.zcard(window_log_key(tenant)) <= 5


async def test_a_large_cost_leaves_the_window_exactly_as_it_entered(
    make: Callable[..., Driver], tenant: str
) -> None:
    """Each window entry keeps its cost as the integer it is (a Lua number would be written
    with 14 significant digits), so an entry of a 15-digit cost, acquired or settled, takes out
    of the window's sum exactly what it put in when it leaves the window."""
    d = make()
    limit = 10**15
    q = Quota(
        rate_per_sec=10.0**12,
        burst=limit,
        daily_limit=limit,
        window_limit=limit,
        window_seconds=1,
    )
    cost, more = 123_456_789_012_345, 234_567_890_123_457
    reserved = await d.acquire(tenant, cost, q)
    assert reserved.window_remaining == limit - cost
    assert (await d.settle(tenant, reserved, cost + more)).applied
    assert d.raw.zrange(window_log_key(tenant), 0, -1) == [b"1:%d" % cost, b"2:%d" % more]

    await asyncio.sleep(1.2)  # both entries leave the window
    after = await d.acquire(tenant, 0, q)
    assert after.window_remaining == limit
    assert d.raw.hget(window_meta_key(tenant), "sum") == b"0"


async def test_concurrent_callers_in_one_process_are_exact(
    make: Callable[..., Driver], tenant: str
) -> None:
    d = make()
    q = Quota(rate_per_sec=0.001, burst=10**6, daily_limit=150)
    if d.is_async:
        decisions = await asyncio.gather(*(d.acquire(tenant, 1, q) for _ in range(400)))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            decisions = list(pool.map(lambda _: d.limiter.acquire(tenant, 1, q), range(400)))
    assert sum(x.allowed for x in decisions) == 150
    assert {x.reason for x in decisions if not x.allowed} == {"daily"}
    assert d.counter(tenant) == 150


@pytest.mark.parametrize(
    "day",
    [
        dt.date(1970, 1, 1),
        dt.date(2000, 2, 29),
        dt.date(2024, 2, 29),
        dt.date(2024, 3, 1),
        dt.date(2026, 12, 31),
        dt.date(2100, 3, 1),
        dt.date(2999, 12, 31),
    ],
)
def test_the_script_reads_the_day_from_the_key_as_the_calendar_does(
    redis_url: str, tenant: str, day: dt.date
) -> None:
    """acquire.lua parses YYYYMMDD from the day key itself (days_from_civil); a key for another
    day than the server's is refused with both days, and nothing is written."""
    import redis

    from limiter.clock import epoch_day
    from limiter.scripts import ACQUIRE, CallEncoder

    raw = redis.Redis.from_url(redis_url)
    raw.script_load(ACQUIRE.source)
    args = CallEncoder().acquire_args(tenant, epoch_day(day), 1, Quota(**SLOW), b"0")
    reply = raw.execute_command(*args)
    today = server_day(raw)
    if day == today:
        pytest.skip("the server's own day")
    assert reply[0] == -1  # WRONG_DAY
    assert reply[1] == epoch_day(day)
    assert reply[6] == epoch_day(today)
    assert raw.exists(token_bucket_key(tenant), daily_counter_key(tenant, day)) == 0


async def test_window_retry_after_waits_for_just_enough_old_entries(
    make: Callable[..., Driver], tenant: str
) -> None:
    """Each call is bracketed by readings of the server's clock, the one the script stamps the
    entries with, so each wait is checked against when its entry was made and when it was
    asked, however long the calls took."""
    d = make()
    q = Quota(rate_per_sec=1000, burst=1000, daily_limit=10**6, window_limit=40, window_seconds=30)

    async def timed(cost: int) -> tuple[float, Any, float]:
        """(server time before, the decision, server time after)."""
        before = server_time(d.raw, window_log_key(tenant))
        decision = await d.acquire(tenant, cost, q)
        return before, decision, server_time(d.raw, window_log_key(tenant))

    def assert_waits_for(made: tuple[float, Any, float], asked: tuple[float, Any, float]) -> None:
        """``asked`` waits until the entry ``made`` leaves the window, 30 s after it (rounded up
        to a millisecond by the script; 10 us for the float sums)."""
        low = made[0] + 30 - asked[2] - 1e-5
        high = made[2] + 30 - asked[0] + 0.001 + 1e-5
        assert low <= asked[1].retry_after <= high, (low, asked[1].retry_after, high)

    first = await timed(2)
    await asyncio.sleep(0.6)
    second = await timed(1)
    for _ in range(37):
        assert (await d.acquire(tenant, 1, q)).allowed
    assert first[1].allowed and second[1].allowed
    # Full (40). A cost of 2 needs the 2 units of the oldest entry to leave: 30 s after it.
    rejected = await timed(2)
    assert (rejected[1].reason, rejected[1].window_remaining) == ("window", 0)
    assert_waits_for(first, rejected)
    # A cost of 3 also needs the next one, made at least 0.6 s later: 30 s after that one.
    later = await timed(3)
    assert_waits_for(second, later)
    too_big = await d.acquire(tenant, 41, q)
    assert (too_big.allowed, too_big.reason) == (False, "cost_exceeds_window")


@pytest.mark.parametrize("garbage", ["hash", "abc", "1.5", "5.0", "1e2", " 5"])
async def test_a_key_of_another_type_gets_that_tenant_the_fail_mode_and_no_one_else(
    make: Callable[..., Driver], tenant: str, garbage: str
) -> None:
    """Something else wrote into the tenant's day counter: a hash where a string lives (Redis
    answers WRONGTYPE), or a string that is no integer (the script fails on it). Each call of
    the tenant fails. The tenant is decided by the fail mode (closed: refused) and a settle
    applies nothing, instead of an exception per request; another tenant is decided by Redis
    and the breaker stays closed, as Redis is up."""
    d = make(fail_mode="closed")
    q = Quota(**SLOW)
    assert (await d.acquire(tenant, 1, q)).allowed
    day = server_day(d.raw, token_bucket_key(tenant))
    key = daily_counter_key(tenant, day)
    d.raw.delete(key)
    if garbage == "hash":
        d.raw.hset(key, "x", "1")
    else:
        d.raw.set(key, garbage)
    try:
        refused = [await d.acquire(tenant, 1, q) for _ in range(4)]
        settled = await d.settle(tenant, 1, 2, q)
        other = await d.acquire(f"{tenant}-other", 1, q)
    finally:
        d.raw.delete(key)
    assert all(x.degraded and not x.allowed and x.reason == "redis_down" for x in refused)
    # settle.lua reads a number Lua can read and writes the counter back whole: that applies.
    assert settled.applied is (garbage not in ("hash", "abc"))
    assert other.allowed and not other.degraded and other.daily_used == 1
    assert d.limiter.policy.breaker_of(tenant).state == "closed"
    assert (await d.acquire(tenant, 1, q)).allowed  # the key deleted: decided by Redis again

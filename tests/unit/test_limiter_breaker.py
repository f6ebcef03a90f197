"""The circuit breaker, the local limiter and which Redis errors mean "unavailable" (pure logic)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from redis._parsers.base import BaseParser
from redis.cluster import key_slot
from redis.exceptions import (
    RedisClusterException,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
)

from limiter import CircuitBreaker, LocalLimiter, Quota, RateLimiter
from limiter.failure_policy import REDIS_ERRORS, FailurePolicy, MasterBreakers, redis_unavailable
from limiter.keys import token_bucket_key
from limiter.middleware import ratelimit_headers
from limiter.quotas import QuotaCache
from limiter.redis_factory import LazyRedisCluster
from metering.quota_db import QuotaStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, reset_after=1.0, clock=clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success in between starts the count again
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    assert b.retry_in() == pytest.approx(1.0)


def test_half_open_lets_exactly_one_probe_through_and_its_result_decides() -> None:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(1, 1.0, clock=clock, on_change=lambda o, n: changes.append((o, n)))
    b.record_failure()
    clock.now += 1.0
    assert b.state == "half_open"
    assert b.allow() is True  # the probe
    assert b.allow() is False  # everyone else meanwhile
    b.record_failure()  # the probe failed: open for another reset_after
    assert b.state == "open" and not b.allow()
    clock.now += 1.0
    assert b.allow() is True
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()
    assert changes == [("closed", "open"), ("half_open", "open"), ("half_open", "closed")]


def test_the_calls_in_flight_when_it_opened_report_only_real_changes() -> None:
    """The overload audit's log: every further failure while open logged "open (was
    half_open)". A failure while open keeps it open, without a change to report."""
    clock = Clock()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(1, 1.0, clock=clock, on_change=lambda o, n: changes.append((o, n)))
    b.record_failure()
    b.record_failure()
    b.record_failure()
    assert b.state == "open"
    assert changes == [("closed", "open")]


def test_a_success_of_a_call_let_through_before_it_opened_does_not_close_it() -> None:
    """CI's flake in ``test_redis_stopped_mid_load[closed-sync]``: one thread had read its
    reply just before Redis was killed and reported the success after three other threads'
    failures had opened the breaker, which closed it at once; the next calls waited out
    Redis's timeouts again. While open, no call has gone to Redis since the failures, so a
    success is old news: only the probe after ``reset_after`` closes it."""
    clock = Clock()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(3, 1.0, clock=clock, on_change=lambda o, n: changes.append((o, n)))
    assert all(b.allow() for _ in range(4))  # four calls in flight
    for _ in range(3):
        b.record_failure()
    assert b.state == "open"
    b.record_success()  # the fourth, read before the failures
    assert b.state == "open" and not b.allow()
    clock.now += 1.0
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # one probe
    b.record_success()
    assert b.state == "closed" and b.allow()
    assert changes == [("closed", "open"), ("half_open", "closed")]


def test_a_probe_that_never_reports_back_is_given_up_after_reset_after() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 1.0, clock=clock)
    b.record_failure()
    clock.now += 1.0
    assert b.allow() and not b.allow()
    clock.now += 1.0
    assert b.allow()  # a new probe


def test_breaker_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0)


def test_local_limiter_keeps_a_per_tenant_ceiling() -> None:
    clock = Clock()
    lim = LocalLimiter(10, clock=clock)
    allowed = [lim.try_acquire("a", 1)[0] for _ in range(15)]
    assert allowed == [True] * 10 + [False] * 5
    assert lim.try_acquire("b", 1)[0]  # another tenant has its own ceiling
    ok, _, retry = lim.try_acquire("a", 1)
    assert not ok and retry == pytest.approx(0.1)
    clock.now += 0.5
    assert sum(lim.try_acquire("a", 1)[0] for _ in range(10)) == 5


def test_local_limiter_memory_is_bounded() -> None:
    lim = LocalLimiter(10, max_tenants=100)
    for i in range(1000):
        lim.try_acquire(f"t{i}", 1)
    assert len(lim._buckets) == 100


@pytest.mark.parametrize(
    ("reply", "unavailable"),
    [
        ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable", True),
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL", True),
        ("NOREPLICAS Not enough good replicas to write.", True),
        ("OOM command not allowed when used memory > 'maxmemory'.", True),
        ("READONLY You can't write against a read only replica.", True),
        ("ERR Error running script (call to f_0123): user_script:1: bad argument", False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
        ("NOPERM this user has no permissions to run the 'evalsha' command", False),
    ],
)
def test_error_replies_that_refuse_writes_count_as_redis_unavailable(
    reply: str, unavailable: bool
) -> None:
    """Parsed as redis-py parses them: a refusal gets the fail mode, a bug propagates."""
    exc = BaseParser.parse_error(reply)
    assert redis_unavailable(exc) is unavailable
    assert isinstance(exc, REDIS_ERRORS)


def test_a_lost_connection_is_unavailable_and_a_plain_error_is_not() -> None:
    assert redis_unavailable(ConnectionError("gone"))
    assert redis_unavailable(TimeoutError())
    assert not redis_unavailable(ValueError("bug"))


def test_an_unreachable_cluster_is_unavailable_and_a_cluster_usage_error_is_not() -> None:
    """redis-py's cluster clients give up on a cluster none of whose nodes answers with
    RedisClusterUnreachableError, a RedisClusterException that is no RedisError: the fail mode
    answers it. Their other RedisClusterExceptions are bugs (keys in two slots, a missing key)."""
    unreachable = RedisClusterUnreachableError("Redis Cluster cannot be connected")
    assert isinstance(unreachable, REDIS_ERRORS) and redis_unavailable(unreachable)
    misuse = RedisClusterException("EVALSHA - all keys must map to the same key slot")
    assert not isinstance(misuse, REDIS_ERRORS) and not redis_unavailable(misuse)


@pytest.mark.parametrize("ceiling", [100.0, 3.0])
def test_a_fail_open_decision_never_says_more_remain_than_its_limit(ceiling: float) -> None:
    """Without Redis the local ceiling decides; its tokens (up to ``ceiling``) are reported
    against the tenant's burst, so they are capped at it: never 99 left of a limit of 10."""
    policy = FailurePolicy("open", local_limiter=LocalLimiter(ceiling, clock=Clock()))
    quota = Quota(rate_per_sec=5.0, burst=10, daily_limit=1000)
    decisions = [policy.decide("acme", 1, quota, 20_000) for _ in range(4)]
    assert all(d.degraded and d.limit == 10 for d in decisions)
    assert [d.remaining for d in decisions] == (
        [10, 10, 10, 10] if ceiling == 100.0 else [2, 1, 0, 0]
    )
    for d in decisions:
        fields = dict(ratelimit_headers(d, now=20_000 * 86400.0))
        assert 0 <= int(fields[b"x-ratelimit-remaining"]) <= int(fields[b"x-ratelimit-limit"])


def test_a_breaker_like_another_is_new_and_closed_with_its_settings() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, reset_after=7.0, clock=clock)
    b.record_failure()
    b.record_failure()
    twin = b.like()
    assert (twin.failure_threshold, twin.reset_after, twin.state) == (2, 7.0, "closed")
    twin.record_failure()
    twin.record_failure()
    clock.now += 6.9
    assert twin.state == "open"  # on the same clock
    clock.now += 0.2
    assert twin.state == "half_open"


class SlotMap:
    """A Cluster client's slot map, as ``MasterBreakers`` reads it: slots 0-8191 on one
    master, the rest on another, or no map at all (a client that never reached the Cluster)."""

    def __init__(self) -> None:
        self.masters: dict[range, str] | None = {range(0, 8192): "a:1", range(8192, 16384): "b:2"}
        self.nodes_manager = self

    def get_node_from_slot(self, slot: int) -> SimpleNamespace:
        for slots, name in (self.masters or {}).items():
            if slot in slots:
                return SimpleNamespace(name=name)
        raise SlotNotCoveredError(f"slot {slot} not covered")


def master_of(tenant: str) -> str:
    return "a:1" if key_slot(token_bucket_key(tenant).encode()) < 8192 else "b:2"


def tenants_on(master: str, count: int) -> list[str]:
    return [t for t in (f"t{i}" for i in range(200)) if master_of(t) == master][:count]


def test_each_master_of_a_cluster_has_a_breaker_and_a_tenant_uses_its_masters() -> None:
    clock = Clock()
    default = CircuitBreaker(failure_threshold=2, reset_after=5.0, clock=clock)
    masters = MasterBreakers(SlotMap(), default)
    (a1, a2), (b1,) = tenants_on("a:1", 2), tenants_on("b:2", 1)
    policy = FailurePolicy("closed", breaker=default)
    policy.masters = masters
    assert policy.breaker_of(a1) is policy.breaker_of(a2)  # one master, one breaker
    assert policy.breaker_of(a1) is not policy.breaker_of(b1)
    assert default not in (policy.breaker_of(a1), policy.breaker_of(b1))
    assert sorted(masters.by_master) == ["a:1", "b:2"]
    for _ in range(2):
        policy.redis_failed(ConnectionError("a:1 is down"), policy.breaker_of(a1))
    assert policy.breaker_of(a2).state == "open"
    assert (policy.breaker_of(b1).state, default.state) == ("closed", "closed")
    refused = policy.decide(a2, 1, Quota(1.0, 1, 10), 20_000, breaker=policy.breaker_of(a2))
    assert refused.degraded and not refused.allowed
    assert refused.retry_after == 5.0  # until the next probe of a:1's breaker (on its clock)
    clock.now += 1.5
    later = policy.decide(a1, 1, Quota(1.0, 1, 10), 20_000, breaker=policy.breaker_of(a1))
    assert later.retry_after == 3.5


def test_a_key_with_no_master_yet_uses_the_clusters_own_breaker() -> None:
    default = CircuitBreaker()
    slot_map = SlotMap()
    slot_map.masters = None
    masters = MasterBreakers(slot_map, default)
    assert masters.for_key(b"rl:{t}:tb") is default
    assert masters.by_master == {}


def test_a_lazy_cluster_client_is_not_made_to_find_a_breaker() -> None:
    made: list[SlotMap] = []

    def make() -> Any:
        made.append(SlotMap())
        return made[-1]

    lazy = LazyRedisCluster(make)
    policy = FailurePolicy(breaker=CircuitBreaker())
    policy.per_master(lazy)
    assert policy.masters is not None
    assert policy.breaker_of("t1") is policy.breaker and made == []  # nothing connected
    lazy.client  # noqa: B018  (the first use makes it)
    assert policy.breaker_of("t1") is not policy.breaker
    assert list(policy.masters.by_master) == [master_of("t1")]


def test_a_client_that_is_no_cluster_client_keeps_one_breaker() -> None:
    policy = FailurePolicy(breaker=CircuitBreaker())
    policy.per_master(redis.Redis())  # never connects: no command is sent
    assert policy.masters is None and policy.breaker_of("t1") is policy.breaker


def test_two_limiters_over_one_quota_cache_share_the_masters_breakers(tmp_path: Path) -> None:
    """A sync and an async limiter (say) over one QuotaCache on a Cluster: the cache shares
    the first one's breaker, and both keep one breaker per master, as they kept one breaker
    before there were several. Each limiter making a map of its own left the cache with the
    last one's, so the first never learnt of its quota reads' failures."""
    cache = QuotaCache(QuotaStore(f"sqlite:///{tmp_path / 'quota.db'}"))
    lazy = LazyRedisCluster(lambda: SlotMap())  # type: ignore[arg-type,return-value]
    first = RateLimiter(lazy, cache)
    second = RateLimiter(lazy, cache)
    assert first.breaker is second.breaker is cache.breaker
    assert first.policy.masters is not None
    assert first.policy.masters is second.policy.masters is cache._masters

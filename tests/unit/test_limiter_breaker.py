"""The circuit breaker, the local limiter and which Redis errors mean "unavailable" (pure logic)."""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import RedisClusterException, RedisClusterUnreachableError

from limiter import CircuitBreaker, LocalLimiter, Quota
from limiter.failure_policy import REDIS_ERRORS, FailurePolicy, redis_unavailable
from limiter.middleware import ratelimit_headers


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
    policy = FailurePolicy("open", local_limiter=LocalLimiter(ceiling))
    quota = Quota(rate_per_sec=5.0, burst=10, daily_limit=1000)
    decisions = [policy.decide("acme", 1, quota, 20_000) for _ in range(4)]
    assert all(d.degraded and d.limit == 10 for d in decisions)
    assert [d.remaining for d in decisions] == (
        [10, 10, 10, 10] if ceiling == 100.0 else [2, 1, 0, 0]
    )
    for d in decisions:
        fields = dict(ratelimit_headers(d, now=20_000 * 86400.0))
        assert 0 <= int(fields[b"x-ratelimit-remaining"]) <= int(fields[b"x-ratelimit-limit"])

"""The circuit breaker, the local limiter and which Redis errors mean "unavailable" (pure logic)."""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser

from limiter import CircuitBreaker, LocalLimiter
from limiter.failure_policy import REDIS_ERRORS, redis_unavailable


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

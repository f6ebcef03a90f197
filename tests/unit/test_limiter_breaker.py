"""The circuit breaker and the local limiter (pure logic, a hand-driven clock)."""

from __future__ import annotations

import pytest

from limiter import CircuitBreaker, LocalLimiter


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

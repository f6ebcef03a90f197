"""A decision made without Redis is recorded in ``rate_limiter_decision_seconds`` with the time
it really took: one that waited out a Redis timeout (or a slow quota lookup) before the failure
policy answered is not a 0 s decision.

Redis here is a listening socket that never answers (the kernel accepts the connection, nobody
reads it): every call waits out the client's socket timeout."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from prometheus_client import REGISTRY
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from limiter import AsyncRateLimiter, CircuitBreaker, Quota, RateLimiter

TIMEOUT = 0.3  # the client's socket timeout: what a decision waits before the policy answers
QUOTA = Quota(rate_per_sec=5.0, burst=10, daily_limit=1000)


def histogram() -> tuple[float, float, float]:
    """(count, sum, count at or under 0.1 s) of the decision-latency histogram."""

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(f"rate_limiter_decision_seconds_{name}", labels) or 0.0

    return sample("count"), sample("sum"), sample("bucket", le="0.1")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def limiter_on(port: int, flavor: str, quotas: Any = None, breaker: Any = None) -> Any:
    if flavor == "sync":
        client: Any = redis.Redis(port=port, socket_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0))
        return RateLimiter(client, quotas, breaker=breaker)
    client = redis.asyncio.Redis(
        port=port, socket_timeout=TIMEOUT, retry=AsyncRetry(NoBackoff(), 0)
    )
    return AsyncRateLimiter(client, quotas, breaker=breaker)


async def acquire(limiter: Any, tenant: str, quota: Quota | None = QUOTA) -> Any:
    if isinstance(limiter, RateLimiter):
        return await asyncio.to_thread(limiter.acquire, tenant, 1, quota)
    return await limiter.acquire(tenant, 1, quota)


async def close(limiter: Any) -> None:
    if isinstance(limiter, RateLimiter):
        limiter.close()
        limiter.redis.close()
    else:
        await limiter.redis.aclose()


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_decision_that_waited_out_a_redis_timeout_records_the_wait(
    silent_port: int, flavor: str
) -> None:
    limiter = limiter_on(silent_port, flavor)
    try:
        count, total, fast = histogram()
        t0 = time.perf_counter()
        decision = await acquire(limiter, "acme")
        took = time.perf_counter() - t0
    finally:
        await close(limiter)
    assert decision.degraded and decision.allowed, decision  # fail-open answered
    assert took >= TIMEOUT * 0.9, took
    count2, total2, fast2 = histogram()
    assert count2 - count == 1
    assert fast2 == fast, "a decision that waited for the Redis timeout was recorded as fast"
    # The recorded time lies inside the interval the test measured on the same clock around
    # the call (``perf_counter``): an ordering of readings, not a speed (1e-9: float sums).
    assert TIMEOUT * 0.9 <= total2 - total <= took + 1e-9, (total2 - total, took)


class SlowQuotas:
    """A quota provider whose lookup takes ``seconds`` (as a QuotaCache read that waits out a
    Redis timeout and then opens the breaker)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def get(self, tenant: str) -> Quota:
        time.sleep(self.seconds)  # the lookup's own latency, not a wait for another party
        return QUOTA

    async def aget(self, tenant: str) -> Quota:
        await asyncio.sleep(self.seconds)
        return QUOTA

    def daily_seed(self, tenant: str, day: Any) -> int:
        return 0

    async def adaily_seed(self, tenant: str, day: Any) -> int:
        return 0


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_decision_with_the_breaker_open_records_its_quota_lookup(
    silent_port: int, flavor: str
) -> None:
    """Breaker open: the policy answers at once, but the decision began with the lookup."""
    breaker = CircuitBreaker(1, 60.0)
    breaker.record_failure()
    assert breaker.state == "open"
    limiter = limiter_on(silent_port, flavor, SlowQuotas(TIMEOUT), breaker)
    try:
        count, total, fast = histogram()
        decision = await acquire(limiter, "acme", quota=None)
    finally:
        await close(limiter)
    assert decision.degraded, decision
    count2, total2, fast2 = histogram()
    assert count2 - count == 1
    assert fast2 == fast
    assert total2 - total >= TIMEOUT * 0.9

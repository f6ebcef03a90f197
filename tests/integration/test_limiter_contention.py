"""Exactness under contention: several processes, each with many concurrent callers (threads
on the sync limiter, tasks on the async one), on ONE tenant."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from tests.integration.limiter_support import KINDS, Targets, server_day

PROCESSES = ("threads", "async", "threads", "async")
THREADS, TASKS = 12, 48


def _worker(
    targets: Targets,
    kind: str,
    flavor: str,
    tenant: str,
    quota: Quota,
    attempts: int,
    seconds: float,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """Calls ``acquire`` from many callers until each made ``attempts`` calls or ``seconds``
    passed after the start signal; reports the number allowed."""
    settings = targets.settings(kind)
    if flavor == "threads":
        limiter = RateLimiter(redis_from_settings(settings))
        limiter.acquire(tenant, 0, quota)  # connect before the start (cost 0 changes nothing)
        ready.put(1)
        go.wait()
        end = time.monotonic() + seconds

        def caller(_: int) -> int:
            n = 0
            for _ in range(attempts):
                if time.monotonic() > end:
                    break
                n += limiter.acquire(tenant, 1, quota).allowed
            return n

        with ThreadPoolExecutor(THREADS) as pool:
            results.put(sum(pool.map(caller, range(THREADS))))
        return

    async def main() -> int:
        client = async_redis_from_settings(settings)
        limiter = AsyncRateLimiter(client)
        await limiter.acquire(tenant, 0, quota)
        ready.put(1)
        await asyncio.to_thread(go.wait)
        end = time.monotonic() + seconds

        async def caller() -> int:
            n = 0
            for _ in range(attempts):
                if time.monotonic() > end:
                    break
                n += (await limiter.acquire(tenant, 1, quota)).allowed
            return n

        total = sum(await asyncio.gather(*(caller() for _ in range(TASKS))))
        await client.aclose()
        return total

    results.put(asyncio.run(main()))


def run_processes(
    targets: Targets,
    kind: str,
    tenant: str,
    quota: Quota,
    *,
    attempts: int,
    seconds: float,
    before_start: Any = None,
) -> int:
    """Start the processes, wait until all are connected, run ``before_start``, release them
    at once; return the total number allowed."""
    ctx = multiprocessing.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Barrier(len(PROCESSES) + 1)
    procs = [
        ctx.Process(
            target=_worker,
            args=(targets, kind, flavor, tenant, quota, attempts, seconds, ready, go, results),
        )
        for flavor in PROCESSES
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        if before_start is not None:
            before_start()
        go.wait(timeout=60)
        total = sum(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return total


@pytest.fixture(scope="module")
def targets(redis_url: str, redis_sentinels: tuple[str, str], redis_cluster_nodes: str) -> Targets:
    return Targets(redis_url, redis_sentinels, redis_cluster_nodes)


@pytest.mark.parametrize("kind", KINDS)
def test_exactly_the_daily_limit_is_allowed_across_processes(
    targets: Targets, kind: str, tenant: str
) -> None:
    daily = 700
    quota = Quota(rate_per_sec=1.0, burst=10**6, daily_limit=daily)
    # 2 x 12 threads + 2 x 48 tasks, 25 attempts each: 3,000 attempts for 700 units.
    allowed = run_processes(targets, kind, tenant, quota, attempts=25, seconds=30.0)
    raw = targets.sync_client(kind)
    day = server_day(raw, token_bucket_key(tenant))
    assert allowed == daily
    assert int(raw.get(daily_counter_key(tenant, day))) == daily


@pytest.mark.parametrize("kind", KINDS)
def test_allowed_matches_the_refill_arithmetic_over_server_time(
    targets: Targets, kind: str, tenant: str
) -> None:
    """A small bucket, a slow refill, callers that never stop asking: every token is taken as
    soon as it accrues, so allowed = rate x (server time from an empty bucket to the last
    allowed call) - tokens left at that call."""
    # The bucket only fills (and refill is lost) if no caller asks for burst / rate = 0.5 s:
    # room for a scheduling stall on a busy machine without changing the arithmetic.
    rate, burst = 40.0, 20
    quota = Quota(rate_per_sec=rate, burst=burst, daily_limit=10**6)
    raw = targets.sync_client(kind)
    key = token_bucket_key(tenant)
    start: list[int] = []

    def empty_bucket() -> None:  # an empty bucket as of the server's now
        start.append(
            int(
                raw.eval(
                    "local t = redis.call('TIME') local now = t[1] * 1000000 + t[2] "
                    "redis.call('HSET', KEYS[1], 'tokens', '0', 'ts', now, 'xe', '0') return now",
                    1,
                    key,
                )
            )
        )

    allowed = run_processes(
        targets, kind, tenant, quota, attempts=10**6, seconds=1.5, before_start=empty_bucket
    )
    tokens_left = float(raw.hget(key, "tokens"))
    last_allowed_at = int(raw.hget(key, "ts"))
    elapsed = (last_allowed_at - start[0]) / 1e6
    # Counts, not speed: the last allowed call is this run's (after the emptying), and more
    # than a full bucket accrued and was taken, so the arithmetic spans many refills.
    assert elapsed > 0
    assert allowed > burst, allowed
    assert allowed == pytest.approx(rate * elapsed - tokens_left, abs=1e-6)
    # What the last allowed call left: below a token when the callers kept asking right up to
    # it, more after a stall of the machine (it failed CI once), never a full bucket
    # (whose capped refill the equality above would not hold for).
    assert 0 <= tokens_left <= burst - 1

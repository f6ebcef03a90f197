"""The limiter when Redis fails: stopped mid-load (fail open / fail closed, the breaker, the
recovery), a Sentinel failover, and scripts flushed from the server. Each test has its own
Redis processes (``dedicated_stack``), since it kills or flushes them."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.breaker import BreakerState, CircuitBreaker
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.local_limiter import LocalLimiter
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.localstack import LocalStack
from tests.integration.limiter_support import server_day, settings_for

TIMEOUT = 0.5  # RATE_LIMIT_REDIS_SOCKET_TIMEOUT for these tests
RESET = 0.5  # RATE_LIMIT_BREAKER_RESET
CEILING = 200.0  # RATE_LIMIT_LOCAL_CEILING_PER_SEC
QUOTA = Quota(rate_per_sec=10**6, burst=10**6, daily_limit=10**9)


@dataclass
class Call:
    started: float
    took: float
    allowed: bool
    degraded: bool
    reason: str


def make_limiter(flavor: str, settings: Any) -> Any:
    """A limiter built as ``from_settings`` does, with a breaker that records when it opened
    (``opened``), when a success was about to close it (``closing``) and each answer to "may
    this call go to Redis?" with the times it was asked and answered (``asked``)."""
    opened: list[float] = []
    closing: list[float] = []
    asked: list[tuple[float, bool, float]] = []

    def on_change(old: BreakerState, new: BreakerState) -> None:
        if new == "open":
            opened.append(time.monotonic())

    breaker = CircuitBreaker(
        settings.rate_limit_breaker_failures,
        settings.rate_limit_breaker_reset,
        on_change=on_change,
    )
    allow = breaker.allow

    def recording_allow() -> bool:
        at = time.monotonic()  # before: a call let through at or after an opening is a probe
        allowed = allow()
        asked.append((at, allowed, time.monotonic()))
        return allowed

    record_success = breaker.record_success

    def recording_success() -> None:
        if breaker.state != "closed":
            closing.append(time.monotonic())  # before: an answer given before it was not closed
        record_success()

    breaker.allow = recording_allow  # type: ignore[method-assign]
    breaker.record_success = recording_success  # type: ignore[method-assign]
    kwargs = dict(
        fail_mode=settings.rate_limit_fail_mode,
        breaker=breaker,
        local_limiter=LocalLimiter(settings.rate_limit_local_ceiling_per_sec),
    )
    if flavor == "sync":
        limiter: Any = RateLimiter(redis_from_settings(settings), **kwargs)
    else:
        limiter = AsyncRateLimiter(async_redis_from_settings(settings), **kwargs)
    limiter.opened = opened
    limiter.closing = closing
    limiter.asked = asked
    return limiter


def sync_load(limiter: RateLimiter, tenant: str, stop: threading.Event, calls: list[Call]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        d = limiter.acquire(tenant, 1, QUOTA)
        calls.append(Call(t0, time.monotonic() - t0, d.allowed, d.degraded, d.reason))
        time.sleep(0.002)


async def async_load(
    limiter: AsyncRateLimiter, tenant: str, stop: asyncio.Event, calls: list[Call]
) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        d = await limiter.acquire(tenant, 1, QUOTA)
        calls.append(Call(t0, time.monotonic() - t0, d.allowed, d.degraded, d.reason))
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_restart_while_idle_costs_no_decision(
    dedicated_stack: LocalStack, tenant: str, flavor: str
) -> None:
    """Redis restarted while the limiter sat idle: its kept connection is dead, and the next
    decision goes out on a fresh one instead of failing (no degraded answer, breaker closed)."""
    url = dedicated_stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
    settings = settings_for("single", url=url, rate_limit_redis_socket_timeout=TIMEOUT)
    limiter = make_limiter(flavor, settings)

    async def acquire() -> Any:
        if flavor == "sync":
            return await asyncio.to_thread(limiter.acquire, tenant, 1, QUOTA)
        return await limiter.acquire(tenant, 1, QUOTA)

    assert not (await acquire()).degraded
    await asyncio.to_thread(dedicated_stack.kill, "redis", "redis")
    await asyncio.to_thread(dedicated_stack.restart_member, "redis", "redis")
    await asyncio.sleep(0.2)  # idle for longer than the sync limiter's IDLE_CHECK_SECONDS
    after = await acquire()
    assert after.allowed and not after.degraded, after
    assert limiter.breaker.state == "closed"
    if flavor == "async":
        await limiter.redis.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["sync", "async"])
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
async def test_redis_stopped_mid_load(
    dedicated_stack: LocalStack, tenant: str, fail_mode: str, flavor: str
) -> None:
    url = dedicated_stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
    settings = settings_for(
        "single",
        url=url,
        rate_limit_fail_mode=fail_mode,
        rate_limit_redis_socket_timeout=TIMEOUT,
        rate_limit_redis_connect_timeout=TIMEOUT,
        rate_limit_breaker_failures=3,
        rate_limit_breaker_reset=RESET,
        rate_limit_local_ceiling_per_sec=CEILING,
    )
    limiter = make_limiter(flavor, settings)
    calls: list[Call] = []
    if flavor == "sync":
        stop: Any = threading.Event()
        workers: list[Any] = [
            threading.Thread(target=sync_load, args=(limiter, tenant, stop, calls))
            for _ in range(4)
        ]
        for w in workers:
            w.start()
    else:
        stop = asyncio.Event()
        workers = [asyncio.create_task(async_load(limiter, tenant, stop, calls)) for _ in range(4)]

    await asyncio.sleep(0.5)
    killed_at = time.monotonic()
    await asyncio.to_thread(dedicated_stack.kill, "redis", "redis")
    await asyncio.sleep(1.5)
    restarted_at = time.monotonic()  # Redis answers nothing before this
    await asyncio.to_thread(dedicated_stack.restart_member, "redis", "redis")
    back_at = time.monotonic()  # Redis answers from here on (and perhaps a while before)
    while time.monotonic() - back_at < 5 and not any(
        c.started > back_at and not c.degraded for c in list(calls)
    ):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    stop.set()
    if flavor == "sync":
        for w in workers:
            await asyncio.to_thread(w.join)
    else:
        await asyncio.gather(*workers)
        await limiter.redis.aclose()

    before = [c for c in calls if c.started + c.took < killed_at]
    assert before and all(c.allowed and not c.degraded for c in before)

    assert limiter.opened, "the breaker never opened"
    opened_at = limiter.opened[0]
    outage = [c for c in calls if opened_at <= c.started < back_at]
    # Once the breaker is open, no call waits for Redis but its probes: one at a time, each
    # failed one reopening it (the last may be the one that finds Redis back). Until it
    # closed: Redis may answer well before restart_member returns.
    until = min([at for at in limiter.closing if at > opened_at] + [back_at])
    asked = [allowed for at, allowed, done in limiter.asked if opened_at <= at and done < until]
    probes = sum(asked)
    reopened = sum(opened_at < at for at in limiter.opened)  # a probe may fail after back_at
    assert probes <= reopened + 1, (probes, reopened)
    # Most decisions of the outage were answered at once, without going to Redis.
    assert len(asked) - probes > probes, (len(asked), probes)
    down = [c for c in outage if c.started + c.took < restarted_at]  # over before Redis was
    assert down and all(c.degraded for c in down)
    degraded = [c for c in outage if c.degraded]
    if fail_mode == "open":
        assert {c.reason for c in degraded} <= {"redis_down", "local_ceiling"}
        assert sum(c.allowed for c in degraded) > 0
        # The per-process ceiling still holds: CEILING per second plus one burst.
        span = max(c.started for c in degraded) - min(c.started for c in degraded)
        assert sum(c.allowed for c in degraded) <= CEILING * (span + 1) + 1
    else:
        assert all(not c.allowed and c.reason == "redis_down" for c in degraded)

    # Decisions resume with the first call let through to Redis once it answers again: that
    # call finds it (the breaker does not open after it), and every call started after it
    # returned is decided by Redis. (How soon it comes is the breaker's reset, tested on the
    # breaker's own clock in the unit tests.)
    first = min(at for at, allowed, _ in limiter.asked if allowed and at >= back_at)
    assert not [at for at in limiter.opened if at > first], "opened again with Redis back"
    spanning = [c for c in calls if c.started <= first <= c.started + c.took]
    assert any(c.allowed and not c.degraded for c in spanning), spanning
    probe_ended = max(c.started + c.took for c in spanning)
    after = [c for c in calls if c.started > probe_ended]
    assert after and not [c for c in after if c.degraded], after


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_sentinel_failover_the_limiter_carries_on_with_the_promoted_replica(
    dedicated_stack: LocalStack, tenant: str, flavor: str
) -> None:
    env = dedicated_stack.up(["redis-sentinel"])
    settings = settings_for(
        "sentinel",
        sentinels=env["RATE_LIMIT_REDIS_SENTINELS"],
        master=env["RATE_LIMIT_REDIS_SENTINEL_MASTER"],
        rate_limit_redis_socket_timeout=TIMEOUT,
        rate_limit_breaker_reset=RESET,
    )
    limiter = make_limiter(flavor, settings)

    async def acquire() -> Any:
        d = limiter.acquire(tenant, 1, QUOTA)
        return await d if flavor == "async" else d

    for _ in range(10):
        assert not (await acquire()).degraded
    master = redis_from_settings(settings)
    assert master.execute_command("WAIT", 1, 5000) == 1  # the replica has all 10
    old_port = master.connection_pool.get_master_address()[1]
    dedicated_stack.kill("redis-sentinel", "master")

    deadline = time.monotonic() + 40
    decision = await acquire()
    while decision.degraded and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        decision = await acquire()
    assert not decision.degraded, "no decision from Redis within 40 s of the failover"
    assert master.connection_pool.get_master_address()[1] != old_port
    assert decision.daily_used == 11  # the promoted replica carries the day on
    assert (await acquire()).daily_used == 12
    if flavor == "async":
        await limiter.redis.aclose()


@pytest.mark.parametrize("service", ["redis", "redis-cluster"])
async def test_scripts_are_reloaded_after_script_flush(
    dedicated_stack: LocalStack, tenant: str, service: str
) -> None:
    env = dedicated_stack.up([service])
    if service == "redis":
        settings = settings_for("single", url=env["RATE_LIMIT_REDIS_URL"])
    else:
        settings = settings_for("cluster", cluster=env["RATE_LIMIT_REDIS_CLUSTER_NODES"])
    raw = redis_from_settings(settings)
    sync_limiter = RateLimiter(redis_from_settings(settings))
    async_client = async_redis_from_settings(settings)
    async_limiter = AsyncRateLimiter(async_client)
    day = server_day(raw, token_bucket_key(tenant))

    assert sync_limiter.acquire(tenant, 1, QUOTA).daily_used == 1
    assert (await async_limiter.acquire(tenant, 1, QUOTA)).daily_used == 2
    raw.script_flush()  # on a Cluster: every primary
    assert sync_limiter.acquire(tenant, 1, QUOTA).daily_used == 3
    raw.script_flush()
    # A whole pipelined batch meets NOSCRIPT; every call in it still counts exactly once.
    batch = await asyncio.gather(*(async_limiter.acquire(tenant, 1, QUOTA) for _ in range(50)))
    assert sorted(d.daily_used for d in batch) == list(range(4, 54))
    assert not any(d.degraded for d in batch)
    assert int(raw.get(daily_counter_key(tenant, day))) == 53
    await async_client.aclose()


def wait_until_busy(url: str, timeout: float = 10.0) -> None:
    """Until Redis answers another client BUSY: the slow script runs and is past
    ``busy-reply-threshold``, so every call now meets the refusal (however long it took)."""
    probe = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                probe.ping()
            except redis.ResponseError as exc:
                if "BUSY" in str(exc):
                    return
                raise
            assert time.monotonic() < deadline, f"Redis did not answer BUSY within {timeout} s"
            time.sleep(0.005)
    finally:
        probe.close()


async def _acquire(limiter: Any, tenant: str) -> Any:
    if isinstance(limiter, RateLimiter):
        return await asyncio.to_thread(limiter.acquire, tenant, 1, QUOTA)
    return await limiter.acquire(tenant, 1, QUOTA)


@pytest.mark.parametrize("flavor", ["sync", "async"])
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
@pytest.mark.parametrize("refusal", ["OOM", "BUSY"])
async def test_a_redis_that_refuses_writes_gets_the_fail_mode_not_an_error(
    dedicated_stack: LocalStack, tenant: str, fail_mode: str, flavor: str, refusal: str
) -> None:
    """Reachable but refusing every write (maxmemory reached with noeviction: ``OOM``; a slow
    script running: ``BUSY``), Redis cannot count: the limiter answers by its fail mode, as when
    Redis is down, instead of raising the error reply into the request (a 500)."""
    url = dedicated_stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
    settings = settings_for(
        "single",
        url=url,
        rate_limit_fail_mode=fail_mode,
        rate_limit_breaker_failures=100,  # every call reaches Redis and gets the refusal
        rate_limit_local_ceiling_per_sec=CEILING,
    )
    limiter = make_limiter(flavor, settings)
    admin = redis.Redis.from_url(url)
    assert (await _acquire(limiter, tenant)).allowed  # scripts loaded, counters made
    busy: threading.Thread | None = None
    if refusal == "OOM":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
    else:
        admin.config_set("busy-reply-threshold", 50)
        killed: list[BaseException] = []

        def run_a_slow_script() -> None:
            try:
                redis.Redis.from_url(url).eval("while true do end", 0)
            except redis.ResponseError as exc:  # ended by SCRIPT KILL below
                killed.append(exc)

        busy = threading.Thread(target=run_a_slow_script, daemon=True)
        busy.start()
        await asyncio.to_thread(wait_until_busy, url)
    try:
        refused = await _acquire(limiter, tenant)
    finally:
        if busy is not None:
            admin.script_kill()
            busy.join(5)
            assert killed, "the slow script was not running"
        admin.config_set("maxmemory", 0)
    assert refused.degraded and refused.reason in {"redis_down", "local_ceiling"}, refused
    assert refused.allowed is (fail_mode == "open")
    after = await _acquire(limiter, tenant)
    assert after.allowed and not after.degraded, after
    if flavor == "async":
        await limiter.redis.aclose()
    admin.close()


async def test_a_cluster_that_cannot_be_reached_gets_the_fail_mode_not_an_error(
    dedicated_stack: LocalStack, tenant: str
) -> None:
    """Every node of a Redis Cluster down: once redis-py's topology refresh reaches no node it
    gives up with ``RedisClusterUnreachableError``, a ``RedisClusterException`` and not a
    ``RedisError``. Both limiters answer by their fail mode and count the failure towards the
    breaker, a settle reports nothing applied; limiters built from the settings while the
    cluster is down are built all the same, decide by their fail mode, and decide from Redis
    again once the cluster is back. (One cluster for every case: it takes seconds to form.)"""
    nodes = dedicated_stack.up(["redis-cluster"])["RATE_LIMIT_REDIS_CLUSTER_NODES"]

    def settings(fail_mode: str, **extra: Any) -> Any:
        return settings_for(
            "cluster",
            cluster=nodes,
            rate_limit_fail_mode=fail_mode,
            rate_limit_redis_socket_timeout=TIMEOUT,
            rate_limit_redis_connect_timeout=TIMEOUT,
            rate_limit_local_ceiling_per_sec=CEILING,
            **extra,
        )

    async def settle(limiter: Any) -> Any:
        result = limiter.settle(tenant, 1, 2, QUOTA)
        return await result if isinstance(limiter, AsyncRateLimiter) else result

    limiters = {
        (flavor, mode): make_limiter(flavor, settings(mode, rate_limit_breaker_failures=5))
        for flavor in ("sync", "async")
        for mode in ("open", "closed")
    }
    for limiter in limiters.values():
        assert not (await _acquire(limiter, tenant)).degraded
    for member in ("node0", "node1", "node2"):
        await asyncio.to_thread(dedicated_stack.kill, "redis-cluster", member)
    # redis-py refreshes the topology at most once a second; the refresh that reaches no node
    # turns the connection errors after it into RedisClusterUnreachableError.
    await asyncio.sleep(1.1)

    for (flavor, mode), limiter in limiters.items():
        decisions = [await _acquire(limiter, tenant) for _ in range(4)]
        assert all(d.degraded and d.reason == "redis_down" for d in decisions), (flavor, mode)
        assert all(d.allowed is (mode == "open") for d in decisions), (flavor, mode)
        assert not (await settle(limiter)).applied
        # The 5th failure (the settle) opens the breaker of the tenant's master: the client
        # keeps the slot map it had, so each master's breaker counts its own failures.
        assert limiter.policy.breaker_of(tenant).state == "open", (flavor, mode)

    # Built while every node is down (the sync cluster client connects on first use).
    lazy_settings = settings("closed", rate_limit_breaker_reset=RESET)
    lazy = [RateLimiter.from_settings(lazy_settings), AsyncRateLimiter.from_settings(lazy_settings)]
    for limiter in lazy:
        refused = await _acquire(limiter, tenant)
        assert refused.degraded and not refused.allowed and refused.reason == "redis_down"

    for member in ("node0", "node1", "node2"):
        await asyncio.to_thread(dedicated_stack.restart_member, "redis-cluster", member)
    for limiter in lazy:
        deadline = time.monotonic() + 15
        decision = await _acquire(limiter, tenant)
        while decision.degraded and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            decision = await _acquire(limiter, tenant)
        assert decision.allowed and not decision.degraded, decision
    for limiter in [*limiters.values(), *lazy]:
        if isinstance(limiter, AsyncRateLimiter):
            await limiter.redis.aclose()

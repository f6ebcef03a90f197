"""The async limiter's pipelined batches on a Redis Cluster hold calls for several masters: each
call gets its own master's outcome. A dead master fails only its own calls; the calls that ran
on the healthy ones are answered from Redis (their units are counted there), and a slot that
moved is still followed (MOVED). Each test has its own Cluster (``dedicated_stack``): one kills
a master, the other moves a slot."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY
from redis.cluster import key_slot

from limiter import AsyncRateLimiter, Quota
from limiter.breaker import CircuitBreaker
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.redis_factory import async_redis_from_settings
from metering.localstack import LocalStack
from tests.integration.limiter_support import ClusterAdmin, server_day, settings_for

QUOTA = Quota(rate_per_sec=10**6, burst=10**6, daily_limit=10**9)
CALLS_EACH = 2  # calls per tenant in the batch


def batches() -> tuple[float, float]:
    """How many batches the async limiters sent so far, and how many calls they held."""
    count = REGISTRY.get_sample_value("rate_limiter_batch_size_count") or 0.0
    total = REGISTRY.get_sample_value("rate_limiter_batch_size_sum") or 0.0
    return count, total


async def one_batch(limiter: AsyncRateLimiter, tenants: list[str]) -> dict[str, list[Any]]:
    """``CALLS_EACH`` acquires per tenant, gathered so that they share one pipelined batch
    (checked by the batch-size metric): tenant -> its decisions."""
    count, total = batches()
    calls = [t for t in tenants for _ in range(CALLS_EACH)]
    decisions = await asyncio.gather(*(limiter.acquire(t, 1, QUOTA) for t in calls))
    assert batches() == (count + 1, total + len(calls)), "the calls did not share one batch"
    out: dict[str, list[Any]] = {t: [] for t in tenants}
    for t, d in zip(calls, decisions, strict=True):
        out[t].append(d)
    return out


async def test_a_dead_master_fails_only_its_own_calls_of_a_batch(
    dedicated_stack: LocalStack, tenant: str
) -> None:
    """One master killed; one batch holds calls for a tenant on it and for tenants on the two
    healthy masters. Fail closed: the dead master's calls are refused as Redis failures; the
    healthy masters' calls ran there, so they are answered from Redis (not refused while their
    units were counted), with the day counters they left."""
    nodes = dedicated_stack.up(["redis-cluster"])["RATE_LIMIT_REDIS_CLUSTER_NODES"]
    admin = ClusterAdmin(dedicated_stack)
    for r in admin.nodes.values():  # the healthy masters go on serving their slots
        r.config_set("cluster-require-full-coverage", "no")
    on = admin.tenant_per_master(tenant)
    victim, *healthy = sorted(on)
    settings = settings_for(
        "cluster",
        cluster=nodes,
        rate_limit_redis_socket_timeout=0.5,
        rate_limit_redis_connect_timeout=0.5,
    )
    # A breaker that does not open here: every call of the batch goes to Redis.
    limiter = AsyncRateLimiter(
        async_redis_from_settings(settings), fail_mode="closed", breaker=CircuitBreaker(100)
    )
    warm = await asyncio.gather(*(limiter.acquire(t, 1, QUOTA) for t in on.values()))
    assert all(d.allowed and not d.degraded and d.daily_used == 1 for d in warm), warm
    day = server_day(admin.nodes[healthy[0]], token_bucket_key(on[healthy[0]]))

    await asyncio.to_thread(dedicated_stack.kill, "redis-cluster", victim)
    # The first call finds the dead master's connection closed; the batch below connects anew.
    first = await limiter.acquire(on[victim], 1, QUOTA)
    assert first.degraded and not first.allowed, first

    decided = await one_batch(limiter, [on[m] for m in sorted(on)])
    for d in decided[on[victim]]:
        assert d.degraded and not d.allowed and d.reason == "redis_down", d
    for member in healthy:
        t = on[member]
        assert [(d.allowed, d.degraded) for d in decided[t]] == [(True, False)] * CALLS_EACH, (
            member,
            decided[t],
        )
        assert sorted(d.daily_used for d in decided[t]) == [2, 3]
        assert int(admin.nodes[member].get(daily_counter_key(t, day)) or 0) == 3
    await limiter.redis.aclose()
    admin.close()


async def test_a_batch_follows_a_slot_that_moved(dedicated_stack: LocalStack, tenant: str) -> None:
    """A tenant's slot moves to another master after the limiter read the slot map: its calls,
    grouped by the old map, are redirected (MOVED) and counted on the new master, in the same
    batch as calls for the other masters."""
    nodes = dedicated_stack.up(["redis-cluster"])["RATE_LIMIT_REDIS_CLUSTER_NODES"]
    admin = ClusterAdmin(dedicated_stack)
    on = admin.tenant_per_master(tenant)
    source, target, _ = sorted(on)
    moved = on[source]
    limiter = AsyncRateLimiter(async_redis_from_settings(settings_for("cluster", cluster=nodes)))
    warm = await asyncio.gather(*(limiter.acquire(t, 1, QUOTA) for t in on.values()))
    assert all(d.allowed and not d.degraded and d.daily_used == 1 for d in warm), warm
    day = server_day(admin.nodes[source], token_bucket_key(moved))

    slot = key_slot(token_bucket_key(moved).encode())
    src, dst = admin.nodes[source], admin.nodes[target]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", admin.ids[source])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", admin.ids[target])
    keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
    assert keys
    src.execute_command(
        "MIGRATE", "127.0.0.1", admin.ports[target], "", 0, 5000, "KEYS", *keys
    )  # fmt: skip
    for r in admin.nodes.values():
        r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", admin.ids[target])
    assert admin.owner(moved, via=target) == target

    decided = await one_batch(limiter, [on[m] for m in sorted(on)])
    for t, ds in decided.items():
        assert [(d.allowed, d.degraded) for d in ds] == [(True, False)] * CALLS_EACH, (t, ds)
        assert sorted(d.daily_used for d in ds) == [2, 3], t
    assert int(dst.get(daily_counter_key(moved, day)) or 0) == 3
    await limiter.redis.aclose()
    admin.close()

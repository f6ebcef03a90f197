"""The limiter on a Redis Cluster while the slot of a tenant's keys is being migrated.

While a slot is MIGRATING, its node refuses a multi-key command whose keys are not all there
(``TRYAGAIN``). A call that declared the rolling window's keys for a tenant without a window
(keys that never exist) was refused for the whole migration: every decision of that tenant
degraded (refused, with ``closed``). A call declares only the keys it may touch, so the
tenant's decisions go on from the source node. The slot is put back as it was afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import key_slot

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from tests.integration.limiter_support import server_day, settings_for

QUOTA = Quota(rate_per_sec=1000.0, burst=100, daily_limit=1000)


def node(address: str) -> redis.Redis:
    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port))


def slot_owner(nodes: list[redis.Redis], slot: int) -> redis.Redis:
    for n in nodes:
        for start, end, master, *_ in n.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                host, port = master[0], master[1]
                host = host.decode() if isinstance(host, bytes) else host
                return redis.Redis(host=host, port=int(port))
    raise AssertionError(f"no node owns slot {slot}")


@pytest.fixture
def migrating(
    redis_cluster_nodes: str, tenant: str
) -> Iterator[tuple[redis.Redis, int, Callable[[], None]]]:
    """(owner, slot, start) of the tenant's slot: ``start()`` puts it in MIGRATING on its owner
    (IMPORTING on another master); it is STABLE again afterwards."""
    nodes = [node(a) for a in redis_cluster_nodes.split(",")]
    slot = key_slot(token_bucket_key(tenant).encode())
    source = slot_owner(nodes, slot)
    source_id = source.execute_command("CLUSTER MYID")
    masters = {
        (m[0].decode() if isinstance(m[0], bytes) else m[0], int(m[1]))
        for n in nodes[:1]
        for _, _, m, *_ in n.execute_command("CLUSTER SLOTS")
    }
    src_addr = source.connection_pool.connection_kwargs
    target = next(
        redis.Redis(host=h, port=p)
        for h, p in sorted(masters)
        if (h, p) != (src_addr["host"], src_addr["port"])
    )
    target_id = target.execute_command("CLUSTER MYID")
    started: list[bool] = []

    def start() -> None:
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        started.append(True)

    try:
        yield source, slot, start
    finally:
        if started:
            source.execute_command("CLUSTER SETSLOT", slot, "STABLE")
            target.execute_command("CLUSTER SETSLOT", slot, "STABLE")


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_tenant_without_a_window_is_decided_while_its_slot_migrates(
    redis_cluster_nodes: str, tenant: str, migrating: Any, flavor: str
) -> None:
    source, slot, start = migrating
    s = settings_for("cluster", cluster=redis_cluster_nodes)
    if flavor == "sync":
        limiter: Any = RateLimiter(redis_from_settings(s), fail_mode="closed")

        async def acquire() -> Any:
            return await asyncio.to_thread(limiter.acquire, tenant, 1, QUOTA)
    else:
        limiter = AsyncRateLimiter(async_redis_from_settings(s), fail_mode="closed")

        async def acquire() -> Any:
            return await limiter.acquire(tenant, 1, QUOTA)

    try:
        first = await acquire()  # the bucket and the day's counter now exist on the source
        assert first.allowed and not first.degraded, first
        start()
        during = [await acquire() for _ in range(5)]
        assert [(d.allowed, d.degraded) for d in during] == [(True, False)] * 5, during
        assert during[-1].daily_used == 6
        day = server_day(source)
        assert int(source.get(daily_counter_key(tenant, day))) == 6
        assert key_slot(daily_counter_key(tenant, day).encode()) == slot
    finally:
        if flavor == "async":
            await limiter.redis.aclose()
        else:
            limiter.redis.close()

"""On a Redis Cluster each master has a circuit breaker of its own: a dead master sends its own
tenants to the fail mode and nobody else. With one breaker for the whole Cluster, the dead
master's failures opened it for every tenant until a replica took over (an audit killed a
master whose replica was promoted 3.6 s later: 332 of 1,076 decisions of a tenant on a healthy
master were degraded). Each test has its own Cluster (``dedicated_stack``) and kills a master;
the breakers' reset is long, so one that opened stays open for the whole test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import key_slot

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.breaker import CircuitBreaker
from limiter.decision import Decision
from limiter.keys import daily_counter_key, token_bucket_key
from limiter.quotas import QuotaCache, quota_cache_key
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.localstack import LocalStack
from metering.quota_db import QuotaStore, migrate
from tests.integration.limiter_support import ClusterAdmin, server_day, settings_for

QUOTA = Quota(rate_per_sec=10**6, burst=10**6, daily_limit=10**9)
ROUNDS = 6
THRESHOLD = 2  # failures that open a breaker


@pytest.fixture
def cluster(dedicated_stack: LocalStack) -> Iterator[tuple[str, ClusterAdmin]]:
    """A Cluster of three masters whose healthy masters go on serving when one is dead."""
    nodes = dedicated_stack.up(["redis-cluster"])["RATE_LIMIT_REDIS_CLUSTER_NODES"]
    admin = ClusterAdmin(dedicated_stack)
    for r in admin.nodes.values():
        r.config_set("cluster-require-full-coverage", "no")
    yield nodes, admin
    admin.close()


def make_limiter(flavour: str, nodes: str, quotas: Any = None) -> Any:
    settings = settings_for(
        "cluster",
        cluster=nodes,
        rate_limit_redis_socket_timeout=0.5,
        rate_limit_redis_connect_timeout=0.5,
    )
    kind = RateLimiter if flavour == "sync" else AsyncRateLimiter
    client = (
        redis_from_settings(settings, lazy=True)
        if flavour == "sync"
        else async_redis_from_settings(settings)
    )
    return kind(client, quotas, fail_mode="closed", breaker=CircuitBreaker(THRESHOLD, 600.0))


async def decide(limiter: Any, tenant: str, quota: Quota | None = QUOTA) -> Decision:
    if isinstance(limiter, AsyncRateLimiter):
        return await limiter.acquire(tenant, 1, quota)
    return await asyncio.to_thread(limiter.acquire, tenant, 1, quota)


async def close(limiter: Any) -> None:
    if isinstance(limiter, AsyncRateLimiter):
        await limiter.redis.aclose()
    else:
        limiter.redis.close()


def address(admin: ClusterAdmin, member: str) -> str:
    """A member's name as the cluster client knows its nodes."""
    return f"127.0.0.1:{admin.ports[member]}"


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_dead_master_sends_only_its_own_tenants_to_the_fail_mode(
    cluster: tuple[str, ClusterAdmin], dedicated_stack: LocalStack, tenant: str, flavour: str
) -> None:
    """One master killed, fail closed. Each round the dead master's tenant decides first,
    ``THRESHOLD`` times in a row (as its failures come under concurrent load), then a tenant on
    each healthy master. The dead master's tenant is refused as a Redis failure, and its breaker
    opens (a success of another master's tenant does not reset it); the others are decided by
    Redis in every round, their units counted there. With one breaker, the first round's
    failures opened it and the healthy masters' tenants were refused."""
    nodes, admin = cluster
    on = admin.tenant_per_master(tenant)
    victim, *healthy = sorted(on)
    limiter = make_limiter(flavour, nodes)
    for member in sorted(on):  # the client now has the slot map
        warm = await decide(limiter, on[member])
        assert warm.allowed and not warm.degraded, warm
    day = server_day(admin.nodes[healthy[0]], token_bucket_key(on[healthy[0]]))

    await asyncio.to_thread(dedicated_stack.kill, "redis-cluster", victim)
    decided: dict[str, list[Decision]] = {t: [] for t in on.values()}
    for _ in range(ROUNDS):
        for member in [victim] * THRESHOLD + healthy:
            decided[on[member]].append(await decide(limiter, on[member]))

    assert len(decided[on[victim]]) == THRESHOLD * ROUNDS
    for d in decided[on[victim]]:
        assert d.degraded and not d.allowed and d.reason == "redis_down", d
    for member in healthy:
        t = on[member]
        assert [(d.allowed, d.degraded) for d in decided[t]] == [(True, False)] * ROUNDS, (
            member,
            decided[t],
        )
        assert [d.daily_used for d in decided[t]] == list(range(2, ROUNDS + 2))
        assert int(admin.nodes[member].get(daily_counter_key(t, day)) or 0) == ROUNDS + 1
    masters = limiter.policy.masters
    assert masters.by_master[address(admin, victim)].state == "open"
    assert {masters.by_master[address(admin, m)].state for m in healthy} == {"closed"}
    assert limiter.breaker.state == "closed"  # the Cluster's own: no call failed unplaced
    await close(limiter)


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_quota_read_failing_on_a_dead_master_leaves_a_tenant_of_a_healthy_one_decided(
    cluster: tuple[str, ClusterAdmin],
    dedicated_stack: LocalStack,
    tmp_path: Path,
    tenant: str,
    flavour: str,
) -> None:
    """A tenant's quota entry (no hash tag) lives on one master, its limiter keys on another.
    With the first dead, the quota read fails there and the quota comes from the DB; the
    decision goes on to the tenant's own, healthy master and is decided by Redis. With one
    breaker, the failed read made the decision degraded (and a few such reads opened the
    breaker for everyone)."""
    nodes, admin = cluster
    via = next(iter(admin.nodes))
    victim = admin.owner(tenant + "-0", via)

    def quota_on(t: str) -> str:
        slot = key_slot(quota_cache_key(t).encode())
        return admin.owner_of_slot(slot, via)

    split = next(
        t
        for t in (f"{tenant}-{i}" for i in range(10_000))
        if quota_on(t) == victim and admin.owner(t, via) != victim
    )
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate(url)
    store = QuotaStore(url)
    store.set_quota(split, rate_per_sec=1000.0, burst=77, daily_limit=10_000)
    settings = settings_for("cluster", cluster=nodes)
    cache = QuotaCache(store, redis_from_settings(settings))
    limiter = make_limiter(flavour, nodes, cache)
    warm = await decide(limiter, tenant + "-0", QUOTA)  # the limiter's client has the slot map
    assert warm.allowed and not warm.degraded, warm

    await asyncio.to_thread(dedicated_stack.kill, "redis-cluster", victim)
    decided = [await decide(limiter, split, None) for _ in range(ROUNDS)]
    assert [(d.allowed, d.degraded) for d in decided] == [(True, False)] * ROUNDS, decided
    assert {d.limit for d in decided} == {77}  # the tenant's own quota, read from the DB
    assert [d.daily_used for d in decided] == list(range(1, ROUNDS + 1))
    assert limiter.breaker.state == "closed"
    await close(limiter)
    cache.redis.close()  # type: ignore[union-attr]
    store.close()

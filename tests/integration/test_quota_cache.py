"""The quota lookup against real Redis and real quota DBs (SQLite and PostgreSQL).

Layers in order (local, Redis ``tenant_quota_cache:<tenant>``, DB with write-back), the hit and
miss counters per layer, changes applied by other processes within a second through pub/sub.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import text

from limiter.quota import Quota
from limiter.quota_provider import UnknownTenant
from limiter.quotas import (
    INVALIDATION_CHANNEL,
    QuotaAdmin,
    QuotaCache,
    encode_quota,
    quota_cache_key,
)
from metering.quota_db import QuotaStore, migrate


def counts() -> dict[str, float]:
    out = {}
    for kind in ("hits", "misses"):
        for layer in ("local", "redis", "db"):
            value = REGISTRY.get_sample_value(f"tenant_quota_cache_{kind}_total", {"layer": layer})
            out[f"{kind}.{layer}"] = value or 0.0
    return out


def delta(before: dict[str, float]) -> dict[str, float]:
    after = counts()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store(quota_db_url: str) -> Iterator[QuotaStore]:
    migrate(quota_db_url)
    s = QuotaStore(quota_db_url)
    yield s
    s.close()


def wait_until_subscribed(servers: list[redis.Redis], name: str) -> None:
    """Until the client named ``name`` has subscribed on one of ``servers``: a change published
    before is lost to it, and a started listener may not have (``start`` returns after 2 s
    without, and its SUBSCRIBE may still be on its way to the server)."""
    deadline = time.monotonic() + 10
    while not any(
        c["name"] == name and int(c["sub"]) > 0 for server in servers for c in server.client_list()
    ):
        assert time.monotonic() < deadline, f"{name} did not subscribe within 10 s"
        time.sleep(0.01)


@pytest.fixture
def cleanup(r: redis.Redis) -> Iterator[list[str]]:
    tenants: list[str] = []
    yield tenants
    if tenants:
        r.delete(*[quota_cache_key(t) for t in tenants])


def test_a_lookup_tries_memory_then_redis_then_the_db_and_writes_back(
    store: QuotaStore, r: redis.Redis, tenant: str, cleanup: list[str]
) -> None:
    cleanup.append(tenant)
    store.set_quota(tenant, rate_per_sec=3.0, burst=6, daily_limit=600)  # DB only, no Redis entry
    assert r.get(quota_cache_key(tenant)) is None
    first = QuotaCache(store, r, redis_ttl=30)

    before = counts()
    assert first.get(tenant).burst == 6
    assert delta(before) == {"misses.local": 1, "misses.redis": 1, "hits.db": 1}
    cached = json.loads(r.get(quota_cache_key(tenant)))  # written back
    assert (cached["burst"], cached["daily_limit"], cached["version"]) == (6, 600, 1)
    assert 0 < r.ttl(quota_cache_key(tenant)) <= 30

    second = QuotaCache(store, r)  # another process: its memory is empty, Redis answers
    before = counts()
    assert second.get(tenant).burst == 6
    assert delta(before) == {"misses.local": 1, "hits.redis": 1}

    before = counts()
    assert first.get(tenant).burst == 6
    assert second.get(tenant).burst == 6
    assert delta(before) == {"hits.local": 2}


def test_an_unknown_tenant_is_cached_as_unknown_in_redis_and_gets_the_policy(
    store: QuotaStore, r: redis.Redis, tenant: str, cleanup: list[str]
) -> None:
    cleanup.append(tenant)
    before = counts()
    assert QuotaCache(store, r, default_plan="pro").get(tenant).burst == 100
    assert delta(before) == {"misses.local": 1, "misses.redis": 1, "misses.db": 1}
    assert json.loads(r.get(quota_cache_key(tenant))) == {"unknown": True}
    strict = QuotaCache(store, r, unknown_tenant="reject")
    before = counts()
    with pytest.raises(UnknownTenant):
        strict.get(tenant)  # answered by Redis: the DB is not asked again
    assert delta(before) == {"misses.local": 1, "hits.redis": 1}


def test_a_corrupt_redis_entry_is_ignored_and_the_db_answers(
    store: QuotaStore, r: redis.Redis, tenant: str, cleanup: list[str]
) -> None:
    cleanup.append(tenant)
    store.set_quota(tenant, plan="pro", burst=9)
    r.set(quota_cache_key(tenant), b'{"burst": -1}', ex=30)
    before = counts()
    assert QuotaCache(store, r).get(tenant).burst == 9
    assert delta(before) == {"misses.local": 1, "misses.redis": 1, "hits.db": 1}


def set_limits_around_the_code(store: QuotaStore, tenant: str, window_seconds: int) -> None:
    """Give a tenant's row a window length the DB's constraints accept and the limiter does not
    (longer than a day), by SQL, as an operator might."""
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE tenants SET window_limit = 100, window_seconds = :w WHERE id = :t"),
            {"w": window_seconds, "t": tenant},
        )


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_db_row_the_limiter_cannot_use_is_a_failed_source_and_never_cached(
    store: QuotaStore,
    r: redis.Redis,
    redis_url: str,
    tenant: str,
    cleanup: list[str],
    caplog: pytest.LogCaptureFixture,
    flavor: str,
) -> None:
    """A row that the DB accepts but the limiter cannot use is logged, naming the tenant and
    the problem, and treated as a source that failed: it is not written to Redis, a tenant seen
    before keeps its last quota, a newcomer gets the unknown-tenant policy (the default plan, or
    UnknownTenant with reject), and the lookup never raises the row's QuotaError."""
    import redis.asyncio as aioredis

    ar = aioredis.Redis.from_url(redis_url)

    def cache(**options: Any) -> QuotaCache:
        if flavor == "sync":
            return QuotaCache(store, r, **options)
        return QuotaCache(store, aredis=ar, **options)

    async def get(c: QuotaCache) -> Quota:
        return c.get(tenant) if flavor == "sync" else await c.aget(tenant)

    cleanup.append(tenant)
    store.set_quota(tenant, rate_per_sec=3.0, burst=6, daily_limit=600)
    seen_before = cache(local_ttl=0.1)
    assert (await get(seen_before)).burst == 6
    set_limits_around_the_code(store, tenant, 2 * 86400)
    r.delete(quota_cache_key(tenant))
    await asyncio.sleep(0.15)  # its local entry expired: the next lookup reads the DB
    caplog.clear()
    assert (await get(seen_before)).burst == 6
    assert (await get(cache(default_plan="pro"))).burst == 100
    with pytest.raises(UnknownTenant):
        await get(cache(unknown_tenant="reject"))

    assert r.get(quota_cache_key(tenant)) is None
    problems = [m for m in caplog.messages if tenant in m and "window_seconds" in m]
    assert len(problems) == 3, caplog.messages
    await ar.aclose()


def test_a_change_replaces_the_redis_entry_and_reaches_listening_caches(
    store: QuotaStore, redis_url: str, r: redis.Redis, tenant: str, cleanup: list[str]
) -> None:
    cleanup.append(tenant)
    name = f"quota-listener-{tenant}"
    admin = QuotaAdmin(store, r, redis_ttl=30)
    admin.set_quota(tenant, plan="free")
    listener = redis.Redis.from_url(redis_url, client_name=name)
    cache = QuotaCache(store, listener, local_ttl=3600).start()  # only an invalidation changes it
    try:
        assert cache.get(tenant).burst == 10
        wait_until_subscribed([r], name)
        pubsub = r.pubsub()
        pubsub.subscribe(INVALIDATION_CHANNEL)
        confirmed = pubsub.get_message(timeout=10)  # sent once the server has subscribed it
        assert confirmed and confirmed["type"] == "subscribe", confirmed
        record = admin.set_quota(tenant, burst=77)
        assert admin.last_published
        assert json.loads(r.get(quota_cache_key(tenant)))["burst"] == 77  # replaced, not deleted
        deadline = time.monotonic() + 5
        while cache.get(tenant).burst != 77:
            assert time.monotonic() < deadline, "the change never reached the cache"
            time.sleep(0.001)
        published = []  # what every other process received
        while not published:
            message = pubsub.get_message(timeout=1)
            assert time.monotonic() < deadline, "no invalidation was published"
            if message and json.loads(message["data"])["tenant"] == tenant:
                published.append(json.loads(message["data"]))
        assert published[0]["quota"]["version"] == record.version == 2
        assert published[0]["quota"]["burst"] == 77
        pubsub.close()

        admin.delete_tenant(tenant)  # a deleted tenant falls back to the unknown policy
        deadline = time.monotonic() + 5
        while cache.get(tenant).burst != 10:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        cache.close()
        listener.close()


CHILD = textwrap.dedent(
    """
    import sys, time, redis
    from limiter.quotas import QuotaCache
    from metering.quota_db import QuotaStore

    db_url, redis_url, tenant, name = sys.argv[1:5]
    client = redis.Redis.from_url(redis_url, client_name=name)
    cache = QuotaCache(QuotaStore(db_url), client, local_ttl=3600)
    published = []  # the bursts of the changes to this tenant the listener applied
    apply_change = cache.apply_change

    def recording(t, payload):
        if t == tenant:
            published.append(None if payload is None else payload["burst"])
        return apply_change(t, payload)

    cache.apply_change = recording
    cache.start()
    start = cache.get(tenant).burst
    print("ready", start, flush=True)
    deadline = time.time() + 10  # a harness deadline: the parent fails on what is printed
    while cache.get(tenant).burst == start and time.time() < deadline:
        time.sleep(0.0005)
    print("seen", cache.get(tenant).burst, *published, flush=True)
    cache.close()
    """
)


def test_a_change_in_one_process_is_applied_by_another_within_one_second(
    quota_db_url: str, store: QuotaStore, redis_url: str, tenant: str, cleanup: list[str]
) -> None:
    cleanup.append(tenant)
    name = f"quota-listener-{tenant}"
    r = redis.Redis.from_url(redis_url)
    admin = QuotaAdmin(store, r)
    admin.set_quota(tenant, plan="pro")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, quota_db_url, redis_url, tenant, name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["ready", "100"]
        wait_until_subscribed([r], name)
        admin.set_quota(tenant, burst=123)
        # The mechanism of the one second, not a stopwatch across processes: the other process
        # holds the quota locally for an hour, so it can only have the change from the
        # invalidation it received on the channel and applied; its listener applies a message
        # as it arrives (a blocking read), not on a timer.
        assert child.stdout.readline().split() == ["seen", "123", "123"]
    finally:
        child.wait(timeout=15)
        r.close()
    assert child.returncode == 0


def test_a_change_published_while_the_listener_was_disconnected_is_picked_up_on_reconnect(
    store: QuotaStore, redis_url: str, r: redis.Redis, tenant: str, cleanup: list[str]
) -> None:
    cleanup.append(tenant)
    name = f"quota-listener-{tenant}"
    QuotaAdmin(store, r).set_quota(tenant, plan="free")
    cache = QuotaCache(
        store, redis.Redis.from_url(redis_url, client_name=name), local_ttl=3600
    ).start()
    try:
        assert cache.get(tenant).burst == 10
        wait_until_subscribed([r], name)
        listener = [c for c in r.client_list() if c["name"] == name and "P" in c["flags"]]
        assert len(listener) == 1
        r.client_kill_filter(_id=listener[0]["id"])  # only this test's subscription
        record = store.set_quota(tenant, burst=55)  # the change, its publish lost in the gap:
        r.set(quota_cache_key(tenant), encode_quota(record), ex=30)  # Redis has it, no PUBLISH
        deadline = time.monotonic() + 10
        while cache.get(tenant).burst != 55:
            assert time.monotonic() < deadline, "the reconnect did not refresh the cache"
            time.sleep(0.01)
        assert cache.reconnects >= 1
    finally:
        cache.close()


async def test_the_async_path_reads_redis_and_applies_published_changes(
    store: QuotaStore, redis_url: str, tenant: str, cleanup: list[str]
) -> None:
    import redis.asyncio as aioredis

    cleanup.append(tenant)
    name = f"quota-listener-{tenant}"
    ar = aioredis.Redis.from_url(redis_url, client_name=name)
    cache = await QuotaCache(store, aredis=ar, local_ttl=3600).astart()
    admin = QuotaAdmin(store, aredis=ar)
    try:
        deadline = time.monotonic() + 10  # the listener is a task of this loop: await, not block
        while not any(c["name"] == name and int(c["sub"]) > 0 for c in await ar.client_list()):
            assert time.monotonic() < deadline, f"{name} did not subscribe within 10 s"
            await asyncio.sleep(0.01)
        await admin.aset_quota(tenant, plan="pro")
        before = counts()
        assert (await cache.aget(tenant)).burst == 100
        assert delta(before) == {"misses.local": 1, "hits.redis": 1}  # the admin wrote Redis
        await admin.aset_quota(tenant, burst=11)
        assert admin.last_published
        deadline = time.monotonic() + 5
        while (await cache.aget(tenant)).burst != 11:
            assert time.monotonic() < deadline, "the change never reached the async cache"
            await asyncio.sleep(0.001)
    finally:
        await cache.aclose()
        await ar.aclose()


def test_on_redis_cluster_a_change_is_cached_published_and_applied(
    store: QuotaStore, redis_cluster_nodes: str, tenant: str
) -> None:
    from redis.cluster import ClusterNode, RedisCluster

    nodes = [
        ClusterNode(h, int(p))
        for h, p in (n.rsplit(":", 1) for n in redis_cluster_nodes.split(","))
    ]
    name = f"quota-listener-{tenant}"
    writer = RedisCluster(startup_nodes=nodes)
    reader = RedisCluster(startup_nodes=nodes, client_name=name)
    members = [redis.Redis(host=n.host, port=n.port) for n in nodes]
    admin = QuotaAdmin(store, writer)
    cache = QuotaCache(store, reader, local_ttl=3600)
    try:
        admin.set_quota(tenant, plan="pro")
        assert admin.last_published
        cache.start()
        wait_until_subscribed(members, name)  # on whichever node its connection went to
        before = counts()
        assert cache.get(tenant).burst == 100
        assert delta(before) == {"misses.local": 1, "hits.redis": 1}
        admin.set_quota(tenant, burst=5)
        deadline = time.monotonic() + 5
        while cache.get(tenant).burst != 5:
            assert time.monotonic() < deadline, "the change never reached the cache"
            time.sleep(0.001)
    finally:
        cache.close()
        writer.delete(quota_cache_key(tenant))
        writer.close()
        reader.close()
        for member in members:
            member.close()

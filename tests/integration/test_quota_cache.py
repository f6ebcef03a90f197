"""The quota lookup against real Redis and real quota DBs (SQLite and PostgreSQL).

Layers in order (local, Redis ``tenant_quota_cache:<tenant>``, DB with write-back), the hit and
miss counters per layer, changes applied by other processes within a second through pub/sub.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import text

from limiter.quota import Quota
from limiter.quota_provider import UnknownTenant
from limiter.quotas import (
    INVALIDATION_CHANNEL,
    QUOTA_ENTRY,
    QuotaAdmin,
    QuotaCache,
    encode_quota,
    quota_cache_key,
)
from limiter.scripts import LuaScript
from metering.quota_db import QuotaStore, TenantRecord, migrate
from metering.settings import parse_host_ports


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

    nodes = [ClusterNode(h, p) for h, p in parse_host_ports(redis_cluster_nodes)]
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


# --- the order of changes in Redis --------------------------------------------------------------
def three_versions(store: QuotaStore, tenant: str) -> list[TenantRecord]:
    """Versions 1, 2 and 3 of ``tenant`` (bursts 10, 11, 12), stored as the DB orders them."""
    return [
        store.set_quota(tenant, rate_per_sec=1.0, burst=burst, daily_limit=1000)
        for burst in (10, 11, 12)
    ]


def held(r: redis.Redis, tenant: str) -> tuple[int, int] | None:
    """(version, burst) of the tenant's Redis entry, or None when there is none."""
    raw = r.get(quota_cache_key(tenant))
    if raw is None:
        return None
    data = json.loads(raw)
    return data["version"], data["burst"]


def published(pubsub: Any, tenant: str, count: int) -> list[int | None]:
    """The versions of the next ``count`` changes of ``tenant`` published (None: deleted)."""
    versions: list[int | None] = []
    deadline = time.monotonic() + 10
    while len(versions) < count:
        assert time.monotonic() < deadline, f"only {versions} were published"
        message = pubsub.get_message(timeout=0.5)
        if message and json.loads(message["data"])["tenant"] == tenant:
            quota = json.loads(message["data"])["quota"]
            versions.append(None if quota is None else quota["version"])
    return versions


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_an_older_change_that_reaches_redis_last_never_replaces_a_newer_entry(
    store: QuotaStore, redis_url: str, r: redis.Redis, tenant: str, cleanup: list[str], flavor: str
) -> None:
    """Two changes of one tenant, ordered by the DB, whose writes reach Redis in the other order
    (the audit: DB at v7, Redis at v5 until the entry expired, and a new replica enforced the
    old quota): Redis keeps the newer one, and both changes are still published (a cache that
    holds the tenant compares versions itself)."""
    import redis.asyncio as aioredis

    cleanup.append(tenant)
    v1, v2, v3 = three_versions(store, tenant)
    ar = aioredis.Redis.from_url(redis_url)
    admin = QuotaAdmin(store, r) if flavor == "sync" else QuotaAdmin(store, aredis=ar)

    async def publish(record: TenantRecord) -> None:
        if flavor == "sync":
            admin.publish(tenant, record)
        else:
            await admin.apublish(tenant, record)
        assert admin.last_published

    pubsub = r.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(INVALIDATION_CHANNEL)
        await publish(v1)
        await publish(v3)
        assert held(r, tenant) == (3, 12)  # an older entry is replaced
        await publish(v2)  # the change the DB made before v3, told to Redis after it
        assert held(r, tenant) == (3, 12)
        assert 0 < r.ttl(quota_cache_key(tenant)) <= 30
        assert published(pubsub, tenant, 3) == [1, 3, 2]
        before = counts()
        assert QuotaCache(store, r).get(tenant).burst == 12  # a new replica: Redis answers
        assert delta(before) == {"misses.local": 1, "hits.redis": 1}
        await publish(v3)  # the same change again (an equal version) is written again
        assert held(r, tenant) == (3, 12)
    finally:
        pubsub.close()
        await ar.aclose()


def test_a_deletion_replaces_any_version_and_a_tenant_created_again_replaces_the_deletion(
    store: QuotaStore, r: redis.Redis, tenant: str, cleanup: list[str]
) -> None:
    """A deletion carries no version to compare (a tenant created again starts over at
    version 1): its entry replaces a higher version, and the new tenant's version 1 replaces it
    in turn, as if versions were not compared."""
    cleanup.append(tenant)
    admin = QuotaAdmin(store, r)
    three_versions(store, tenant)
    admin.set_quota(tenant, burst=13)
    assert held(r, tenant) == (4, 13)
    admin.delete_tenant(tenant)
    assert json.loads(r.get(quota_cache_key(tenant))) == {"unknown": True}
    record = admin.set_quota(tenant, rate_per_sec=1.0, burst=5, daily_limit=100)
    assert record.version == 1
    assert held(r, tenant) == (1, 5)


async def close_client(client: Any) -> None:
    if isinstance(client, redis.Redis):
        client.close()
    else:
        await client.aclose()


def unreachable(flavor: str) -> Any:
    """A client of a loopback port nobody listens on (refused at once, no retries)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry as AsyncRetry

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if flavor == "sync":
        return redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
    return aioredis.Redis(port=port, retry=AsyncRetry(NoBackoff(), 0))


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_retried_publish_never_replaces_a_newer_entry_and_replaces_an_older_one(
    store: QuotaStore, redis_url: str, r: redis.Redis, cleanup: list[str], flavor: str
) -> None:
    """An admin that could not reach Redis retries its publish once Redis answers (here: once
    its client is pointed at the real one). Meanwhile another process made a newer change of
    ``newer`` and told Redis: the retried older change leaves it. ``older`` holds an entry
    older than the retried change: the retry replaces it."""
    import redis.asyncio as aioredis

    newer, older = f"t-{uuid.uuid4().hex[:12]}", f"t-{uuid.uuid4().hex[:12]}"
    cleanup.extend([newer, older])
    _, n2, n3 = three_versions(store, newer)
    o1, o2, _ = three_versions(store, older)
    dead = unreachable(flavor)
    ar = aioredis.Redis.from_url(redis_url)
    kind = "redis" if flavor == "sync" else "aredis"
    down = QuotaAdmin(store, **{kind: dead}, retry_interval=0.05)
    up = QuotaAdmin(store, r)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(INVALIDATION_CHANNEL)
        up.publish(older, o1)
        for tenant, record in ((newer, n2), (older, o2)):
            if flavor == "sync":
                assert not down.publish(tenant, record)
            else:
                assert not await down.apublish(tenant, record)
        assert down.pending == 2
        up.publish(newer, n3)  # another process, told Redis after the failed one
        assert held(r, newer) == (3, 12)
        setattr(down, kind, r if flavor == "sync" else ar)  # Redis answers the retrier now
        # The retried v2 is published all the same (read in a thread: the retrier may be a task
        # of this loop).
        assert await asyncio.to_thread(published, pubsub, newer, 2) == [3, 2]
        deadline = time.monotonic() + 10
        while down.pending:
            assert time.monotonic() < deadline, "the retries never finished"
            await asyncio.sleep(0.01)
        assert held(r, newer) == (3, 12)
        assert held(r, older) == (2, 11)
    finally:
        pubsub.close()
        if flavor == "sync":
            down.close()
        else:
            await down.aclose()
        await ar.aclose()
        await close_client(dead)


def test_a_server_that_does_not_know_the_script_is_sent_it(
    store: QuotaStore,
    r: redis.Redis,
    tenant: str,
    cleanup: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EVALSHA of a script the server does not hold (a restart, a failover, SCRIPT FLUSH) is
    answered NOSCRIPT: the call is sent again as EVAL, which makes the server hold it. A script
    of its own (a comment with the tenant) stands for the unknown one: a SCRIPT FLUSH would
    disturb the other tests sharing this Redis."""
    cleanup.append(tenant)
    source = QUOTA_ENTRY.source + f"-- {tenant}\n".encode()
    sha = hashlib.sha1(source).hexdigest().encode()  # noqa: S324 (Redis names scripts so)
    script = LuaScript("quota_entry.lua", source, sha)
    monkeypatch.setattr("limiter.quotas.QUOTA_ENTRY", script)
    assert r.script_exists(script.sha.decode()) == [False]
    admin = QuotaAdmin(store, r)
    _, v2, v3 = three_versions(store, tenant)
    admin.publish(tenant, v3)
    assert admin.last_published
    assert r.script_exists(script.sha.decode()) == [True]
    admin.publish(tenant, v2)  # by EVALSHA now
    assert held(r, tenant) == (3, 12)


def test_on_redis_cluster_an_older_change_never_replaces_a_newer_entry(
    store: QuotaStore, redis_cluster_nodes: str, tenant: str
) -> None:
    from redis.cluster import ClusterNode, RedisCluster

    nodes = [ClusterNode(h, p) for h, p in parse_host_ports(redis_cluster_nodes)]
    writer = RedisCluster(startup_nodes=nodes)
    admin = QuotaAdmin(store, writer)
    try:
        v1, v2, v3 = three_versions(store, tenant)
        for record in (v1, v3, v2):
            admin.publish(tenant, record)
            assert admin.last_published
        assert json.loads(writer.get(quota_cache_key(tenant)))["version"] == 3
    finally:
        writer.delete(quota_cache_key(tenant))
        writer.close()

"""A quota change made while Redis is hung (a private ``redis-server`` paused with SIGSTOP) is
stored, and must not be undone when Redis comes back.

Redis still holds the old quota then (``tenant_quota_cache:<tenant>``, for up to
``TENANT_QUOTA_CACHE_TTL``) and no process heard the publish. Three things keep the change:

- a cache never installs an older version read from Redis over the newer one it holds;
- :class:`QuotaAdmin` retries the failed publish in the background until Redis answers (the
  stale entry replaced, unless a newer change was written meanwhile, and the change
  published), so every process applies it within a second;
- the PUT tells its caller that Redis could not be told (``"propagated": false``, a warning).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from limiter.quotas import INVALIDATION_CHANNEL, QuotaAdmin, QuotaCache, quota_cache_key
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.quota_db import QuotaStore, migrate
from tests.integration.api_support import admin, api_client, api_settings
from tests.integration.limiter_support import settings_for
from tests.integration.test_limiter_quota_breaker import PrivateRedis, private_redis

__all__ = ["private_redis"]  # a fixture, imported to be found

OLD = {"rate_per_sec": 1000.0, "burst": 1000, "daily_limit": 100_000}
NEW = {**OLD, "daily_limit": 3}
SOCKET_TIMEOUT = 0.25  # the product's default RATE_LIMIT_REDIS_SOCKET_TIMEOUT


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QuotaStore]:
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate(url)
    s = QuotaStore(url)
    yield s
    s.close()


@pytest.fixture
def tenant() -> str:
    return f"outage-{uuid.uuid4().hex[:8]}"


def dead_redis() -> str:
    """The URL of a loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def clients(server: PrivateRedis | str, flavor: str) -> Any:
    """A client as the product makes it (socket timeout, no retries)."""
    s = settings_for(
        "single",
        url=server if isinstance(server, str) else server.url,
        rate_limit_redis_socket_timeout=SOCKET_TIMEOUT,
        rate_limit_redis_connect_timeout=SOCKET_TIMEOUT,
    )
    return redis_from_settings(s) if flavor == "sync" else async_redis_from_settings(s)


async def close_client(client: Any) -> None:
    if isinstance(client, redis.Redis):
        client.close()
    else:
        await client.aclose()


async def change(quota_admin: QuotaAdmin, flavor: str, tenant: str, limits: dict[str, Any]) -> Any:
    if flavor == "sync":
        return await asyncio.to_thread(quota_admin.set_quota, tenant, **limits)
    return await quota_admin.aset_quota(tenant, **limits)


async def lookup(cache: QuotaCache, flavor: str, tenant: str) -> int:
    """The daily limit the cache enforces for ``tenant``."""
    if flavor == "sync":
        return (await asyncio.to_thread(cache.get, tenant)).daily_limit
    return (await cache.aget(tenant)).daily_limit


def connections(sent: list[tuple[int, bytes]]) -> set[int]:
    """The connections that ``sent`` commands went out on. A call that timed out drops its
    connection, so each round of the publish retrier against a hung server is a new one."""
    return {number for number, _ in sent}


def redis_hits() -> float:
    return REGISTRY.get_sample_value("tenant_quota_cache_hits_total", {"layer": "redis"}) or 0.0


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_publish_that_failed_is_retried_as_soon_as_redis_answers(
    private_redis: PrivateRedis, store: QuotaStore, tenant: str, flavor: str
) -> None:
    """The stale Redis entry is replaced and the change published, within a second of Redis
    answering again; nothing is left pending."""
    client = clients(private_redis, flavor)
    quota_admin = QuotaAdmin(
        store, **({"redis": client} if flavor == "sync" else {"aredis": client}), redis_ttl=60
    )
    listener = redis.Redis(port=private_redis.port).pubsub(ignore_subscribe_messages=True)
    try:
        await change(quota_admin, flavor, tenant, OLD)
        assert quota_admin.last_published
        listener.subscribe(INVALIDATION_CHANNEL)
        private_redis.pause()
        record = await change(quota_admin, flavor, tenant, NEW)
        assert not quota_admin.last_published
        assert quota_admin.pending == 1
        # The retrier goes on trying while Redis hangs: round after round reaches the server.
        relay = private_redis.relay
        failed = connections(relay.sent)
        deadline = time.monotonic() + 10  # harness deadlines here, not asserted speeds
        while len(connections(relay.sent) - failed) < 2:
            assert time.monotonic() < deadline, "the failed publish was not retried while hung"
            await asyncio.sleep(0.01)
        private_redis.resume()
        mark = len(relay.sent)
        before_resume = connections(relay.sent)
        message = None
        while message is None:
            assert time.monotonic() < deadline, "the failed publish was never retried"
            got = await asyncio.to_thread(listener.get_message, timeout=0.5)
            if got and json.loads(got["data"])["tenant"] == tenant:
                message = json.loads(got["data"])
        assert message["quota"]["version"] == record.version == 2
        assert message["quota"]["daily_limit"] == 3
        # As soon as Redis answers: the round under way at the resume, or else the next one,
        # published it; no round after Redis answered failed first.
        assert len(connections(relay.since(mark)) - before_resume) <= 1, relay.since(mark)
        with redis.Redis(port=private_redis.port) as r:
            stale = r.get(quota_cache_key(tenant))
        assert stale is not None and json.loads(stale)["version"] == 2, stale  # the change's
        deadline = time.monotonic() + 2
        while quota_admin.pending:  # the retry records its success right after the publish
            assert time.monotonic() < deadline, "the retry never finished"
            await asyncio.sleep(0.01)
    finally:
        private_redis.resume()
        listener.close()
        if flavor == "sync":
            quota_admin.close()
        else:
            await quota_admin.aclose()
        await close_client(client)


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_stale_redis_entry_never_replaces_the_newer_change_a_cache_holds(
    private_redis: PrivateRedis, store: QuotaStore, tenant: str, flavor: str
) -> None:
    """The change is made by an admin that cannot reach Redis (its client points at a port
    nobody listens on: a paused server may still run a SET it had buffered once resumed), and
    its publish is not retried here (``retry_interval`` of an hour). Redis keeps the old quota;
    the cache that applied the change reads it again and again, and keeps the new one."""
    client = clients(private_redis, flavor)
    dead = clients(dead_redis(), flavor)
    kind = {"redis": client} if flavor == "sync" else {"aredis": client}
    cache = QuotaCache(store, **kind, local_ttl=0.2, redis_ttl=60)  # re-reads Redis often
    up = QuotaAdmin(store, **kind, redis_ttl=60)
    down = QuotaAdmin(
        store,
        **({"redis": dead} if flavor == "sync" else {"aredis": dead}),
        redis_ttl=60,
        local=cache,
        retry_interval=3600,
    )
    try:
        await change(up, flavor, tenant, OLD)
        assert await lookup(cache, flavor, tenant) == 100_000
        await change(down, flavor, tenant, NEW)
        assert not down.last_published
        assert await lookup(cache, flavor, tenant) == 3  # applied here at once
        with redis.Redis(port=private_redis.port) as r:
            assert json.loads(r.get(quota_cache_key(tenant)))["daily_limit"] == 100_000
        before = redis_hits()
        deadline = time.monotonic() + 10
        while redis_hits() - before < 3:  # three reads of the stale entry
            assert time.monotonic() < deadline, "the cache never read Redis again"
            assert await lookup(cache, flavor, tenant) == 3
            await asyncio.sleep(0.05)  # the local entry's TTL passing: the next lookup reloads
        assert await lookup(cache, flavor, tenant) == 3
    finally:
        for quota_admin in (up, down):
            if flavor == "sync":
                quota_admin.close()
            else:
                await quota_admin.aclose()
        if flavor == "sync":
            cache.close()
        else:
            await cache.aclose()
        await close_client(client)
        await close_client(dead)


async def test_a_put_while_redis_hangs_says_so_and_both_apps_keep_the_new_quota(
    private_redis: PrivateRedis, tmp_path: Path, kafka_bootstrap: str, tenant: str
) -> None:
    """The audit's experiment: two API processes (apps) on one Redis and quota DB, a PUT to
    one of them while Redis is hung. The PUT answers 200 and says the change did not propagate;
    once Redis is back, both apps enforce the new quota, and keep it while their local entries
    are refreshed from Redis many times over."""
    settings = api_settings(
        tmp_path,
        private_redis.url,
        kafka_bootstrap,
        quota_local_ttl=0.4,  # refreshed from Redis every 0.2 s while in use
        tenant_quota_cache_ttl=60,
        rate_limit_redis_socket_timeout=SOCKET_TIMEOUT,
    )

    async with api_client(settings) as c, api_client(settings) as d:

        async def enforced(app: Any) -> int:
            r = await app.get(f"/v1/limits/{tenant}", headers=admin())  # not metered as tenant
            assert r.status_code == 200, r.text
            return int(r.json()["daily"]["limit"])

        r = await c.put(f"/v1/tenants/{tenant}/quota", json=OLD, headers=admin())
        assert r.status_code == 200, r.text
        assert r.json()["propagated"] is True and r.json()["warning"] is None
        assert "warning" not in r.headers
        assert (await enforced(c), await enforced(d)) == (100_000, 100_000)

        private_redis.pause()
        try:
            # The PUT answers while Redis still hangs: it does not wait for a retry to reach
            # Redis (a harness deadline, not an asserted speed), it leaves them to the retrier.
            r = await asyncio.wait_for(
                c.put(f"/v1/tenants/{tenant}/quota", json=NEW, headers=admin()), 30
            )
        finally:
            private_redis.resume()
        assert r.status_code == 200, r.text
        assert "the publish is retried in the background" in r.json()["warning"]
        body = r.json()
        assert body["daily_limit"] == 3 and body["version"] == 2
        assert body["propagated"] is False
        assert "Redis could not be told" in body["warning"]
        assert r.headers["warning"].startswith('199 metering "stored, but Redis could not')
        assert "127.0.0.1" not in r.text and str(private_redis.port) not in r.text

        # The breaker (reset 1 s) may keep Redis out for a while after it is back; then the
        # change reaches both apps (harness deadline, not an asserted speed) ...
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 30
        while not seen or seen[-1] != (3, 3):
            assert time.monotonic() < deadline, seen
            seen.append((await enforced(c), await enforced(d)))
            await asyncio.sleep(0.05)  # pacing the polls, not waiting for anything
        # ... and no refresh brings the old quota back: both keep it while their local entries
        # are read again from Redis many times over (counted, not timed).
        before = redis_hits()
        while redis_hits() - before < 10:
            assert time.monotonic() < deadline, "the apps never read Redis again"
            assert (await enforced(c), await enforced(d)) == (3, 3), seen
            await asyncio.sleep(0.05)  # the local entries' TTL passing: lookups reload

"""Two first lookups of one tenant at once, one of them failing: the tenant keeps its own quota.

Under load a tenant's first requests look its quota up concurrently; one lookup may find both
sources failing (Redis cache entry missing, the DB call timing out) while another gets the
answer. The failed one must not replace that answer by the "cannot be proven known" placeholder
(the default plan), and an answer fetched while the placeholder was made must replace it.

Real Redis and real quota DBs (SQLite and PostgreSQL); the only thing staged is the order of the
DB calls and which of them fails, as a DB timeout does (:class:`StagedStore`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from sqlalchemy.exc import OperationalError

from limiter.quota import Quota
from limiter.quotas import QuotaCache, quota_cache_key
from metering.plans import plan_limits
from metering.quota_db import QuotaStore, TenantRecord, migrate

OWN = Quota(rate_per_sec=2.0, burst=5, daily_limit=60)  # the demo's "free" tenant
DEFAULT = plan_limits("free")  # 5/s, burst 10, daily 1000: what a placeholder serves


@dataclass
class Step:
    """What one ``get_tenant`` call does: waits for ``release``, then fails or answers."""

    fail: bool
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class StagedStore(QuotaStore):
    """The real quota DB; the first ``get_tenant`` calls follow ``steps`` in call order."""

    def __init__(self, url: str, steps: list[Step]) -> None:
        super().__init__(url)
        self.steps = steps
        self._lock = threading.Lock()

    def get_tenant(self, tenant: str) -> TenantRecord | None:
        with self._lock:
            step = self.steps.pop(0) if self.steps else None
        if step is not None:
            step.entered.set()
            assert step.release.wait(10), "the test never released this DB call"
            if step.fail:
                raise OperationalError("SELECT tenants", {}, TimeoutError("statement timeout"))
        return super().get_tenant(tenant)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def lookup_in_thread(cache: QuotaCache, tenant: str) -> tuple[threading.Thread, list[Quota]]:
    answers: list[Quota] = []
    thread = threading.Thread(target=lambda: answers.append(cache.get(tenant)), daemon=True)
    thread.start()
    return thread, answers


def staged_cache(
    quota_db_url: str, r: redis.Redis, tenant: str, steps: list[Step]
) -> tuple[QuotaCache, StagedStore]:
    migrate(quota_db_url)
    store = StagedStore(quota_db_url, steps)
    QuotaStore.set_quota(
        store, tenant, plan="free", rate_per_sec=2.0, burst=5, daily_limit=60
    )  # in the DB only: no Redis entry, so both lookups go to the DB
    r.delete(quota_cache_key(tenant))
    # A long local TTL and retry interval: only the race decides what is served afterwards.
    cache = QuotaCache(store, r, local_ttl=3600, retry_interval=3600, default_plan="free")
    return cache, store


def test_a_lookup_that_fails_after_another_succeeded_keeps_the_tenants_own_quota(
    quota_db_url: str, r: redis.Redis, tenant: str
) -> None:
    failing = Step(fail=True)
    cache, store = staged_cache(quota_db_url, r, tenant, [failing])
    try:
        slow, slow_answer = lookup_in_thread(cache, tenant)  # its DB call will time out
        assert failing.entered.wait(10)

        assert cache.get(tenant) == OWN  # a second lookup gets the answer and caches it
        failing.release.set()
        slow.join(10)

        assert slow_answer == [OWN]  # the failed lookup serves what is known, not the default
        assert cache.get(tenant) == OWN
        assert cache.get(tenant).burst != DEFAULT.burst
    finally:
        cache.close()
        store.close()
        r.delete(quota_cache_key(tenant))


def test_an_answer_fetched_while_a_placeholder_was_made_replaces_it(
    quota_db_url: str, r: redis.Redis, tenant: str
) -> None:
    slow_ok = Step(fail=False)
    failing = Step(fail=True)
    failing.release.set()
    cache, store = staged_cache(quota_db_url, r, tenant, [slow_ok, failing])
    try:
        slow, slow_answer = lookup_in_thread(cache, tenant)  # reads the DB, slowly
        assert slow_ok.entered.wait(10)

        # Meanwhile another first lookup finds both sources failing: the unknown-tenant policy
        # answers it (the default plan) until a source answers.
        assert cache.get(tenant).burst == DEFAULT.burst
        slow_ok.release.set()
        slow.join(10)

        assert slow_answer == [OWN]
        assert cache.get(tenant) == OWN  # the source answered: the placeholder is gone
    finally:
        cache.close()
        store.close()
        r.delete(quota_cache_key(tenant))


async def test_on_the_async_path_a_failed_first_lookup_keeps_the_tenants_own_quota(
    quota_db_url: str, r: redis.Redis, redis_url: str, tenant: str
) -> None:
    import redis.asyncio as aioredis

    failing = Step(fail=True)
    cache, store = staged_cache(quota_db_url, r, tenant, [failing])
    cache.aredis = aioredis.Redis.from_url(redis_url)
    try:
        slow = asyncio.create_task(cache.aget(tenant))  # its DB call will time out
        assert await asyncio.to_thread(failing.entered.wait, 10)

        assert await cache.aget(tenant) == OWN
        failing.release.set()

        assert await slow == OWN
        assert await cache.aget(tenant) == OWN
    finally:
        await cache.aclose()
        await cache.aredis.aclose()
        store.close()
        r.delete(quota_cache_key(tenant))

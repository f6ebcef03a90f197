"""The limiter after its Redis came back from a snapshot older than the counts (a crash of an
RDB-persisted server, a restore from a backup, a failover that lost the replication lag).

The day counter comes back lower than what was counted and what the quota DB's backfill holds
since. A missing counter was already seeded from the backfill; one that came back lower was
kept, and the tenant was allowed its day's units again (the audit: 1,600 allowed against a
daily limit of 1,000). The server answers ``NOSCRIPT`` after such a change (its script cache
is empty): the decision that sees it goes again carrying the tenant's seed, as does every
tenant's next decision, and the script raises a lower counter to the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.keys import daily_counter_key
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.localstack.stack import free_port, wait_until
from tests.integration.limiter_support import StaticQuotas, server_day, settings_for

QUOTA = Quota(rate_per_sec=10**6, burst=10**6, daily_limit=1000)


class PersistedRedis:
    """A redis-server of the test's own that writes its snapshot to ``directory`` on ``SAVE``
    and loads it at start, as a persisted server does after a crash."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--dbfilename", "dump.rdb"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self.ping, 10, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        with redis.Redis(port=self.port, socket_timeout=0.5) as client:
            return bool(client.ping())

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def crash_and_restart(self) -> None:
        """Stop without saving (what was counted since the last SAVE is lost), start again."""
        assert self.proc is not None
        with self.client() as client, contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)
        self.proc.wait(10)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def persisted(tmp_path: Path) -> Iterator[PersistedRedis]:
    server = PersistedRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_counter_restored_from_an_older_snapshot_is_raised_to_the_backfill(
    persisted: PersistedRedis, tenant: str, flavor: str
) -> None:
    """Two tenants, 300 units each in the snapshot, 900 counted and backfilled before the
    crash. After it, the first decision (which finds the scripts gone) and the other tenant's
    first decision (after the change was seen) each raise their counter to 900: each is
    allowed 100 more and then refused, as before the crash. The seed is asked once each."""
    day = server_day(persisted.client())
    tenants = [tenant, f"{tenant}-b"]
    provider = StaticQuotas(dict.fromkeys(tenants, QUOTA))
    s = settings_for("single", url=persisted.url)
    if flavor == "sync":
        limiter: Any = RateLimiter(redis_from_settings(s), provider)

        async def acquire(t: str) -> Any:
            return await asyncio.to_thread(limiter.acquire, t, 100)
    else:
        limiter = AsyncRateLimiter(async_redis_from_settings(s), provider)

        async def acquire(t: str) -> Any:
            return await limiter.acquire(t, 100)

    try:
        for t in tenants:
            counted = [await acquire(t) for _ in range(3)]
            assert [(d.allowed, d.degraded, d.daily_used) for d in counted] == [
                (True, False, 100 * (i + 1)) for i in range(3)
            ]
        persisted.client().save()  # the snapshot: 300 counted for each
        for t in tenants:
            counted = [await acquire(t) for _ in range(6)]
            assert [d.daily_used for d in counted] == [100 * (i + 4) for i in range(6)]
            provider.seeds[(t, day)] = 900  # what the worker backfilled meanwhile
        seeds_asked = len(provider.seed_calls)  # each tenant's first decision of the day
        persisted.crash_and_restart()
        for t in tenants:
            assert int(persisted.client().get(daily_counter_key(t, day))) == 300
        # Idle past the sync limiter's IDLE_CHECK_SECONDS: its kept connection, dead now, is
        # checked before use (a restart under load costs the decision that finds it dead).
        await asyncio.sleep(0.2)

        for t in tenants:
            after = [await acquire(t) for _ in range(3)]
            assert [(d.allowed, d.degraded, d.daily_used) for d in after] == [
                (True, False, 1000),
                (False, False, 1000),
                (False, False, 1000),
            ], (t, after)
            assert int(persisted.client().get(daily_counter_key(t, day))) == 1000
        # Once each, not per decision.
        assert sorted(provider.seed_calls[seeds_asked:]) == sorted((t, day) for t in tenants)
    finally:
        if flavor == "async":
            await limiter.redis.aclose()
        else:
            limiter.redis.close()

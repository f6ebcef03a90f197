"""The quota lookup and the circuit breaker, on a hung Redis (a private ``redis-server`` paused
with SIGSTOP: connections are accepted, nothing is answered).

Before a decision the limiter looks the tenant's quota up; for a tenant not in the process-local
cache that is a Redis read (``tenant_quota_cache:<tenant>``). That read shares the limiter's
breaker: while the breaker is open it is not made (the quota DB answers, as when the read fails),
and when it fails it counts toward opening the breaker. So no decision waits out the socket
timeout while Redis is known to be down, whether or not its tenant was seen before.

What reaches the hung server is counted by a relay in front of it (:class:`CommandRelay`): a
call that waits for Redis is a command sent to it, one that does not sends nothing. The
breaker's clock is the test's, so half-open comes when the test says, not after a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from limiter import AsyncRateLimiter, CircuitBreaker, LocalLimiter, Quota, RateLimiter
from limiter.decision import Decision
from limiter.quotas import QuotaCache
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.localstack.stack import free_port, wait_until
from metering.quota_db import QuotaStore, migrate
from tests.integration.limiter_support import settings_for

TIMEOUT = 2.0  # RATE_LIMIT_REDIS_SOCKET_TIMEOUT (and connect timeout): large, so never confused
BURST, DAILY = 7, 777  # the quota DB's limits for every tenant of these tests


def command_names(buffer: bytearray) -> list[bytes]:
    """The names of the complete RESP commands at the start of ``buffer``, removed from it (a
    command still arriving stays)."""
    names: list[bytes] = []
    while buffer.startswith(b"*"):
        end = buffer.find(b"\r\n")
        if end < 0:
            break
        pos, args = end + 2, list[bytes]()
        for _ in range(int(buffer[1:end])):
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                return names
            start = end + 2
            stop = start + int(buffer[pos + 1 : end])
            if len(buffer) < stop + 2:
                return names
            args.append(bytes(buffer[start:stop]))
            pos = stop + 2
        names.append(args[0].upper())
        del buffer[:pos]
    return names


class CommandRelay:
    """A TCP relay to ``upstream_port`` that records each command a client sends through it, as
    (connection number, command name): with the server hung, every one is a call waiting."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent: list[tuple[int, bytes]] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def since(self, mark: int) -> list[tuple[int, bytes]]:
        """The commands sent after the first ``mark`` (``mark = len(relay.sent)``)."""
        return self.sent[mark:]

    def _accept(self) -> None:
        for number in range(1_000_000):
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, server]
            for args in ((client, server, number), (server, client, None)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, number: int | None) -> None:
        buffer = bytearray()
        try:
            while data := src.recv(65536):
                if number is not None:
                    buffer += data
                    self.sent += [(number, name) for name in command_names(buffer)]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            s.close()


class PrivateRedis:
    """A throwaway redis-server on a free loopback port, which the test can hang and resume;
    clients reach it (``url``) through a :class:`CommandRelay`."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.relay = CommandRelay(self.port)
        self.url = f"redis://127.0.0.1:{self.relay.port}/0"
        self.paused = False

    def ping(self) -> bool:
        with redis.Redis(port=self.port, socket_timeout=0.5) as client:
            return bool(client.ping())

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        self.resume()
        self.relay.close()
        self.proc.terminate()
        self.proc.wait(10)


class Clock:
    """The breaker's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    try:
        wait_until(server.ping, 10, f"redis-server on port {server.port}")
        yield server
    finally:
        server.stop()


@dataclass
class Rig:
    """A limiter wired as the API wires it: one Redis client for the limiter and the quota
    cache, the cache given to the limiter, a breaker built from the settings."""

    flavor: str
    limiter: Any
    cache: QuotaCache
    store: QuotaStore

    async def acquire(self, tenant: str) -> Decision:
        """A decision for ``tenant`` (its quota looked up)."""
        if self.flavor == "sync":
            return await asyncio.to_thread(self.limiter.acquire, tenant)
        return await self.limiter.acquire(tenant)

    async def quota_burst(self, tenant: str) -> int:
        """A quota lookup alone (no decision): the burst it answered."""
        if self.flavor == "sync":
            return (await asyncio.to_thread(self.cache.get, tenant)).burst
        return (await self.cache.aget(tenant)).burst

    async def close(self) -> None:
        if self.flavor == "sync":
            self.cache.close()
            self.limiter.close()
            self.limiter.redis.close()
        else:
            await self.cache.aclose()
            await self.limiter.redis.aclose()
        self.store.close()


def make_rig(
    flavor: str,
    url: str,
    tmp_path: Path,
    tenants: list[str],
    clock: Clock | None = None,
    **settings: Any,
) -> Rig:
    s = settings_for(
        "single",
        url=url,
        rate_limit_redis_socket_timeout=TIMEOUT,
        rate_limit_redis_connect_timeout=TIMEOUT,
        **settings,
    )
    db_url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate(db_url)
    store = QuotaStore(db_url)
    for t in tenants:
        store.set_quota(t, rate_per_sec=5.0, burst=BURST, daily_limit=DAILY)
    kwargs: dict[str, Any] = dict(
        fail_mode=s.rate_limit_fail_mode,
        breaker=CircuitBreaker(
            s.rate_limit_breaker_failures, s.rate_limit_breaker_reset, clock=clock or Clock()
        ),
        local_limiter=LocalLimiter(s.rate_limit_local_ceiling_per_sec),
    )
    if flavor == "sync":
        client: Any = redis_from_settings(s)
        cache = QuotaCache.from_settings(s, store=store, redis=client)
        return Rig(flavor, RateLimiter(client, cache, **kwargs), cache, store)
    client = async_redis_from_settings(s)
    cache = QuotaCache.from_settings(s, store=store, aredis=client)
    return Rig(flavor, AsyncRateLimiter(client, cache, **kwargs), cache, store)


def assert_degraded_from_the_db(decision: Decision, fail_mode: str = "open") -> None:
    assert decision.degraded, decision
    assert decision.allowed == (fail_mode == "open"), decision
    # The quota DB answered (the default plan would mean no source did).
    assert (decision.limit, decision.daily_limit) == (BURST, DAILY), decision


def assert_nothing_sent(private_redis: PrivateRedis, mark: int, what: str) -> None:
    sent = private_redis.relay.since(mark)
    assert not sent, f"{what} sent {sent} to the hung Redis with the breaker open"


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_with_the_breaker_open_new_tenants_never_wait_for_the_quota_read(
    private_redis: PrivateRedis, tmp_path: Path, tenant: str, flavor: str, fail_mode: str
) -> None:
    """Redis hung, breaker open: tenants not in the local quota cache, one after another and
    twenty at once, are each answered (degraded, with the DB's quota) without a call to Redis:
    the quota read is not made, nor the decision's."""
    newcomers = [f"{tenant}-n{i}" for i in range(25)]
    rig = make_rig(
        flavor,
        private_redis.url,
        tmp_path,
        [tenant, *newcomers],
        rate_limit_fail_mode=fail_mode,
        rate_limit_breaker_failures=1,
        rate_limit_breaker_reset=60.0,
    )
    try:
        first = await rig.acquire(tenant)
        assert first.allowed and not first.degraded, first  # quota now in the local cache

        private_redis.pause()
        mark = len(private_redis.relay.sent)
        opening = await rig.acquire(tenant)  # a cached quota: only the decision waits
        assert opening.degraded, opening
        assert private_redis.relay.since(mark), "the decision never reached Redis"
        assert rig.limiter.breaker.state == "open"

        mark = len(private_redis.relay.sent)
        for newcomer in newcomers[:5]:
            decision = await rig.acquire(newcomer)
            assert_degraded_from_the_db(decision, fail_mode)
        assert_nothing_sent(private_redis, mark, "5 new tenants")

        results = await asyncio.gather(*(rig.acquire(t) for t in newcomers[5:]))
        for decision in results:
            assert_degraded_from_the_db(decision, fail_mode)
        assert_nothing_sent(private_redis, mark, "20 concurrent new tenants")
        assert rig.limiter.breaker.state == "open"
    finally:
        private_redis.resume()
        await rig.close()


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_failed_quota_reads_open_the_breaker_the_decisions_use(
    private_redis: PrivateRedis, tmp_path: Path, tenant: str, flavor: str
) -> None:
    """Redis hung: quota lookups alone (no decision yet) that fail open the limiter's breaker;
    the next new tenant's decision then calls Redis for nothing."""
    newcomers = [f"{tenant}-n{i}" for i in range(3)]
    rig = make_rig(
        flavor,
        private_redis.url,
        tmp_path,
        newcomers,
        rate_limit_breaker_failures=2,
        rate_limit_breaker_reset=60.0,
    )
    try:
        private_redis.pause()
        for newcomer in newcomers[:2]:
            assert rig.limiter.breaker.state == "closed"
            assert await rig.quota_burst(newcomer) == BURST  # the DB answered after the read
        assert rig.limiter.breaker.state == "open"

        mark = len(private_redis.relay.sent)
        decision = await rig.acquire(newcomers[2])
        assert_degraded_from_the_db(decision)
        assert_nothing_sent(private_redis, mark, "a new tenant's decision")
    finally:
        private_redis.resume()
        await rig.close()


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_hung_redis_opens_the_breaker_when_every_request_is_for_a_new_tenant(
    private_redis: PrivateRedis, tmp_path: Path, tenant: str, flavor: str
) -> None:
    """Every request for a tenant not seen yet: the quota read's failure counts toward opening
    the breaker like a decision's, and each request waits out one timeout (its read; its
    decision, answered without Redis with the DB's quota, makes no call of its own rather
    than wait out a second timeout for the script). Two requests reach the threshold of 2; the
    third calls Redis for nothing."""
    newcomers = [f"{tenant}-n{i}" for i in range(3)]
    rig = make_rig(
        flavor,
        private_redis.url,
        tmp_path,
        newcomers,
        rate_limit_breaker_failures=2,
        rate_limit_breaker_reset=60.0,
    )
    try:
        private_redis.pause()
        for failures, newcomer in enumerate(newcomers[:2], start=1):
            assert rig.limiter.breaker.state == "closed"
            mark = len(private_redis.relay.sent)
            assert_degraded_from_the_db(await rig.acquire(newcomer))
            # One call reached the hung server, the quota read (its connection's HELLO, or GET).
            sent = [name for _, name in private_redis.relay.since(mark)]
            assert len(sent) == 1, f"decision {failures} waited for {sent} on the hung Redis"
        assert rig.limiter.breaker.state == "open"
        mark = len(private_redis.relay.sent)
        third = await rig.acquire(newcomers[2])
        assert_degraded_from_the_db(third)
        assert_nothing_sent(private_redis, mark, "the third new tenant")
    finally:
        private_redis.resume()
        await rig.close()


class SlowLookup:
    """A quota provider whose lookup of ``slow`` waits until the test lets it go (a cache miss
    in progress); the others answer at once."""

    def __init__(self, slow: str) -> None:
        self.slow = slow
        self.entered = threading.Event()
        self.release = threading.Event()

    def get(self, tenant: str) -> Quota:
        if tenant == self.slow:
            self.entered.set()
            assert self.release.wait(10)
        return Quota(rate_per_sec=5.0, burst=BURST, daily_limit=DAILY)

    async def aget(self, tenant: str) -> Quota:
        return await asyncio.to_thread(self.get, tenant)

    def daily_seed(self, tenant: str, day: Any) -> int:
        return 0

    async def adaily_seed(self, tenant: str, day: Any) -> int:
        return 0


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_failure_of_another_decision_during_a_quota_lookup_is_not_this_ones(
    redis_url: str, tenant: str, flavor: str
) -> None:
    """While one decision's quota lookup is in progress, another decision's Redis call fails
    (its tenant's node is down, say): the breaker records it, stays closed (threshold 3), and
    the first decision still goes to Redis, which answers it (not degraded)."""
    s = settings_for("single", url=redis_url)
    provider = SlowLookup(tenant)
    breaker = CircuitBreaker(3, 60.0)
    if flavor == "sync":
        limiter: Any = RateLimiter(redis_from_settings(s), provider, breaker=breaker)
        pending = asyncio.ensure_future(asyncio.to_thread(limiter.acquire, tenant))
    else:
        limiter = AsyncRateLimiter(async_redis_from_settings(s), provider, breaker=breaker)
        pending = asyncio.ensure_future(limiter.acquire(tenant))
    try:
        assert await asyncio.to_thread(provider.entered.wait, 10)
        breaker.record_failure()  # another decision's, on another thread or task
        provider.release.set()
        decision = await asyncio.wait_for(pending, 10)
        assert decision.allowed and not decision.degraded, decision
        assert decision.remaining == BURST - 1, decision
        assert breaker.state == "closed"
    finally:
        provider.release.set()
        if flavor == "async":
            await limiter.redis.aclose()


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_half_open_makes_one_trial_call_and_a_recovered_redis_closes_the_breaker(
    private_redis: PrivateRedis, tmp_path: Path, tenant: str, flavor: str
) -> None:
    """Redis hung: once the reset time has passed, of eight new tenants at once exactly one
    calls Redis (the trial call, the quota read); its failure opens the breaker again. Redis
    back: after the reset a new tenant's quota read is the trial, succeeds and closes the
    breaker, and its decision is made in Redis."""
    reset = 1.0
    clock = Clock()
    newcomers = [f"{tenant}-n{i}" for i in range(9)]
    rig = make_rig(
        flavor,
        private_redis.url,
        tmp_path,
        [tenant, *newcomers],
        clock,
        rate_limit_breaker_failures=1,
        rate_limit_breaker_reset=reset,
    )
    try:
        assert not (await rig.acquire(tenant)).degraded
        private_redis.pause()
        assert (await rig.acquire(tenant)).degraded  # waits, opens the breaker
        assert rig.limiter.breaker.state == "open"

        clock.now += reset
        assert rig.limiter.breaker.state == "half_open"
        mark = len(private_redis.relay.sent)
        results = await asyncio.gather(*(rig.acquire(t) for t in newcomers[:8]))
        callers = {connection for connection, _ in private_redis.relay.since(mark)}
        assert len(callers) == 1, f"not one trial call: {private_redis.relay.since(mark)}"
        for decision in results:
            assert_degraded_from_the_db(decision)
        assert rig.limiter.breaker.state == "open"

        private_redis.resume()
        clock.now += reset
        decision = await rig.acquire(newcomers[8])
        assert not decision.degraded and decision.allowed, decision
        assert (decision.limit, decision.daily_limit) == (BURST, DAILY)
        assert rig.limiter.breaker.state == "closed"
    finally:
        private_redis.resume()
        await rig.close()


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_a_background_refresh_whose_read_fails_leaves_the_breaker_to_the_decisions(
    private_redis: PrivateRedis, tmp_path: Path, tenant: str, flavor: str
) -> None:
    """The overload audit's case: under a saturated event loop, redis-py's reads of background
    quota refreshes timed out over a healthy Redis (the loop resumed them after their socket
    timeout), opened the shared breaker, and 2,122 requests were answered 503. A refresh serves
    no request (each is answered from the local entry), so its failure is not the breaker's;
    the limiter's own calls tell an outage."""
    rig = make_rig(
        flavor,
        private_redis.url,
        tmp_path,
        [tenant],
        quota_local_ttl=1.0,
        rate_limit_breaker_failures=1,
        rate_limit_breaker_reset=60.0,
    )
    try:
        assert await rig.quota_burst(tenant) == BURST  # in the local cache
        private_redis.pause()
        await asyncio.sleep(0.6)  # past the entry's refresh time (half the local TTL)
        mark = len(private_redis.relay.sent)
        assert await rig.quota_burst(tenant) == BURST  # served at once; a refresh starts
        for _ in range(200):  # the refresh's read reaches Redis (its task or its thread)
            if private_redis.relay.since(mark):
                break
            await asyncio.sleep(0.05)
        assert private_redis.relay.since(mark), "no refresh read Redis"
        await asyncio.sleep(TIMEOUT + 1.0)  # the read times out; the DB answers the refresh
        assert rig.limiter.breaker.state == "closed"
    finally:
        private_redis.resume()
        await rig.close()

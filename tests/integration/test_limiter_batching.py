"""The async limiter's transport: concurrent decisions share pipelined round trips, and one
call's error or cancellation never leaks into the others in its batch. Also: the metrics."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from prometheus_client import REGISTRY
from starlette.types import Message, Receive, Scope, Send

from limiter import AsyncRateLimiter, Quota, RateLimiter, batching
from limiter.decision import Decision
from limiter.keys import token_bucket_key
from limiter.middleware import RateLimitMiddleware
from limiter.scripts import resp_command
from metering.localstack import LocalStack

QUOTA = Quota(rate_per_sec=1000, burst=1000, daily_limit=10**6)
#: never refuses in a test: every decision counts one more in the day
AMPLE = Quota(rate_per_sec=10**6, burst=10**6, daily_limit=10**7)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aredis.Redis]:
    c = aredis.Redis.from_url(redis_url, socket_timeout=2.0)
    yield c
    await c.aclose()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_limiter_drives_the_connection_redis_py_opened(
    client: aredis.Redis, tenant: str
) -> None:
    """The pipe takes over the transport of a connection redis-py set up (so AUTH, SELECT,
    HELLO, TLS and Sentinel stay redis-py's), and closing it hands it back to the pool."""
    limiter = AsyncRateLimiter(client)
    await limiter.acquire(tenant, 1, QUOTA)
    batcher = limiter._batcher
    pipe = batcher._pipe
    assert pipe is not None and pipe.transport.get_protocol() is pipe
    in_use = len(client.connection_pool._in_use_connections)
    await batcher.aclose()
    assert batcher._pipe is None
    assert len(client.connection_pool._in_use_connections) == in_use - 1
    assert (await limiter.acquire(tenant, 1, QUOTA)).daily_used == 2  # a new connection


async def test_concurrent_decisions_share_round_trips(client: aredis.Redis, tenant: str) -> None:
    limiter = AsyncRateLimiter(client)
    await limiter.acquire(tenant, 1, QUOTA)  # scripts loaded (a NOSCRIPT reply is sent again)
    batches_before = sample("rate_limiter_batch_size_count")
    calls_before = sample("rate_limiter_batch_size_sum")

    decisions = await asyncio.gather(*(limiter.acquire(tenant, 1, QUOTA) for _ in range(300)))

    assert sorted(d.daily_used for d in decisions) == list(range(2, 302))
    batches = sample("rate_limiter_batch_size_count") - batches_before
    assert sample("rate_limiter_batch_size_sum") - calls_before == 300
    assert batches <= 10  # 300 decisions in a handful of round trips, not 300


async def test_one_calls_error_reply_goes_to_that_caller_only(
    client: aredis.Redis, redis_url: str, tenant: str
) -> None:
    broken = f"{tenant}-broken"
    raw = redis.Redis.from_url(redis_url)
    raw.set(token_bucket_key(broken), "not a hash")  # every script call on it fails: WRONGTYPE
    limiter = AsyncRateLimiter(client)

    results = await asyncio.gather(
        *(limiter.acquire(broken if i % 10 == 0 else tenant, 1, QUOTA) for i in range(100))
    )

    # The broken tenant's calls got WRONGTYPE: decided by the fail mode (open), one by one.
    refused = [d for d in results if d.tenant == broken]
    assert len(refused) == 10
    assert all(d.degraded and d.reason == "redis_down" for d in refused), refused
    ok = [d for d in results if d.tenant == tenant]
    assert not any(d.degraded for d in ok)
    assert sorted(d.daily_used for d in ok) == list(range(1, 91))
    assert limiter.breaker.state == "closed"  # a bad key is not an outage
    raw.delete(token_bucket_key(broken))


async def test_cancelled_callers_do_not_disturb_the_rest_of_the_batch(
    client: aredis.Redis, tenant: str
) -> None:
    limiter = AsyncRateLimiter(client)
    tasks = [asyncio.create_task(limiter.acquire(tenant, 1, QUOTA)) for _ in range(100)]
    await asyncio.sleep(0)  # all queued
    for t in tasks[::4]:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    done = [r for r in results if not isinstance(r, BaseException)]
    assert len(done) == 75 and not any(d.degraded for d in done)
    # The connection stays in step: the next decisions read their own replies.
    after = await asyncio.gather(*(limiter.acquire(tenant, 1, QUOTA) for _ in range(5)))
    used = [d.daily_used for d in after]
    assert used == sorted(used) and len(set(used)) == 5


async def test_a_call_cancelled_before_its_write_is_taken_back_and_never_runs(
    client: aredis.Redis, tenant: str
) -> None:
    limiter = AsyncRateLimiter(client)  # no connection yet: the first call waits for one
    abandoned: list[Decision] = []
    task = asyncio.create_task(limiter.acquire(tenant, 1, QUOTA, on_abandoned=abandoned.append))
    await asyncio.sleep(0)
    assert len(limiter._batcher._queue) == 1  # queued while the connection opens
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not limiter._batcher._queue
    assert (await limiter.acquire(tenant, 1, QUOTA)).daily_used == 1  # the first that ran
    assert not abandoned


async def test_a_decision_redis_made_reaches_its_caller_or_on_abandoned_exactly_once(
    client: aredis.Redis, tenant: str
) -> None:
    """Callers cancelled at every point of their call: each decision Redis counted (the day
    counter numbers them) reaches either its caller or the caller's ``on_abandoned``, once;
    nothing is left behind in the transport."""
    limiter = AsyncRateLimiter(client)
    await limiter.acquire(tenant, 1, AMPLE)  # connected, scripts loaded
    batcher = limiter._batcher
    got: list[Decision] = []
    abandoned: list[Decision] = []
    rng = random.Random(20261207)
    cancelled = 0
    for _ in range(150):
        tasks = [
            asyncio.create_task(limiter.acquire(tenant, 1, AMPLE, on_abandoned=abandoned.append))
            for _ in range(8)
        ]
        for _ in range(rng.randint(0, 4)):  # cancelled before, at or after the write
            await asyncio.sleep(0)
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.0005)  # or while the reply is on its way
        for t in tasks[::2]:
            t.cancel()
        for r in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(r, Decision):
                got.append(r)
            else:
                assert isinstance(r, asyncio.CancelledError), r
                cancelled += 1
    assert await limiter.drain(5), "writes still in flight"
    last = (await limiter.acquire(tenant, 1, AMPLE)).daily_used
    numbers = sorted(d.daily_used for d in got + abandoned)
    assert numbers == list(range(2, last))  # each counted decision once, none missing
    assert abandoned and len(abandoned) < cancelled  # both cases happened
    assert not batcher._abandoned and not batcher._unclaimed and not batcher._queue


async def test_the_middleware_emits_the_decision_of_a_request_cancelled_in_flight(
    client: aredis.Redis, tenant: str
) -> None:
    """A request cancelled while its limiter call is in flight (a timeout middleware, a
    server's shutdown) had its units counted by Redis: its decision is still emitted."""

    class Quotas:
        async def aget(self, tenant: str) -> Quota:
            return AMPLE

        async def adaily_seed(self, tenant: str, day: object) -> int:
            return 0

    class Events:
        def __init__(self) -> None:
            self.events: list[Any] = []

        def emit(self, event: Any) -> None:
            self.events.append(event)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        pass

    limiter = AsyncRateLimiter(client, Quotas())  # type: ignore[arg-type]
    emitted = Events()
    middleware = RateLimitMiddleware(app, limiter, emitter=emitted)
    scope = {"type": "http", "method": "GET", "path": "/x", "state": {"tenant_id": tenant}}
    await middleware(scope, receive, send)
    rng = random.Random(7)
    for _ in range(100):
        tasks = [asyncio.create_task(middleware(scope, receive, send)) for _ in range(8)]
        for _ in range(rng.randint(1, 3)):
            await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert await limiter.drain(5), "writes still in flight"
    counted = (await limiter.acquire(tenant, 1, AMPLE)).daily_used - 1
    assert len(emitted.events) == counted
    assert len({e.id for e in emitted.events}) == counted


async def test_drain_waits_for_the_replies_read_and_still_to_be_answered(
    client: aredis.Redis,
) -> None:
    """The second review's case: the replies of several writes read at once leave the writes
    in flight together and are answered a write per turn of the loop; drain returned as soon
    as nothing was in flight, and at shutdown the emitter then dropped the decisions handed
    over after it. It waits for every group read to be answered."""
    batcher = AsyncRateLimiter(client)._batcher
    loop = asyncio.get_running_loop()
    groups = [([loop.create_future() for _ in range(2)], [b"r", b"r"]) for _ in range(4)]
    batcher._answer_in_turns(groups)  # as _received does with four writes' replies in one read
    assert await batcher.drain(1.0)
    assert all(f.done() for futures, _ in groups for f in futures)
    assert batcher._deferred == 0


@pytest.mark.parametrize("answer_chunk", [8, 0])
async def test_callers_of_a_lone_write_are_answered_in_chunks_so_their_next_calls_go_early(
    client: aredis.Redis, tenant: str, answer_chunk: int
) -> None:
    """16 callers in lockstep: with answer_chunk=8 the lone write's callers are answered in
    halves, so the first 8 callers' next calls are written while the other 8 are still being
    answered (from then on two writes of ~8 alternate); with 0, every wave waits for all 16
    and goes out as one write."""
    limiter = AsyncRateLimiter(client, answer_chunk=answer_chunk)
    await limiter.acquire(tenant, 1, QUOTA)
    batches_before = sample("rate_limiter_batch_size_count")
    calls_before = sample("rate_limiter_batch_size_sum")
    used: list[int] = []

    async def caller() -> None:
        for _ in range(10):
            used.append((await limiter.acquire(tenant, 1, QUOTA)).daily_used)

    await asyncio.gather(*(caller() for _ in range(16)))

    assert sorted(used) == list(range(2, 162))  # every decision counted once, each its own
    calls = sample("rate_limiter_batch_size_sum") - calls_before
    per_write = calls / (sample("rate_limiter_batch_size_count") - batches_before)
    assert calls == 160
    if answer_chunk:
        assert per_write <= 10, per_write
    else:
        assert per_write == 16


async def test_a_connection_dropped_between_the_halves_still_answers_every_caller(
    client: aredis.Redis,
) -> None:
    """The replies of a write are read before they are handed out in halves: losing the
    connection (or closing the limiter) between the two must not leave the second half
    waiting forever."""
    batcher = batching.ScriptBatcher(client, answer_chunk=4)
    await batcher.submit(resp_command([b"PING"]))  # the pipe is open
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(10)]
    replies: list[object] = [*range(9), redis.ResponseError("that call's own error")]

    assert batcher._answer_in_halves(futures, replies, 4) is False
    assert [f.done() for f in futures] == [True] * 4 + [False] * 6
    await batcher.aclose()
    await asyncio.sleep(0)

    assert [f.result() for f in futures[:9]] == list(range(9))
    assert isinstance(futures[9].exception(), redis.ResponseError)


async def test_a_write_unanswered_within_the_socket_timeout_fails_alone_and_is_not_waited_out(
    dedicated_stack: LocalStack, tenant: str
) -> None:
    """Redis stops answering (``CLIENT PAUSE``): the calls in flight fail once the oldest write
    is ``socket_timeout`` old (a degraded decision, not a hang), and the limiter carries on
    on a new connection when Redis answers again."""
    url = dedicated_stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
    client = aredis.Redis.from_url(url, socket_timeout=0.3)
    limiter = AsyncRateLimiter(client)
    assert not (await limiter.acquire(tenant, 1, QUOTA)).degraded
    first_pipe = limiter._batcher._pipe

    raw = aredis.Redis.from_url(url)  # no socket timeout: it waits the pause out
    await raw.execute_command("CLIENT", "PAUSE", 3000, "ALL")

    async def ping() -> bool:
        return bool(await raw.ping())

    pause_over = asyncio.create_task(ping())  # answered when the pause ends
    paused = await asyncio.gather(*(limiter.acquire(tenant, 1, QUOTA) for _ in range(5)))

    # Degraded: no answer came; and before the pause ended, so they did not wait for one.
    assert all(d.degraded for d in paused)
    assert not pause_over.done()
    assert await pause_over
    deadline = time.monotonic() + 5  # the breaker lets a probe through after its reset time
    while (await limiter.acquire(tenant, 1, QUOTA)).degraded:
        assert time.monotonic() < deadline, "no decision from Redis after the pause"
        await asyncio.sleep(0.05)
    assert limiter._batcher._pipe is not first_pipe
    await raw.aclose()
    await client.aclose()


async def test_a_reply_nobody_awaits_drops_the_connection_not_the_next_callers(
    client: aredis.Redis, tenant: str
) -> None:
    """A reply with no call waiting for it means the stream is out of step: the connection is
    dropped rather than its replies handed to the wrong callers."""
    limiter = AsyncRateLimiter(client)
    await limiter.acquire(tenant, 1, QUOTA)
    pipe = limiter._batcher._pipe
    assert pipe is not None
    pipe.transport.write(resp_command([b"PING"]))  # behind the limiter's back
    deadline = time.monotonic() + 10
    while limiter._batcher._pipe is pipe:
        assert time.monotonic() < deadline, "the connection was kept after a stray reply"
        await asyncio.sleep(0.01)
    assert limiter._batcher._pipe is None
    used = [(await limiter.acquire(tenant, 1, QUOTA)).daily_used for _ in range(3)]
    assert used == [2, 3, 4]


async def test_a_full_socket_buffer_holds_writes_until_it_drains(
    client: aredis.Redis, tenant: str
) -> None:
    """Flow control: while the transport says its buffer is full (``pause_writing``), calls
    wait in the queue; ``resume_writing`` sends them."""
    limiter = AsyncRateLimiter(client)
    await limiter.acquire(tenant, 1, QUOTA)
    batcher = limiter._batcher
    pipe = batcher._pipe
    assert pipe is not None
    pipe.pause_writing()
    calls = [asyncio.create_task(limiter.acquire(tenant, 1, QUOTA)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert len(batcher._queue) == 3 and not batcher._inflight
    pipe.resume_writing()
    assert sorted(d.daily_used for d in await asyncio.gather(*calls)) == [2, 3, 4]


def test_decisions_are_counted_in_the_seed_metrics(redis_url: str, tenant: str) -> None:
    limiter = RateLimiter(redis.Redis.from_url(redis_url))
    before = {
        "consumed": sample("token_bucket_consumed_total"),
        "bucket": sample("rate_limiter_rejections_total", reason="bucket"),
        "daily": sample("rate_limiter_rejections_total", reason="daily"),
        "daily_hits": sample("daily_quota_hits_total"),
        "count": sample("rate_limiter_decision_seconds_count"),
    }
    q = Quota(rate_per_sec=0.001, burst=3, daily_limit=5)
    limiter.acquire(tenant, 2, q)  # allowed: 2 consumed
    limiter.acquire(tenant, 2, q)  # bucket: 1 token left
    limiter.acquire(tenant, 4, q)  # daily (2 + 4 > 5) and bucket: daily is the reason
    assert sample("token_bucket_consumed_total") - before["consumed"] == 2
    assert sample("rate_limiter_rejections_total", reason="bucket") - before["bucket"] == 1
    assert sample("rate_limiter_rejections_total", reason="daily") - before["daily"] == 1
    assert sample("daily_quota_hits_total") - before["daily_hits"] == 1
    assert sample("rate_limiter_decision_seconds_count") - before["count"] == 3


def test_a_forked_child_never_shares_the_parents_connection(redis_url: str, tenant: str) -> None:
    """The sync limiter keeps a connection of its own; after a fork the child must open its
    own, or parent and child would read each other's replies."""
    import multiprocessing

    limiter = RateLimiter(redis.Redis.from_url(redis_url))
    q = Quota(rate_per_sec=1000, burst=1000, daily_limit=10**6)
    first = limiter.acquire(tenant, 1, q).daily_used
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        out.put([limiter.acquire(tenant, 1, q).daily_used for _ in range(200)])

    procs = [ctx.Process(target=child) for _ in range(2)]
    for p in procs:
        p.start()
    mine = [limiter.acquire(tenant, 1, q).daily_used for _ in range(200)]
    theirs = [n for _ in procs for n in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
    assert sorted([first, *mine, *theirs]) == list(range(1, 602))
    assert mine == sorted(mine)

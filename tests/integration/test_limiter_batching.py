"""The async limiter's transport: concurrent decisions share pipelined round trips, and one
call's error or cancellation never leaks into the others in its batch. Also: the metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aredis
from prometheus_client import REGISTRY

from limiter import AsyncRateLimiter, Quota, RateLimiter, batching
from limiter.keys import token_bucket_key

QUOTA = Quota(rate_per_sec=1000, burst=1000, daily_limit=10**6)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aredis.Redis]:
    c = aredis.Redis.from_url(redis_url, socket_timeout=2.0)
    yield c
    await c.aclose()


@pytest.fixture(params=["hiredis", "public"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Replies read straight from hiredis (the fast path), or through redis-py's public
    ``read_response`` (the fallback when redis-py's internals differ): same results."""
    if request.param == "public":
        monkeypatch.setattr(batching, "hiredis_stream", lambda conn: None)
    return str(request.param)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_fast_reader_is_in_use_with_this_redis_py(client: aredis.Redis) -> None:
    conn = await client.connection_pool.get_connection()
    try:
        assert batching.hiredis_stream(conn) is not None
    finally:
        await client.connection_pool.release(conn)


async def test_concurrent_decisions_share_round_trips(
    client: aredis.Redis, tenant: str, reader: str
) -> None:
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
    client: aredis.Redis, redis_url: str, tenant: str, reader: str
) -> None:
    broken = f"{tenant}-broken"
    raw = redis.Redis.from_url(redis_url)
    raw.set(token_bucket_key(broken), "not a hash")  # every script call on it fails: WRONGTYPE
    limiter = AsyncRateLimiter(client)

    results = await asyncio.gather(
        *(limiter.acquire(broken if i % 10 == 0 else tenant, 1, QUOTA) for i in range(100)),
        return_exceptions=True,
    )

    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 10
    assert all(isinstance(e, redis.ResponseError) and "WRONGTYPE" in str(e) for e in errors)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert sorted(d.daily_used for d in ok) == list(range(1, 91))
    assert limiter.breaker.state == "closed"  # a bad key is not an outage
    raw.delete(token_bucket_key(broken))


async def test_cancelled_callers_do_not_disturb_the_rest_of_the_batch(
    client: aredis.Redis, tenant: str, reader: str
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


@pytest.mark.parametrize("answer_chunk", [8, 0])
async def test_callers_of_a_lone_write_are_answered_in_chunks_so_their_next_calls_go_early(
    client: aredis.Redis, tenant: str, reader: str, answer_chunk: int
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


async def test_a_reader_cancelled_between_chunks_still_answers_every_caller(
    client: aredis.Redis,
) -> None:
    """The replies of a write are read before they are handed out in chunks: a cancellation
    (or a reset) between two chunks must not leave the later callers waiting forever."""
    batcher = batching.ScriptBatcher(client, answer_chunk=4)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(10)]
    replies: list[object] = [*range(9), redis.ResponseError("that call's own error")]

    task = asyncio.create_task(batcher._answer_in_halves(futures, replies, 4))
    await asyncio.sleep(0)  # the first chunk is answered, the task waits at its yield
    assert [f.done() for f in futures] == [True] * 4 + [False] * 6
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert [f.result() for f in futures[:9]] == list(range(9))
    assert isinstance(futures[9].exception(), redis.ResponseError)


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

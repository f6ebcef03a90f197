"""Coalescing script calls into pipelined round trips (the async limiter's transport).

Python's per-call cost, not Redis, bounds a limiter: one round trip per decision tops out far
below what Redis serves. So calls waiting at the same moment go out together in one pipelined
write (``transaction=False``: each EVALSHA is still its own atomic script call, nothing is
wrapped in MULTI).

Against a single node or a Sentinel master this is auto-pipelining on one held connection, as
ioredis and rueidis do it: a writer task sends whatever is queued when the event loop gets to
it, without waiting for earlier replies, and a reader task matches replies to callers in order.
A write carries at most ``max_batch`` calls and at most ``max_inflight`` writes await replies,
so with many callers several writes are in flight: Redis executes one while Python decodes the
replies of the last and encodes the next. (One write holding every caller would make client
and server take turns, each idle half the time.) With tens of callers there is often one write
in flight, and its callers come back together; so when no other write is in flight (and
there are more than ``answer_chunk`` of them) they are answered in two halves, the writer
running in between: the first half's next calls reach Redis while the second half is still
being answered, and from then on two writes alternate in flight (16-64 closed-loop callers:
1.4-1.6x the decisions per second, p50 0.6-0.7x, for 7-20% more client CPU per decision; see
``benchmarks/bench_batching.py``). An idle limiter adds no delay: a lone call is written at
once. Against a Cluster, redis-py's cluster pipeline groups the calls per node, one
pipeline per batch.

A reply of ``NOSCRIPT`` (after ``SCRIPT FLUSH``, a restart, a failover) loads the scripts once
and that call is sent again; each call's own error reply goes to its own caller; a connection
failure, a timeout (``socket_timeout`` from each write) or a ``READONLY`` reply (the server
became a replica) fails the calls in flight and the next write opens a new connection.

A caller cancelled after its call was queued is simply not answered: the call itself may still
run (once it is written, Redis executes it), exactly as with any request cancelled in flight.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from limiter import metrics
from limiter.scripts import SCRIPTS, resp_command


def _hiredis_internals() -> tuple[Any, Any]:
    """hiredis's reader type and redis-py's "no complete reply yet" marker, or (None, _)."""
    try:
        from hiredis import Reader
        from redis._parsers.hiredis import NOT_ENOUGH_DATA
    except ImportError:  # no hiredis, or a redis-py that moved it: the public reader is used
        return None, object()
    return Reader, NOT_ENOUGH_DATA


_HiredisReader, _NOT_ENOUGH_DATA = _hiredis_internals()
_PushNotification: Any = getattr(sys.modules.get("hiredis"), "PushNotification", None)


class ScriptBatcher:
    """Coalesces script calls into pipelined writes; see the module docstring.

    ``max_batch`` bounds one write; ``max_inflight`` bounds the writes whose replies are still
    awaited (on a single node: the depth of the pipeline on the one connection; on a Cluster:
    the pipelines in flight at once); ``overlap_at`` (Cluster only) is the queue length at which
    a second pipeline starts while one is in flight; ``answer_chunk`` (single node and Sentinel):
    a write whose replies arrive when no other write is in flight, with more than this many
    callers, has its callers answered in halves, the writer running in between (0: always all
    at once; see :meth:`_answer_in_halves`)."""

    def __init__(
        self,
        client: Any,
        *,
        max_batch: int = 64,
        max_inflight: int = 4,
        overlap_at: int = 64,
        answer_chunk: int = 8,
    ) -> None:
        if max_batch < 1 or max_inflight < 1 or overlap_at < 1:
            raise ValueError("max_batch, max_inflight and overlap_at must be >= 1")
        if answer_chunk < 0:
            raise ValueError("answer_chunk must be >= 0 (0: answer every reply of a write at once)")
        self.answer_chunk = answer_chunk
        self.overlap_at = overlap_at
        self.client = client
        self.packed = not isinstance(client, RedisCluster)
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._queue: list[tuple[asyncio.Future[Any], Any]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_size = metrics.rate_limiter_batch_size
        # Single node / Sentinel: one held connection, a writer and a reader task.
        self._conn: Any = None
        self._inflight: deque[tuple[float | None, list[asyncio.Future[Any]]]] = deque()
        self._slot: asyncio.Event | None = None  # set when the pipeline has room again
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loading: asyncio.Task[None] | None = None

    async def execute(self, call: Any) -> Any:
        """Send one call (packed bytes, or an argument tuple on a Cluster) and return its reply.

        A ``NOSCRIPT`` reply (after ``SCRIPT FLUSH``, a restart, a failover) loads the scripts
        once for every caller that saw it, and the call is sent again, once."""
        try:
            return await self.submit(call)
        except NoScriptError:
            await self._load_scripts()
            return await self.submit(call)

    def submit(self, call: Any) -> asyncio.Future[Any]:
        """Queue one call; the future gets its reply (an error reply as its exception)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        queue = self._queue
        queue.append((fut, call))
        if self.packed:
            if self._writer is None:
                self._writer = loop.create_task(self._write_loop())
        elif self._running == 0 or (
            len(queue) >= self.overlap_at and self._running < self.max_inflight
        ):
            self._running += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def aclose(self) -> None:
        """Return the held connection to its pool (pending callers get ``ConnectionError``)."""
        await self._reset(RedisConnectionError("the limiter was closed"), restart=False)

    async def _load_scripts(self) -> None:
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load_all())
        await asyncio.shield(self._loading)

    async def _load_all(self) -> None:
        if not self.packed:  # a Cluster client loads them on every primary
            for script in SCRIPTS:
                await self.client.script_load(script.source)
            return
        # On the limiter's own connection, the one that just answered NOSCRIPT: after a restart
        # the client's pooled connections may still be the dead ones.
        for script in SCRIPTS:
            await self.submit(resp_command([b"SCRIPT", b"LOAD", script.source]))

    # -- single node and Sentinel: auto-pipelining on one connection -----------------------

    async def _write_loop(self) -> None:
        """Write whatever is queued as one command buffer, as long as the pipeline has room.

        It runs when the event loop gets to it, so every call queued in the meantime goes out
        in the same write; and it does not wait for replies, so Redis executes one write while
        Python encodes the next and decodes the last (the reader task matches replies to
        callers in order)."""
        loop = asyncio.get_running_loop()
        queue = self._queue
        batch: list[tuple[asyncio.Future[Any], Any]] = []
        try:
            while queue:
                while len(self._inflight) >= self.max_inflight:
                    self._slot = slot = asyncio.Event()
                    await slot.wait()
                if not queue:
                    break
                conn = self._conn
                if conn is not None and not self._inflight and _closed_by_server(conn):
                    # Redis closed it while the limiter was idle (a restart, a timeout): the
                    # next calls go out on a fresh connection instead of failing.
                    await self._reset(RedisConnectionError("closed by the server"), restart=False)
                    conn = None
                if conn is None:
                    conn = self._conn = await self.client.connection_pool.get_connection()
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                self._batch_size.observe(len(batch))
                timeout = conn.socket_timeout
                deadline = None if timeout is None else loop.time() + timeout
                self._inflight.append((deadline, [fut for fut, _ in batch]))
                if self._reader is None:
                    self._reader = loop.create_task(self._read_loop(conn))
                await conn.send_packed_command((b"".join([c for _, c in batch]),), False)
                batch = []
        except BaseException as exc:
            # No connection, or the write failed: every call waiting for this connection
            # fails now (the breaker decides when to try again), including those queued.
            waiting, self._queue[:] = [*batch, *queue], []
            for fut, _ in waiting:
                if not fut.done():
                    fut.set_exception(exc)
            await self._reset(exc, restart=False)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None
                if queue:  # calls queued while the last write or a reset was awaited
                    self._writer = loop.create_task(self._write_loop())

    async def _read_loop(self, conn: Any) -> None:
        """Read the replies of the writes in flight, in order, each by its deadline."""
        inflight = self._inflight
        direct = hiredis_stream(conn)
        try:
            while inflight and self._conn is conn:
                deadline, futures = inflight[0]
                async with asyncio.timeout_at(deadline):
                    if direct is not None:
                        replies = await read_replies_hiredis(*direct, len(futures))
                    else:
                        replies = await read_replies(conn, len(futures))
                inflight.popleft()
                if inflight or len(futures) <= self.answer_chunk or not self.answer_chunk:
                    readonly = _answer(futures, replies)
                    # The writer resumes after the callers just answered (callbacks run in
                    # order): their next calls, queued meanwhile, go out together in its next
                    # write.
                    self._free_slot()
                else:
                    readonly = await self._answer_in_halves(futures, replies)
                if readonly:  # a failover made this server a replica: find the new master
                    raise RedisConnectionError("Redis answered READONLY: no longer the master")
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                exc = RedisTimeoutError(f"no reply within {conn.socket_timeout} s")
            await self._reset(exc, conn)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None

    async def _answer_in_halves(
        self, futures: list[asyncio.Future[Any]], replies: list[Any], first: int | None = None
    ) -> bool:
        """Answer the first ``first`` callers (default: half, at least ``answer_chunk``), let
        the writer send their next calls, then answer the rest.

        Used for a write that was the only one in flight: Redis is idle until the next write.
        Answered all at once, every caller would run on before any of their next calls went
        out, and Redis would wait for the whole wave (client and server taking turns); answered
        in halves, the first half's next calls are written while the second half is still being
        answered. Once split, the callers stay in two groups whose writes alternate, so the
        pipeline keeps two writes in flight and this path is rarely taken again (counted: ~20
        times in a second of 32 closed-loop callers). Every reply is given even if the reader
        is cancelled meanwhile (they were read)."""
        if first is None:
            first = max(self.answer_chunk, (len(futures) + 1) // 2)
        readonly = _answer(futures[:first], replies[:first])
        self._free_slot()
        try:
            await asyncio.sleep(0)
        finally:
            readonly |= _answer(futures[first:], replies[first:])
            self._free_slot()
        return readonly

    def _free_slot(self) -> None:
        """Wake the writer waiting for room in the pipeline, if it is waiting."""
        if self._slot is not None:
            self._slot.set()
            self._slot = None

    async def _reset(self, exc: BaseException, conn: Any = None, restart: bool = True) -> None:
        """Fail every call in flight with ``exc`` and drop the connection (its replies may be
        half read, so it is never reused). Queued calls go out on a new connection
        (``restart``)."""
        held = self._conn
        if held is None or (conn is not None and held is not conn):
            return
        self._conn = None
        inflight, self._inflight = self._inflight, deque()
        self._free_slot()
        error = exc if isinstance(exc, Exception) else RedisConnectionError(str(exc) or "cancelled")
        for _, futures in inflight:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(error)
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._reader = None
        try:
            await held.disconnect()
        finally:
            await self.client.connection_pool.release(held)
        if restart and self._queue and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    # -- Cluster: redis-py's cluster pipeline, grouped per node --------------------------

    async def _drain(self) -> None:
        try:
            queue = self._queue
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                self._batch_size.observe(len(batch))
                try:
                    replies = await self._send_pipeline([call for _, call in batch])
                except BaseException as exc:
                    for fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                _answer([fut for fut, _ in batch], replies)
        finally:
            self._running -= 1

    async def _send_pipeline(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for args in calls:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))


def _answer(futures: Sequence[asyncio.Future[Any]], replies: Sequence[Any]) -> bool:
    """Give each caller its reply (an error reply as its exception); a caller that gave up
    (cancelled) is skipped. True if a reply was ``READONLY`` (the server became a replica)."""
    readonly = False
    for fut, reply in zip(futures, replies, strict=True):
        if isinstance(reply, ReadOnlyError):
            readonly = True
        if fut.done():
            continue
        if isinstance(reply, Exception):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)
    return readonly


def _closed_by_server(conn: Any) -> bool:
    """The event loop has already seen this connection's EOF (no system call needed)."""
    stream = getattr(conn, "_reader", None)
    if stream is None:
        return True  # disconnected
    if isinstance(stream, asyncio.StreamReader):
        return stream.at_eof() or stream.exception() is not None
    return False


async def read_replies(conn: Any, count: int) -> list[Any]:
    """``count`` replies through redis-py's public reader; an error reply becomes its value."""
    replies: list[Any] = []
    read = conn.read_response
    for _ in range(count):
        try:
            replies.append(await read(timeout=math.inf))
        except ResponseError as exc:  # that call's own error reply
            replies.append(exc)
    return replies


def hiredis_stream(conn: Any) -> tuple[Any, asyncio.StreamReader] | None:
    """The connection's hiredis reader and socket stream, when it has them.

    redis-py's ``read_response`` costs a few microseconds per reply on top of hiredis, which is
    a tenth of a decision's budget here; so when the connection's parser is redis-py's hiredis
    parser, the replies are taken from that same reader directly. These are redis-py
    internals: with any other parser (or a version without them) the public path is used.
    """
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    stream = getattr(conn, "_reader", None)
    if (
        _HiredisReader is not None
        and isinstance(reader, _HiredisReader)
        and isinstance(stream, asyncio.StreamReader)
    ):
        return reader, stream
    return None


async def read_replies_hiredis(reader: Any, stream: asyncio.StreamReader, count: int) -> list[Any]:
    """``count`` replies from a hiredis reader fed from ``stream``; error replies come back as
    exception objects (redis-py configures the reader so), exactly as :func:`read_replies`."""
    replies: list[Any] = []
    gets = reader.gets
    while len(replies) < count:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            data = await stream.read(65536)
            if not data:
                raise RedisConnectionError("Redis closed the connection mid-batch")
            reader.feed(data)
            continue
        if isinstance(reply, RedisConnectionError):
            raise reply
        if _PushNotification is not None and isinstance(reply, _PushNotification):
            continue  # RESP3 out-of-band message (none is subscribed here): not a reply
        replies.append(reply)
    return replies

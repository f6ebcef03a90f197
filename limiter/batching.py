"""Coalescing script calls into pipelined round trips (the async limiter's transport).

Python's per-call cost, not Redis, bounds a limiter: one round trip per decision tops out far
below what Redis serves. So every call waiting at the same moment goes out in ONE pipelined
write (``transaction=False``: each EVALSHA is still its own atomic script call, nothing is
wrapped in MULTI). A drain task sends whatever is queued when the event loop gets to it; calls
that arrive while a batch is in flight form the next batch, so batches grow with the load and
an idle limiter adds no delay. While a batch is in flight, another drain task (up to
``max_inflight``) starts once ``overlap_at`` calls are waiting, so Redis executes one batch
while Python encodes the next and decodes the last.

Against a single node or a Sentinel master, the pre-encoded calls are written on one pooled
connection and the replies read back in order. Against a Cluster, redis-py's cluster pipeline
groups the calls per node. Either way a reply of ``NOSCRIPT`` (after ``SCRIPT FLUSH``, a restart,
a failover) loads the scripts and sends those calls again; each call's own error reply goes to
its own caller, and a connection failure goes to every caller in the batch.

A caller cancelled after its call was queued is simply not answered: the call itself may still
run (once it is written, Redis executes it), exactly as with any request cancelled in flight.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from limiter import metrics
from limiter.scripts import SCRIPTS


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
    def __init__(
        self, client: Any, *, max_batch: int = 512, max_inflight: int = 2, overlap_at: int = 64
    ) -> None:
        if max_batch < 1 or max_inflight < 1 or overlap_at < 1:
            raise ValueError("max_batch, max_inflight and overlap_at must be >= 1")
        self.overlap_at = overlap_at
        self.client = client
        self.packed = not isinstance(client, RedisCluster)
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._queue: list[tuple[asyncio.Future[Any], Any]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_size = metrics.rate_limiter_batch_size

    def submit(self, call: Any) -> asyncio.Future[Any]:
        """Queue one call (packed bytes, or an argument tuple on a Cluster); await its reply."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        queue = self._queue
        queue.append((fut, call))
        if self._running == 0 or (
            len(queue) >= self.overlap_at and self._running < self.max_inflight
        ):
            self._running += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _drain(self) -> None:
        try:
            queue = self._queue
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                self._batch_size.observe(len(batch))
                try:
                    replies = await self._send([call for _, call in batch])
                except BaseException as exc:
                    for fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (fut, _), reply in zip(batch, replies, strict=True):
                    if fut.done():  # the caller gave up (cancelled)
                        continue
                    if isinstance(reply, Exception):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        finally:
            self._running -= 1

    async def _send(self, calls: Sequence[Any], reload: bool = True) -> list[Any]:
        replies = await (self._send_packed(calls) if self.packed else self._send_pipeline(calls))
        if reload:
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                for script in SCRIPTS:
                    await self.client.script_load(script.source)
                again = await self._send([calls[i] for i in missing], reload=False)
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        return replies

    async def _send_packed(self, calls: Sequence[bytes]) -> list[Any]:
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            # One deadline for the whole batch instead of a timer per reply: the socket timeout
            # bounds the round trip, and reading replies that are already buffered is cheap.
            async with asyncio.timeout(conn.socket_timeout):
                await conn.send_packed_command((b"".join(calls),))
                direct = hiredis_stream(conn)
                if direct is not None:
                    return await read_replies_hiredis(*direct, len(calls))
                return await read_replies(conn, len(calls))
        except BaseException as exc:
            await conn.disconnect()  # replies may be half read: never reuse this connection
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no reply within {conn.socket_timeout} s") from exc
            raise
        finally:
            await pool.release(conn)

    async def _send_pipeline(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for args in calls:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))


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

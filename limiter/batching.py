"""Coalescing script calls into pipelined round trips (the async limiter's transport).

Python's per-call cost, not Redis, bounds a limiter: one round trip per decision tops out far
below what Redis serves. So calls waiting at the same moment go out together in one pipelined
write (``transaction=False``: each EVALSHA is still its own atomic script call, nothing is
wrapped in MULTI).

Against a single node or a Sentinel master this is auto-pipelining on one held connection, as
ioredis and rueidis do it, driven by the event loop's callbacks rather than by tasks: a call
queued by a caller schedules one flush for the current turn of the loop, which writes whatever
is queued by then as one command buffer, without waiting for earlier replies; the replies are
parsed (hiredis) in the connection's ``data_received`` and handed to their callers in order.
A write carries at most ``max_batch`` calls and at most ``max_inflight`` writes await replies,
so with many callers several writes are in flight: Redis executes one while Python decodes the
replies of the last and encodes the next. (One write holding every caller would make client
and server take turns, each idle half the time.) With tens of callers there is often one write
in flight, and its callers come back together; so when no other write is in flight (and
there are more than ``answer_chunk`` of them) they are answered in two halves, the second a
turn of the loop later: the first half's next calls are written before the second half's
callers run, and from then on two writes alternate in flight (16-64 closed-loop callers:
1.4-1.6x the decisions per second, p50 0.6-0.7x, for 7-20% more client CPU per decision; see
``benchmarks/bench_batching.py``). Likewise, when the replies of several writes arrive in one
read, their callers are answered a write per turn of the loop, so their writes stay apart.
An idle limiter adds no delay: a lone call is written in the same turn of the loop.

Why callbacks and not a writer and a reader task: a task's step, redis-py's
``send_packed_command`` (an ``asyncio.wait_for`` task per write when a socket timeout is set),
a ``StreamReader`` wake-up and a timeout context per read cost more than the write and the
parse they wrap. On the connection redis-py opened and set up (AUTH, HELLO, SELECT, TLS,
Sentinel's choice of master), the limiter replaces the stream's protocol with its own
(``transport.set_protocol``), keeping redis-py's in the chain for ``connection_lost``; one timer
watches the oldest write's deadline (``socket_timeout``). Against the tasks: 0.59x the client
CPU per decision with one caller, 0.74x with 16, 0.87-0.90x with 64, and 1.03-1.31x the
decisions per second (``benchmarks/bench_batching.py --baseline-ref a4a3c59``).

Against a Cluster, a batch goes out as one redis-py cluster pipeline per master (by the slot of
each call's first key), the pipelines sent concurrently: a pipeline that fails raises its
error for all its calls, and one shared by the whole batch would fail the calls that did run
on the healthy masters (their units counted) with the error of one dead master. Each call
gets its own master's outcome instead; none is ever sent again, as it may have run.

A reply of ``NOSCRIPT`` (after ``SCRIPT FLUSH``, a restart, a failover) loads the scripts once
and that call is sent again; each call's own error reply goes to its own caller; a connection
failure, a timeout (``socket_timeout`` from each write) or a ``READONLY`` reply (the server
became a replica) fails the calls in flight and the next write opens a new connection.

A cancelled caller: a call still queued is written all the same, unless its caller hands it
back with :meth:`ScriptBatcher.abandon`; then it is taken out of the queue and never runs. A
call already written runs in Redis whatever happens to its caller (its units are spent), so
``abandon`` also takes a callback that gets the call's reply when it arrives: the async
limiter builds the decision from it, and the middleware emits it, so that no decision Redis
counted goes without its usage event.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from limiter import metrics
from limiter.scripts import SCRIPTS, resp_command

log = logging.getLogger(__name__)

_NOT_ENOUGH_DATA = object()  # hiredis's answer while a reply is incomplete
_UNKNOWN = object()  # the outcome of a cancelled caller's call when its connection failed
_PushNotification = getattr(hiredis, "PushNotification", None)  # RESP3 out-of-band messages

#: A parsed reply of any kind a pipelined call gets: a value, or its own error reply as an
#: exception object (redis-py's mapping: NOSCRIPT -> NoScriptError, READONLY -> ReadOnlyError).
Reply = Any
#: A queued call: its caller's future and the call (packed bytes, or a Cluster argument tuple).
_Queued = tuple[asyncio.Future[Any], Any]


def _reply_reader() -> hiredis.Reader:
    """A RESP2/RESP3 parser whose error replies are redis-py's exception objects."""
    return hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=BaseParser.parse_error,
        notEnoughData=_NOT_ENOUGH_DATA,
    )


class ScriptBatcher:
    """Coalesces script calls into pipelined writes; see the module docstring.

    ``max_batch`` bounds one write; ``max_inflight`` bounds the writes whose replies are still
    awaited (on a single node: the depth of the pipeline on the one connection; on a Cluster:
    the batches in flight at once, each sent as one pipeline per master); ``overlap_at``
    (Cluster only) is the queue length at which a second batch starts while one is in flight;
    ``answer_chunk`` (single node and Sentinel): a write whose replies arrive when no other
    write is in flight, with more than this many callers, has its callers answered in halves,
    the writer running in between (0: always all at once; see :meth:`_answer_in_halves`)."""

    def __init__(
        self,
        client: Any,
        *,
        max_batch: int = 64,
        max_inflight: int = 4,
        overlap_at: int = 64,
        answer_chunk: int = 8,
        on_scripts_loaded: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_inflight < 1 or overlap_at < 1:
            raise ValueError("max_batch, max_inflight and overlap_at must be >= 1")
        if answer_chunk < 0:
            raise ValueError("answer_chunk must be >= 0 (0: answer every reply of a write at once)")
        self.answer_chunk = answer_chunk
        self.overlap_at = overlap_at
        #: called once the scripts were loaded after a NOSCRIPT (the server changed)
        self.on_scripts_loaded = on_scripts_loaded
        self.client = client
        self.packed = not isinstance(client, RedisCluster)
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._queue: list[tuple[asyncio.Future[Any], Any]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_size = metrics.rate_limiter_batch_size
        # Single node / Sentinel: one held connection, driven by callbacks (see _Pipe).
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the calls came from
        self._conn: Any = None  # redis-py's connection, held while the pipe is open
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._flush_due = False  # a flush is scheduled for this turn of the loop
        self._inflight: deque[tuple[float | None, list[asyncio.Future[Any]]]] = deque()
        self._replies: list[Reply] = []  # the oldest write's replies read so far
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._loading: asyncio.Task[None] | None = None
        #: written calls whose callers were cancelled: the callback for each one's reply
        self._abandoned: dict[asyncio.Future[Any], Callable[[Reply], None]] = {}
        #: replies of cancelled callers that have not called ``abandon`` yet (one turn)
        self._unclaimed: dict[asyncio.Future[Any], Reply] = {}
        #: groups of replies read and not answered yet (:meth:`_answer_in_turns`)
        self._deferred = 0

    async def execute(self, call: Any) -> Any:
        """Send one call (packed bytes, or an argument tuple on a Cluster) and return its reply.

        A ``NOSCRIPT`` reply (after ``SCRIPT FLUSH``, a restart, a failover) loads the scripts
        once for every caller that saw it, and the call is sent again, once."""
        try:
            return await self.submit(call)
        except NoScriptError:
            await self.load_scripts()
            return await self.submit(call)

    def submit(self, call: Any) -> asyncio.Future[Any]:
        """Queue one call; the future gets its reply (an error reply as its exception)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        queue = self._queue
        queue.append((fut, call))
        if self.packed:
            if not self._flush_due:  # the first call of this turn of the loop
                self._loop = loop
                self._schedule_flush()
        elif self._running == 0 or (
            len(queue) >= self.overlap_at and self._running < self.max_inflight
        ):
            self._running += 1
            self._spawn(self._drain())
        return fut

    def abandon(self, fut: asyncio.Future[Any], on_reply: Callable[[Reply], None]) -> None:
        """The caller of ``fut`` (from :meth:`submit`) was cancelled while it waited.

        A call not written yet leaves the queue: it never runs. A written call runs in Redis
        whatever happens to its caller, so ``on_reply`` gets its reply (an error reply as an
        exception object) when it arrives; not on a timeout or a lost connection, as then
        whether it ran is unknown (as it is for a caller still waiting, which gets the error).
        A reply that arrived between the cancellation and this call is handed over at once."""
        if fut.done() and not fut.cancelled():  # answered before the cancellation took effect
            exc = fut.exception()
            self._hand_over(on_reply, exc if exc is not None else fut.result())
            return
        queue = self._queue
        for i, (queued, _) in enumerate(queue):
            if queued is fut:
                del queue[i]
                return
        if fut in self._unclaimed:
            reply = self._unclaimed.pop(fut)
            if reply is not _UNKNOWN:
                self._hand_over(on_reply, reply)
        else:
            self._abandoned[fut] = on_reply

    def _orphan_reply(self, fut: asyncio.Future[Any], reply: Reply) -> None:
        """A reply for a caller that is no longer waiting (cancelled)."""
        on_reply = self._abandoned.pop(fut, None)
        if on_reply is not None:
            if reply is not _UNKNOWN:
                self._hand_over(on_reply, reply)
        elif fut.cancelled():
            # The cancelled caller's ``abandon`` may come in a later callback (its task wakes
            # up after the cancellation's turn of the loop): the reply waits for it one turn.
            unclaimed = self._unclaimed
            unclaimed[fut] = reply
            asyncio.get_running_loop().call_soon(unclaimed.pop, fut, None)

    @staticmethod
    def _hand_over(on_reply: Callable[[Reply], None], reply: Reply) -> None:
        try:
            on_reply(reply)
        except Exception:  # the transport's callbacks must go on answering the other callers
            log.exception("the callback of a cancelled caller's reply failed")

    async def drain(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` s, until no call is queued or awaits its reply, so that the
        replies of callers cancelled in flight have reached their ``abandon`` callbacks. A
        server's shutdown cancels its requests and then closes what their decisions go to (the
        emitter): it drains the limiter in between. True if nothing was left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await asyncio.sleep(0)  # the cancelled callers take back what is not written yet
        while self._queue or self._inflight or self._running or self._deferred or self._unclaimed:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def aclose(self) -> None:
        """Return the held connection to its pool (the calls in flight get
        ``ConnectionError``; calls queued later open a new connection)."""
        self._drop_connection(RedisConnectionError("the limiter was closed"), restart=False)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def load_scripts(self) -> None:
        """Load the scripts (after a ``NOSCRIPT``), once for all the callers that saw it at
        the same time; then ``on_scripts_loaded``."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load_all())
        await asyncio.shield(self._loading)

    async def _load_all(self) -> None:
        if not self.packed:  # a Cluster client loads them on every primary
            for script in SCRIPTS:
                await self.client.script_load(script.source)
        else:
            # On the limiter's own connection, the one that just answered NOSCRIPT: after a
            # restart the client's pooled connections may still be the dead ones.
            for script in SCRIPTS:
                await self.submit(resp_command([b"SCRIPT", b"LOAD", script.source]))
        if self.on_scripts_loaded is not None:
            self.on_scripts_loaded()

    # -- single node and Sentinel: auto-pipelining on one connection -----------------------

    def _flush(self) -> None:
        """Write what is queued, as one command buffer per ``max_batch`` calls, while the
        pipeline has room (the rest goes out as replies free it).

        Scheduled once per turn of the event loop by the first call queued in it, so every
        call queued in the same turn goes out in the same write."""
        self._flush_due = False
        pipe = self._pipe
        if pipe is None:
            if self._connecting is None and self._queue:
                self._connecting = self._spawn(self._connect())
            return
        if pipe.paused:  # the socket's buffer is full: resume_writing flushes again
            return
        queue = self._queue
        inflight = self._inflight
        write = pipe.transport.write
        timeout = self._conn.socket_timeout
        assert self._loop is not None  # set by the call that queued
        clock = self._loop.time
        while queue and len(inflight) < self.max_inflight:
            batch = queue[: self.max_batch]
            del queue[: self.max_batch]
            self._batch_size.observe(len(batch))
            deadline = None if timeout is None else clock() + timeout
            inflight.append((deadline, [fut for fut, _ in batch]))
            write(b"".join([call for _, call in batch]))
        if inflight and self._deadline_timer is None:
            self._watch_deadline()

    def _schedule_flush(self) -> None:
        """One flush in this turn of the loop, if calls wait and none is due yet."""
        if not self._flush_due and self._queue and self._loop is not None:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    async def _connect(self) -> None:
        """Take a connection from the pool and put the limiter's protocol on it; on failure,
        every queued call fails with the error (the breaker decides when to try again)."""
        try:
            conn = await self.client.connection_pool.get_connection()
            try:
                self._pipe = _Pipe(self, conn)
            except BaseException:
                await self.client.connection_pool.release(conn)
                raise
            self._conn = conn
        except BaseException as exc:
            waiting, self._queue[:] = list(self._queue), []
            self._fail([fut for fut, _ in waiting], exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._connecting = None
        self._flush()

    def _received(self, pipe: _Pipe, data: bytes) -> None:
        """Parse what arrived and answer each write's callers once all its replies are in."""
        if pipe is not self._pipe:
            return  # a dropped connection's last bytes
        parser = pipe.parser
        parser.feed(data)
        inflight = self._inflight
        replies = self._replies
        completed: list[tuple[list[asyncio.Future[Any]], list[Reply]]] = []
        try:
            while (reply := parser.gets()) is not _NOT_ENOUGH_DATA:
                if type(reply) is _PushNotification:
                    continue  # RESP3 out-of-band message (none is subscribed here): not a reply
                if not inflight:
                    raise InvalidResponse(f"a reply with no call awaiting it: {reply!r}")
                replies.append(reply)
                futures = inflight[0][1]
                if len(replies) < len(futures):
                    continue
                inflight.popleft()
                completed.append((futures, replies))
                self._replies = replies = []
        except Exception as exc:  # a protocol error: the stream cannot be trusted any more
            self._answer_in_turns(completed)  # what was read in full is still answered
            self._drop_connection(exc)
            return
        if not self.answer_chunk:
            readonly = False
            for futures, done in completed:
                readonly |= self._answer(futures, done)
        elif len(completed) == 1 and not inflight and len(completed[0][0]) > self.answer_chunk:
            readonly = self._answer_in_halves(*completed[0])
        else:
            readonly = self._answer_in_turns(completed)
        if readonly:  # a failover made this server a replica: find the new master
            self._drop_connection(
                RedisConnectionError("Redis answered READONLY: no longer the master")
            )
            return
        # The callers just answered run before this flush (callbacks run in order), so their
        # next calls go out together in one write.
        self._schedule_flush()

    def _answer_in_turns(self, groups: list[tuple[list[asyncio.Future[Any]], list[Reply]]]) -> bool:
        """Answer the first group of callers now and each further group a turn of the loop
        after the one before, so that every group's next calls are written before the next
        group's callers run: the groups' writes stay apart instead of merging into one.

        Used when the replies of several writes arrive in one read (answered together, their
        callers would send their next calls as one write, and Redis would wait for all of
        them), and for the halves of a lone write (:meth:`_answer_in_halves`). The replies are
        already read: every group is answered whatever happens to the connection meanwhile.
        True if a reply was ``READONLY``."""
        if not groups:
            return False
        (futures, replies), *rest = groups
        readonly = self._answer(futures, replies)
        if rest:
            readonly |= any(isinstance(r, ReadOnlyError) for _, later in rest for r in later)
            self._deferred += 1  # off _inflight already: drain waits for them here
            asyncio.get_running_loop().call_soon(self._answer_deferred, rest)
        return readonly

    def _answer_deferred(self, groups: list[tuple[list[asyncio.Future[Any]], list[Reply]]]) -> None:
        self._deferred -= 1
        self._answer_in_turns(groups)

    def _answer_in_halves(
        self, futures: list[asyncio.Future[Any]], replies: list[Reply], first: int | None = None
    ) -> bool:
        """Answer the first ``first`` callers (default: half, at least ``answer_chunk``) now and
        the rest a turn of the loop later, after the first half's next calls were written.

        Used for a write that was the only one in flight: Redis is idle until the next write.
        Answered all at once, every caller would run on before any of their next calls went
        out, and Redis would wait for the whole wave (client and server taking turns); answered
        in halves, the first half's next calls are written while the second half is still being
        answered. Once split, the callers stay in two groups whose writes alternate, so the
        pipeline keeps two writes in flight and this path is rarely taken again (counted: ~20
        times in a second of 32 closed-loop callers). True if a reply was ``READONLY``."""
        if first is None:
            first = max(self.answer_chunk, (len(futures) + 1) // 2)
        return self._answer_in_turns(
            [(futures[:first], replies[:first]), (futures[first:], replies[first:])]
        )

    def _watch_deadline(self) -> None:
        """Fail the pipe if the oldest write is past its deadline; else look again then."""
        self._deadline_timer = None
        if not self._inflight or self._pipe is None:
            return
        deadline = self._inflight[0][0]
        if deadline is None:
            return
        loop = self._loop
        assert loop is not None  # set by the call that queued the write
        if loop.time() >= deadline:
            timeout = self._conn.socket_timeout
            self._drop_connection(RedisTimeoutError(f"no reply within {timeout} s"))
        else:
            self._deadline_timer = loop.call_at(deadline, self._watch_deadline)

    def _drop_connection(self, exc: Exception, *, restart: bool = True) -> None:
        """Fail every call in flight with ``exc`` and close the connection (its replies may be
        half read, so it is never reused). Queued calls go out on a new connection
        (``restart``)."""
        pipe, conn = self._pipe, self._conn
        if pipe is None:
            return
        self._pipe = self._conn = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        inflight, self._inflight = self._inflight, deque()
        self._replies = []
        for _, futures in inflight:
            self._fail(futures, exc)
        self._spawn(self._release(conn))
        if restart:
            self._schedule_flush()

    async def _release(self, conn: Any) -> None:
        try:
            await conn.disconnect(nowait=True)
        finally:
            await self.client.connection_pool.release(conn)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- Cluster: one redis-py cluster pipeline per master -------------------------------

    async def _drain(self) -> None:
        try:
            queue = self._queue
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                self._batch_size.observe(len(batch))
                groups = self._by_node(batch)
                if len(groups) == 1:
                    await self._send_group(batch)
                    continue
                # Every group settles before anything is raised (a cancellation, say), so no
                # caller is left unanswered while its pipeline still runs.
                outcomes = await asyncio.gather(
                    *(self._send_group(group) for group in groups), return_exceptions=True
                )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
        finally:
            self._running -= 1

    def _by_node(self, batch: list[_Queued]) -> list[list[_Queued]]:
        """The batch's calls grouped by the master that owns the slot of their first key, as
        the client's slot map has it now.

        Only a partition: each group's pipeline routes its calls itself (and follows MOVED and
        ASK), so a map that is out of date at worst puts a call in another master's group,
        whose failure it then shares. A call that cannot be placed (no slot map yet: the
        client's first batch; a slot no master covers) goes in one group of its own, which its
        pipeline routes."""
        client = self.client
        slot_owner = client.nodes_manager.get_node_from_slot
        keyslot = client.keyslot
        groups: dict[str | None, list[_Queued]] = {}
        for item in batch:
            args = item[1]
            try:  # EVALSHA sha numkeys key ...: the keys share the tenant's hash tag
                node: str | None = slot_owner(keyslot(args[3])).name
            except Exception:  # unplaceable: the pipeline's own routing decides
                node = None
            group = groups.get(node)
            if group is None:
                groups[node] = [item]
            else:
                group.append(item)
        return list(groups.values())

    async def _send_group(self, batch: list[_Queued]) -> None:
        """Send one master's calls as one pipeline; a pipeline that fails (its connection
        lost or refused, a timeout) fails those calls only."""
        try:
            replies = await self._send_pipeline([call for _, call in batch])
        except BaseException as exc:
            self._fail([fut for fut, _ in batch], exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._answer([fut for fut, _ in batch], replies)

    async def _send_pipeline(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for args in calls:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))

    # -- answering ---------------------------------------------------------------------------

    def _fail(self, futures: Sequence[asyncio.Future[Any]], exc: BaseException) -> None:
        """Fail every caller still waiting with ``exc``. A cancelled caller's call has an
        unknown outcome: its ``abandon`` callback is dropped, and never called."""
        for fut in futures:
            if not fut.done():
                fut.set_exception(exc)
            elif fut.cancelled():
                self._orphan_reply(fut, _UNKNOWN)

    def _answer(self, futures: Sequence[asyncio.Future[Any]], replies: Sequence[Any]) -> bool:
        """Give each caller its reply (an error reply as its exception); a caller that gave up
        (cancelled) has it handed to its ``abandon`` callback. True if a reply was
        ``READONLY`` (the server became a replica)."""
        readonly = False
        for fut, reply in zip(futures, replies, strict=True):
            if isinstance(reply, ReadOnlyError):
                readonly = True
            if fut.done():
                self._orphan_reply(fut, reply)
            elif isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
        return readonly


class _Pipe(asyncio.Protocol):
    """The limiter's protocol on a connection redis-py opened and set up.

    It takes the socket's transport over from redis-py's stream (``set_protocol``): received
    bytes go to the batcher's parser instead of a ``StreamReader``. redis-py's protocol stays
    in the chain for the end of the connection, so its ``disconnect()`` works as usual."""

    def __init__(self, batcher: ScriptBatcher, conn: Any) -> None:
        stream = getattr(conn, "_writer", None)
        transport = getattr(stream, "transport", None)
        if transport is None or not hasattr(transport, "set_protocol"):
            raise RedisConnectionError(
                f"the limiter needs redis-py's asyncio stream connection; {type(conn).__name__} "
                "has none (an unsupported redis-py version?)"
            )
        if transport.is_closing():
            raise RedisConnectionError("the connection was closed before use")
        self.batcher = batcher
        self.transport: asyncio.WriteTransport = transport
        self.parser = _reply_reader()
        self.paused = False
        self._stream_protocol = transport.get_protocol()
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.batcher._received(self, data)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream_protocol.connection_lost(exc)  # redis-py's stream sees the end too
        if self.batcher._pipe is self:
            self.batcher._drop_connection(
                RedisConnectionError(
                    f"Redis closed the connection: {exc}" if exc else "Redis closed the connection"
                )
            )

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.batcher._pipe is self:
            self.batcher._schedule_flush()

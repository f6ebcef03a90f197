"""The sink's Kafka loop: batches from ``usage.events`` through :class:`ClickHouseSink`.

A plain aiokafka consumer (group ``<WORKER_GROUP>.sink``, auto-commit off), run as a task
of the Faust app. Faust's own consumer commits offsets on its own schedule and re-seeks to them
after table recovery, which would override a seek to ClickHouse's stored offsets; exactly-once
needs the seek to win on every assignment, so the sink owns its consumer (see
``streams/sink.py`` for the order of steps).

Rebalances: processing a batch holds ``_lock``; the revoke callback takes the lock, so a batch
in flight finishes (written, committed) before its partitions can move. The assign callback,
under the same lock, asks the sink for the stored resume offsets and seeks; records fetched
across an assignment are dropped (a generation counter) and the partitions re-sought to the next
unprocessed offset, so they are fetched again.

Failures: when a batch fails, or positioning a partition does (ClickHouse or Kafka unavailable),
its partitions wait unpositioned, nothing of theirs is processed, and the loop tries again after
0.5, 1, 2, ... up to 30 s; once positioned they resume from what ClickHouse stored. The task
never ends on such a failure (it used to, when the re-read after a failed batch failed too).
The wait grows over the whole outage: a successful positioning does not end it (when only the
insert fails, the re-read after each failure succeeds); a written batch does, as does a fetch
that finds nothing to write once every partition is positioned. The first failure of an outage
is logged with its traceback, the following ones as one line each (the attempt, the next wait).

Dead letters: a batch read again after a failed insert holds the same dead letters. Those this
process has already sent (acknowledged) are not sent again: per source partition, the consumer
keeps the offsets it dead-lettered and forgets them once a batch past them is written (progress
then starts after them) or the partition is revoked or assigned anew. So within one assignment
each malformed or late message is dead-lettered once however often its batch is retried; after
a crash or a rebalance the next owner, which cannot know what was sent, sends them again: at
least once for dead letters (their ``dlq.offset`` header tells the copies apart), exactly once
for usage rows, which this does not touch.

Metrics: the lag is measured apart from the batches, every ``lag_interval`` s, as each owned
partition's end offset minus the next offset written to ClickHouse (not the next fetched): a
sink whose inserts fail or hang shows its backlog growing, with
``streams_sink_last_write_timestamp_seconds`` standing still. A revoked partition's lag series
is removed, so the dashboard's ``sum by (partition)`` holds the new owner's value only. Each
offset counts as consumed once per assignment; a batch read again after a failure counts in
``streams_events_reread``, so consumed/s stays the input's rate during an outage (it showed
four times the input while nothing was inserted) and the retry work stays visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError

from streams import metrics
from streams.sink import ClickHouseSink, DeadLetter, PreparedBatch, SinkRecord, dead_letter_value

log = logging.getLogger(__name__)

AggregatePublisher = Callable[[PreparedBatch], Awaitable[None]]
#: called under the rebalance lock with the assigned partitions' resume offsets
AssignedHook = Callable[[dict[int, int]], Awaitable[None]]
#: called under the rebalance lock, before revoked partitions are given up
RevokedHook = Callable[[set[int]], Awaitable[None]]


class SinkConsumer:
    """Runs the sink over ``topic`` until :meth:`stop`. Blocking calls run in one thread."""

    def __init__(
        self,
        sink: ClickHouseSink,
        *,
        bootstrap: str,
        group_id: str,
        dlq_topic: str,
        batch_size: int,
        batch_within: float,
        executor: ThreadPoolExecutor,
        on_batch_written: AggregatePublisher | None = None,
        session_timeout: float = 10.0,
        instance_id: str | None = None,
        on_assigned: AssignedHook | None = None,
        on_revoked: RevokedHook | None = None,
        lag_interval: float = 5.0,
    ) -> None:
        self.sink = sink
        self.topic = sink.topic
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.dlq_topic = dlq_topic
        self.batch_size = batch_size
        self.batch_within = batch_within
        self.executor = executor
        self.on_batch_written = on_batch_written
        self.session_timeout = session_timeout
        self.instance_id = instance_id
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.lag_interval = lag_interval
        self._lock = asyncio.Lock()
        self._assigned: set[int] = set()
        #: assigned partitions not yet positioned (ClickHouse or Kafka failed the attempt):
        #: the loop retries them with backoff and processes nothing of theirs meanwhile
        self._unpositioned: set[int] = set()
        #: consecutive failed attempts (batches, positionings) of the outage in progress
        self._failures = 0
        #: per assigned partition, the source offsets whose dead letters this process has sent,
        #: kept until a batch past them is written: a batch read again skips them
        self._dead_lettered: dict[int, set[int]] = {}
        self._next: dict[int, int] = {}
        #: per partition positioned in this assignment, the next offset not yet written to
        #: ClickHouse (its progress): what the lag is measured from, unlike ``_next``
        self._written: dict[int, int] = {}
        #: per partition of this assignment, the offset below which records counted as consumed
        self._counted: dict[int, int] = {}
        self._generation = 0
        self._stopping = asyncio.Event()
        #: set when :meth:`run` has returned (its last batch written and committed)
        self.stopped = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- rebalance ------------------------------------------------------------------------------
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # waits for the batch in flight to be written and committed
            mine = {tp.partition for tp in revoked if tp.topic == self.topic} & (
                self._assigned | self._unpositioned  # unpositioned may still hold open sums
            )
            if self.on_revoked is not None and mine:
                try:
                    await self.on_revoked(mine)
                except Exception:  # the next owner recovers from ClickHouse
                    log.exception("revoke hook failed for partitions %s", sorted(mine))
            for tp in revoked:
                self._assigned.discard(tp.partition)
                self._unpositioned.discard(tp.partition)
                self._next.pop(tp.partition, None)
                if tp.topic == self.topic:
                    self._dead_lettered.pop(tp.partition, None)  # the next owner may send them
                    self._written.pop(tp.partition, None)
                    self._counted.pop(tp.partition, None)
                    _remove_lag(tp.partition)  # the next owner reports it
            self._generation += 1
            metrics.sink_unpositioned_partitions.set(len(self._unpositioned))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            partitions = {tp.partition for tp in assigned if tp.topic == self.topic}
            for p in partitions:  # a new assignment: another worker may have had them meanwhile
                self._dead_lettered.pop(p, None)
                self._counted.pop(p, None)
            await self._try_reposition(partitions)

    async def _try_reposition(self, partitions: set[int]) -> None:
        """:meth:`_reposition`; on failure the partitions wait in ``_unpositioned`` for the
        loop's next attempt (never processed unpositioned: their records are dropped and
        re-read from the resume offset once positioned). Under the lock."""
        if not partitions:
            return
        try:
            await self._reposition(partitions)
        except Exception as exc:
            self._unposition(partitions)
            self._failed(f"positioning partitions {sorted(partitions)}", exc, logging.WARNING)
            return
        # Not the end of an outage: when only the insert fails, this re-read succeeds after
        # every failed batch (and reset here, the wait never grew). A written batch ends it.
        self._unpositioned -= partitions
        metrics.sink_unpositioned_partitions.set(len(self._unpositioned))

    def _unposition(self, partitions: set[int]) -> None:
        """After a failure: ``partitions`` wait for the loop to position them again (from what
        ClickHouse stored), with backoff; records fetched meanwhile are dropped."""
        self._assigned -= partitions
        self._unpositioned |= partitions
        self._generation += 1
        metrics.sink_unpositioned_partitions.set(len(self._unpositioned))

    def _failed(self, what: str, exc: BaseException, level: int) -> None:
        """Count a failed attempt of the outage in progress and log it: the first with its
        traceback (at ``level``), each later one as a one-line warning with its attempt number
        and the wait before the next (a traceback a second flooded the log, 16 in 15 s)."""
        self._failures += 1
        wait = self._backoff()
        if self._failures == 1:
            log.log(
                level,
                "sink: %s failed; retrying from the stored progress in %.1f s",
                what,
                wait,
                exc_info=exc,
            )
        else:
            log.warning(
                "sink: %s failed again (attempt %d, %s: %s); retrying in %.1f s",
                what, self._failures, type(exc).__name__, _one_line(exc), wait,
            )  # fmt: skip

    def _recovered(self, how: str) -> None:
        """The outage in progress, if any, is over: the next failure waits 0.5 s again."""
        if self._failures:
            log.info("sink: recovered after %d failed attempts (%s)", self._failures, how)
            self._failures = 0

    def _backoff(self) -> float:
        """Seconds before the next attempt: 0.5, 1, 2, ... up to 30, by the failed attempts
        of the outage in progress."""
        return float(min(30.0, 0.5 * 2 ** max(0, self._failures - 1)))

    async def _reposition(self, partitions: set[int]) -> None:
        """Seek ``partitions`` to the greater of the stored and the committed offset, and run
        the assignment hook; they count as assigned only once all of it succeeded."""
        assert self.consumer is not None
        self._generation += 1
        self._assigned -= partitions  # nothing of theirs is processed until this completes
        stored = await self._blocking(self.sink.on_assigned, partitions)
        resume: dict[int, int] = {}
        for p in sorted(partitions):
            tp = TopicPartition(self.topic, p)
            committed = await self.consumer.committed(tp)
            resume[p] = max(stored.get(p, 0), committed or 0)
            if p in stored or committed is not None:
                self.consumer.seek(tp, resume[p])
            else:
                await self.consumer.seek_to_beginning(tp)
        if self.on_assigned is not None:
            await self.on_assigned(dict(resume))
        self._next.update(resume)
        self._written.update(resume)
        self._assigned |= partitions
        log.info("sink assigned %s: resume offsets %s", sorted(partitions), self._next)

    # --- loop -----------------------------------------------------------------------------------
    async def _take(self) -> tuple[int, list[SinkRecord]]:
        """Up to ``batch_size`` records, waiting at most ``batch_within`` s after the first."""
        assert self.consumer is not None
        generation = self._generation
        out: list[SinkRecord] = []
        deadline: float | None = None
        while len(out) < self.batch_size and not self._stopping.is_set():
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            got = await self.consumer.getmany(
                timeout_ms=max(1, int(wait * 1000)), max_records=self.batch_size - len(out)
            )
            for msgs in got.values():
                out.extend(msgs)  # aiokafka's ConsumerRecords, as they are (no copy per message)
            if out and deadline is None:
                deadline = time.monotonic() + self.batch_within
            if generation != self._generation:
                break  # the caller drops these and rewinds
        return generation, out

    def _rewind(self) -> None:
        """Seek every assigned partition back to the next offset this sink has not processed."""
        assert self.consumer is not None
        for p in self._assigned:
            self.consumer.seek(TopicPartition(self.topic, p), self._next[p])

    def _admit(self, records: list[SinkRecord]) -> list[SinkRecord]:
        """Keep records of assigned partitions, contiguous from each partition's next offset."""
        kept = []
        for rec in records:
            nxt = self._next.get(rec.partition)
            if rec.partition not in self._assigned or nxt is None or rec.offset < nxt:
                continue
            self._next[rec.partition] = rec.offset + 1
            kept.append(rec)
        return kept

    async def _send_dead_letter(self, d: DeadLetter, *, omit_value: bool = False) -> Any:
        """Send one dead letter; the future of its acknowledgement.

        The dead letter carries the original bytes plus its ``dlq.*`` headers, so a message
        just under Kafka's size limit can be too large as a dead letter. Refusing it would stop
        the whole batch, and every later one, for good (the batch is read again and again). So
        such a dead letter goes without its value, with ``dlq.value_omitted`` (the value's
        size); its headers name the source offset, where the original stays for the topic's
        retention."""
        assert self.producer is not None
        value = dead_letter_value(d)
        headers = d.headers()
        if not omit_value:
            try:
                return await self.producer.send(
                    self.dlq_topic, value=value, key=d.record.key, headers=headers
                )
            except MessageSizeTooLargeError:
                pass
        log.warning(
            "dead letter of %s/%d@%d sent without its %d-byte value: too large for Kafka",
            d.record.topic, d.record.partition, d.record.offset, len(value),
        )  # fmt: skip
        headers.append(("dlq.value_omitted", str(len(value)).encode()))
        return await self.producer.send(
            self.dlq_topic, value=b"", key=d.record.key, headers=headers
        )

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> None:
        """Send ``letters`` and wait for Kafka's acknowledgements, all but those this process
        sent already: a batch read again after a failed insert holds the same dead letters, and
        each retry sent them all again (3 malformed messages became 16 dead letters each in a
        15 s outage). An offset counts as sent once acknowledged. The offsets sent are kept
        one by one, not as the highest one sent: a message on time at the first try can be
        late at the next (the clock moved on) and must be dead-lettered then, below offsets
        sent before."""
        sent_already = self._dead_lettered
        fresh = [
            d for d in letters if d.record.offset not in sent_already.get(d.record.partition, ())
        ]
        if len(fresh) < len(letters):
            log.debug(
                "%d dead letters of a batch read again were sent already", len(letters) - len(fresh)
            )
        sends = [await self._send_dead_letter(d) for d in fresh]
        for d, sent in zip(fresh, sends, strict=True):
            try:
                await sent
            except MessageSizeTooLargeError:  # the broker's limit, below the producer's
                await (await self._send_dead_letter(d, omit_value=True))
            sent_already.setdefault(d.record.partition, set()).add(d.record.offset)
            metrics.events_dead_lettered.labels(d.reason).inc()

    def _forget_dead_letters(self, next_offsets: dict[int, int]) -> None:
        """A batch is written: its partitions resume at ``next_offsets`` or later from now on,
        so the offsets below are never read again in this assignment."""
        for p, n in next_offsets.items():
            sent = self._dead_lettered.get(p)
            if sent:
                left = {o for o in sent if o >= n}
                if left:
                    self._dead_lettered[p] = left
                else:
                    del self._dead_lettered[p]

    def _count_read(self, records: list[SinkRecord]) -> None:
        """Count ``records`` as consumed, but those read before in this assignment (a batch
        read again after a failure) as re-read: counted as consumed at every retry, a failing
        insert showed as several times the input's throughput."""
        counted = self._counted
        again = 0
        for rec in records:
            if rec.offset < counted.get(rec.partition, 0):
                again += 1
            else:
                counted[rec.partition] = rec.offset + 1
        metrics.events_consumed.inc(len(records) - again)
        if again:
            metrics.events_reread.inc(again)

    async def _process(self, records: list[SinkRecord]) -> None:
        assert self.consumer is not None and self.producer is not None
        self._count_read(records)
        metrics.sink_batch_size.observe(len(records))
        batch: PreparedBatch = await self._blocking(self.sink.prepare, records)
        if batch.dead_letters:
            await self._send_dead_letters(batch.dead_letters)
        took = await self._blocking(self.sink.write, batch)
        metrics.sink_last_write_timestamp.set_to_current_time()
        for p, n in batch.next_offsets.items():
            if p in self._assigned:
                self._written[p] = n
        self._recovered("a batch was written")
        self._forget_dead_letters(batch.next_offsets)
        metrics.sink_insert_seconds.observe(took)
        metrics.events_inserted.inc(len(batch.events))
        metrics.events_duplicate.inc(batch.duplicates)
        now = time.time()
        for _, ev in batch.events[:: max(1, len(batch.events) // 100)]:  # a sample per batch
            metrics.end_to_end_delay_seconds.observe(max(0.0, now - ev.time.timestamp()))
        offsets = {
            TopicPartition(self.topic, p): n
            for p, n in batch.next_offsets.items()
            if p in self._assigned
        }
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:  # ClickHouse holds the progress anyway
            log.warning("offset commit failed (resume uses ClickHouse progress): %s", exc)
        # A batch may hold no new row and still rows ClickHouse had stored (a cut batch read
        # again): those are handed off with its range too.
        if self.on_batch_written is not None and (batch.events or batch.stored):
            try:
                await self.on_batch_written(batch)
            except Exception:  # the live tables are a view; ClickHouse already holds the rows
                log.exception("publishing the batch's aggregates failed")

    # --- lag ------------------------------------------------------------------------------------
    async def _report_lag(self) -> None:
        """Every ``lag_interval`` s, :meth:`_update_lag`, until stopped. Apart from the batch
        loop and without its lock: a batch whose insert hangs holds the lock, and its lag is
        what an operator needs to see."""
        failed = False
        while not self._stopping.is_set():
            try:
                await self._update_lag()
                failed = False
            except Exception as exc:  # Kafka unavailable: the next round tries again
                if not failed:
                    log.warning("sink: measuring the consumer lag failed: %s", _one_line(exc))
                failed = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.lag_interval)

    async def _update_lag(self) -> None:
        """Set the lag of each owned partition: its end offset minus its next offset not yet
        written. A partition never positioned in this assignment (ClickHouse failed it since)
        is measured from Kafka's committed offset, or the partition's first. The gauge is set
        only for partitions still owned once the answers are in (a revoke may come between)."""
        assert self.consumer is not None
        owned = self._assigned | self._unpositioned
        if not owned:
            return
        tps = [TopicPartition(self.topic, p) for p in sorted(owned)]
        timeout = max(5.0, self.lag_interval)
        try:
            ends = await asyncio.wait_for(self.consumer.end_offsets(tps), timeout)
        except (KafkaError, TimeoutError):  # the last end seen by a fetch, where there is one
            assigned = self.consumer.assignment()
            highs = {tp: self.consumer.highwater(tp) for tp in tps if tp in assigned}
            ends = {tp: h for tp, h in highs.items() if h is not None}
        unknown = [tp for tp in tps if tp.partition not in self._written]
        fallback: dict[int, int] = {}
        if unknown:
            first = await asyncio.wait_for(self.consumer.beginning_offsets(unknown), timeout)
            for tp in unknown:
                committed = await asyncio.wait_for(self.consumer.committed(tp), timeout)
                fallback[tp.partition] = first[tp] if committed is None else committed
        for tp, end in ends.items():
            p = tp.partition
            written = self._written.get(p, fallback.get(p))
            if written is not None and p in (self._assigned | self._unpositioned):
                metrics.consumer_lag.labels(str(p)).set(max(0, end - written))

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.stopped.set()  # also when start-up failed: nobody waits for a batch then

    async def _run(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            session_timeout_ms=int(self.session_timeout * 1000),
            heartbeat_interval_ms=min(3000, int(self.session_timeout * 1000) // 3),
            group_instance_id=self.instance_id,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True
        )
        listener = _Listener(self)
        await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=listener)
        metrics.sink_last_write_timestamp.set_to_current_time()  # "since" counts from the start
        lag = asyncio.ensure_future(self._report_lag())
        # Read-ahead: the next batch is taken from Kafka (aiokafka's record parsing, on this
        # loop) while the current one is processed in the executor (the ClickHouse insert
        # releases the GIL). It is only read into memory: it is admitted, decoded and written
        # after the current batch is committed, and dropped like any batch taken across a
        # rebalance or a failed batch (generation counter), so the order of steps is unchanged.
        ahead: asyncio.Future[tuple[int, list[SinkRecord]]] | None = None
        try:
            while not self._stopping.is_set():
                if self._unpositioned:  # ClickHouse (or Kafka) failed: back off, try again
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self._backoff())
                    async with self._lock:
                        await self._try_reposition(set(self._unpositioned))
                    continue
                taking, ahead = ahead or asyncio.ensure_future(self._take()), None
                generation, records = await taking
                async with self._lock:
                    if generation != self._generation:
                        self._rewind()  # fetched across a rebalance: drop, read again
                        continue
                    if not records and not self._unpositioned:
                        # Every partition positioned and nothing to write: no outage goes on
                        # (a batch failing again is fetched again, not an empty take).
                        self._recovered("every partition positioned, nothing to write")
                    admitted = self._admit(records)
                    if not admitted:
                        continue
                    ahead = asyncio.ensure_future(self._take())
                    work = asyncio.ensure_future(self._process(admitted))
                    try:
                        await asyncio.shield(work)
                    except asyncio.CancelledError:
                        # Stopping: let the batch in flight be written and committed first,
                        # so the next owner of its partitions starts after it.
                        with contextlib.suppress(Exception):
                            await work
                        raise
                    except Exception as exc:
                        metrics.sink_insert_failures.inc()
                        self._unposition(set(self._assigned))
                        self._failed("batch", exc, logging.ERROR)
        finally:
            lag.cancel()
            with contextlib.suppress(BaseException):
                await lag
            for p in self._assigned | self._unpositioned:
                _remove_lag(p)
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            with contextlib.suppress(Exception):
                await self.producer.stop()

    def stop(self) -> None:
        self._stopping.set()


def _remove_lag(partition: int) -> None:
    """Drop ``partition``'s lag series: a series left on a worker that no longer owns the
    partition keeps its last value, and the dashboard's sum adds it to the owner's."""
    with contextlib.suppress(KeyError):
        metrics.consumer_lag.remove(str(partition))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: SinkConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.owner._on_assigned(assigned)


__all__ = ["SinkConsumer"]

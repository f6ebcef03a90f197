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

Transactions: the consumer reads ``read_committed``: records of aborted transactions are
skipped (a transactional producer's aborted events were counted), and a transaction still open
holds its partition back: nothing at or past its first record is returned, whatever it was
written in, until it is committed or aborted, if its producer died at Kafka's transaction
timeout (the producer's ``transaction.timeout.ms``, 60 s by default, at most the broker's
``transaction.max.timeout.ms``). The end offsets the lag is measured from are then the last
stable offset (aiokafka asks for them at the consumer's isolation level): records behind an open
transaction do not show as lag.

Dead letters: a batch read again after a failed insert holds the same dead letters. Those this
process has already sent (acknowledged) are not sent again: per source partition, the consumer
keeps the offsets it dead-lettered and forgets them once a batch past them is written (progress
then starts after them) or the partition is revoked or assigned anew. So within one assignment
each malformed or late message is dead-lettered once however often its batch is retried; after
a crash or a rebalance the next owner, which cannot know what was sent, sends them again: at
least once for dead letters (their ``dlq.offset`` header tells the copies apart), exactly once
for usage rows, which this does not touch. A dead letter carries the original key, value and
headers after its ``dlq.*`` ones; one too large for the dead-letter topic goes without them
(``_send_dead_letter``), and one Kafka refuses even so is skipped, logged with its source offset
and counted in ``streams_dead_letters_unsendable`` (the same bytes are refused at every retry:
failing the batch stopped the partition for good, and the original stays in its topic).

Metrics: the lag is measured apart from the batches, every ``lag_interval`` s, as each owned
partition's end offset minus the next offset written to ClickHouse (not the next fetched): a
sink whose inserts fail or hang shows its backlog growing, with
``streams_sink_last_write_timestamp_seconds`` standing still. Once every record fetched from a
partition is written, it is measured from the consumer's position instead, which is past the
offsets that hold no record for the sink (a transaction's commit or abort marker, an aborted
transaction's records): measured from the last record written, a transactional producer's
partition never read 0, and the stuck-worker alert would have fired on a sink keeping up.
A revoked partition's lag series is removed, so the dashboard's ``sum by (partition)`` holds
the new owner's value only. Each offset counts as consumed once per assignment; a batch read
again after a failure counts in ``streams_events_reread``, so consumed/s stays the input's rate
during an outage (it showed four times the input while nothing was inserted) and the retry
work stays visible.
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
from streams.sink import (
    ClickHouseSink,
    DeadLetter,
    PreparedBatch,
    SinkRecord,
    dead_letter_value,
    resume_offsets,
)

log = logging.getLogger(__name__)

#: a dead letter sent without its value keeps its key up to this size (a tenant id): a longer
#: one can be what made it too large
FALLBACK_KEY_LIMIT = 1024

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
        #: per partition, the offset after the last record fetched (handed out by the consumer)
        #: in this assignment: a partition written up to it has nothing pending
        self._fetched: dict[int, int] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        #: set when an acknowledgement failed: the idempotent producer's sequence numbers have
        #: moved past what the broker holds, so every later send would fail; replaced first
        self._producer_broken = False

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
                    self._fetched.pop(tp.partition, None)
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
        """Seek ``partitions`` to the progress ClickHouse stored, and run the assignment hook;
        they count as assigned only once all of it succeeded.

        Kafka's committed offset is used only for a partition ClickHouse has no progress of
        (its first assignment in this database). It is never ahead of the stored progress in
        running (progress is written first), only when ClickHouse lost what it had stored: a
        restore from a backup, another ``CLICKHOUSE_URL``. Resuming at the greater of the two
        then skipped the events in between, still in Kafka; they are read again instead."""
        assert self.consumer is not None
        self._generation += 1
        self._assigned -= partitions  # nothing of theirs is processed until this completes
        committed: dict[int, int] = {}
        for p in sorted(partitions):
            offset = await self.consumer.committed(TopicPartition(self.topic, p))
            if offset is not None:
                committed[p] = offset
        stored = await self._blocking(self.sink.on_assigned, partitions, committed)
        resume = resume_offsets(sorted(partitions), stored, committed)  # what the sink recorded
        for p, offset in resume.items():
            tp = TopicPartition(self.topic, p)
            if committed.get(p, -1) > offset:
                log.warning(
                    "sink: %s/%d: Kafka's committed offset %d is past what ClickHouse"
                    " stored (%d), which lost rows (restored from a backup?): reading"
                    " them again from %d",
                    self.topic, p, committed[p], offset, offset,
                )  # fmt: skip
            if p in stored or p in committed:
                self.consumer.seek(tp, offset)
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
            for tp, msgs in got.items():
                out.extend(msgs)  # aiokafka's ConsumerRecords, as they are (no copy per message)
                if msgs and self._fetched.get(tp.partition, 0) <= msgs[-1].offset:
                    self._fetched[tp.partition] = msgs[-1].offset + 1
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

        The dead letter carries the original bytes and headers plus its ``dlq.*`` headers, so
        a message just under Kafka's size limit can be too large as a dead letter. Refusing it
        would stop the whole batch, and every later one, for good (the batch is read again and
        again). So with ``omit_value`` (the caller's retry after a refusal) it goes without its
        value (``dlq.value_omitted``: its size), without the original headers
        (``dlq.headers_omitted``: their number) and, when longer than
        :data:`FALLBACK_KEY_LIMIT`, without its key (``dlq.key_omitted``: its size; a key near
        Kafka's limit was refused again, which failed the batch for good). Its ``dlq.*``
        headers name the source offset, where the original stays for the topic's retention."""
        assert self.producer is not None
        headers = d.headers()
        if not omit_value:
            return await self.producer.send(
                self.dlq_topic,
                value=dead_letter_value(d),
                key=d.record.key,
                headers=headers + d.original_headers(),
            )
        value, key, dropped = dead_letter_value(d), d.record.key, len(d.original_headers())
        omitted = [f"its {len(value)}-byte value"]
        headers.append(("dlq.value_omitted", str(len(value)).encode()))
        if key is not None and len(key) > FALLBACK_KEY_LIMIT:
            omitted.append(f"its {len(key)}-byte key")
            headers.append(("dlq.key_omitted", str(len(key)).encode()))
            key = None
        if dropped:
            omitted.append(f"its {dropped} headers")
            headers.append(("dlq.headers_omitted", str(dropped).encode()))
        log.warning(
            "dead letter of %s/%d@%d sent without %s: too large for Kafka",
            d.record.topic, d.record.partition, d.record.offset, ", ".join(omitted),
        )  # fmt: skip
        return await self.producer.send(self.dlq_topic, value=b"", key=key, headers=headers)

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> None:
        """Send ``letters`` and wait for Kafka's acknowledgements, all but those this process
        sent already: a batch read again after a failed insert holds the same dead letters, and
        each retry sent them all again (3 malformed messages became 16 dead letters each in a
        15 s outage). An offset counts as sent once acknowledged. The offsets sent are kept
        one by one, not as the highest one sent: a message on time at the first try can be
        late at the next (the clock moved on) and must be dead-lettered then, below offsets
        sent before.

        They are sent together (:meth:`_send_together`); those not acknowledged are sent
        again one at a time on a new producer (:meth:`_send_alone`): one refused by the broker
        (too large for the dead-letter topic) failed every one behind it, for good, as the
        idempotent producer numbers its sends and the broker then refuses the next numbers as
        out of order. One acknowledged but whose answer was lost may go twice (dead letters
        are at least once)."""
        sent_already = self._dead_lettered
        fresh = [
            d for d in letters if d.record.offset not in sent_already.get(d.record.partition, ())
        ]
        if len(fresh) < len(letters):
            log.debug(
                "%d dead letters of a batch read again were sent already", len(letters) - len(fresh)
            )
        if not fresh:
            return
        if self._producer_broken:
            await self._renew_producer()
        for d in await self._send_together(fresh):
            await self._send_alone(d)

    async def _send_together(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """Send ``letters`` without waiting between them, then wait for every acknowledgement
        (none is left unawaited: the abandoned ones logged "Future exception was never
        retrieved"); return those not acknowledged, in order."""
        futures: list[Any] = []
        try:
            for d in letters:
                try:
                    futures.append(await self._send_dead_letter(d))
                except MessageSizeTooLargeError:  # the producer's own limit: nothing was sent
                    futures.append(await self._send_dead_letter(d, omit_value=True))
        except KafkaError as exc:  # the rest go one at a time
            log.warning("sending dead letters failed (%s): sending the rest one at a time", exc)
        finally:
            results = await asyncio.gather(*futures, return_exceptions=True)
        failed = []
        for d, result in zip(letters, results, strict=False):
            if isinstance(result, BaseException):
                failed.append(d)
            else:
                self._sent(d)
        if failed:
            self._producer_broken = True
            first = next(r for r in results if isinstance(r, BaseException))
            log.warning(
                "%d of %d dead letters were not acknowledged (first: %s: %s): sending them"
                " again one at a time",
                len(failed), len(results), type(first).__name__, _one_line(first),
            )  # fmt: skip
        return failed + letters[len(futures) :]

    async def _send_alone(self, d: DeadLetter) -> None:
        """Send ``d`` and wait for its acknowledgement; refused as too large, again without
        its value, key and headers (:meth:`_send_dead_letter`); refused even so, skipped
        (:meth:`_unsendable`). Any other failure fails the batch (read again)."""
        for omit_value in (False, True):
            if self._producer_broken:
                await self._renew_producer()
            try:
                sent = await self._send_dead_letter(d, omit_value=omit_value)
                try:
                    await sent
                except BaseException:
                    self._producer_broken = True
                    raise
            except MessageSizeTooLargeError:
                continue
            self._sent(d)
            return
        self._unsendable(d)

    def _sent(self, d: DeadLetter) -> None:
        self._dead_lettered.setdefault(d.record.partition, set()).add(d.record.offset)
        metrics.events_dead_lettered.labels(d.reason).inc()

    def _unsendable(self, d: DeadLetter) -> None:
        """Kafka refused ``d`` as too large even without its value, key and original headers:
        skipped rather than failing the batch, since the same bytes would be refused at every
        retry and the events behind it would wait for good. Counted, and logged with its
        source offset, where the original stays for the topic's retention."""
        self._dead_lettered.setdefault(d.record.partition, set()).add(d.record.offset)
        metrics.dead_letters_unsendable.inc()
        log.error(
            "dead letter of %s/%d@%d (%s: %s) skipped: Kafka refused it as too large even"
            " without its value, key and headers",
            d.record.topic, d.record.partition, d.record.offset, d.reason, d.error[:200],
        )  # fmt: skip

    async def _renew_producer(self) -> None:
        """Replace the producer by a new one (a new producer id, its sequence numbers from 0):
        after a refused send, the old one's every later send to that partition fails."""
        old, self.producer = self.producer, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.stop()
        self.producer = self._new_producer()
        await self.producer.start()  # failing, the batch fails; its retry renews again
        self._producer_broken = False

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True
        )

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
        written, or, once every record fetched from it is written, minus the consumer's
        position if that is further (past a transaction's commit marker, which holds no record:
        progress stopped one short of the end). A partition never positioned in this
        assignment (ClickHouse failed it since) is measured from Kafka's committed offset, or
        the partition's first. The gauge is set only for partitions still owned once the
        answers are in (a revoke may come between)."""
        assert self.consumer is not None
        owned = self._assigned | self._unpositioned
        if not owned:
            return
        tps = [TopicPartition(self.topic, p) for p in sorted(owned)]
        timeout = max(5.0, self.lag_interval)
        consumer = self.consumer
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout)
        except (KafkaError, TimeoutError):  # the last end seen by a fetch, where there is one
            assigned = consumer.assignment()
            seen = {tp: _fetched_end(consumer, tp) for tp in tps if tp in assigned}
            ends = {tp: end for tp, end in seen.items() if end is not None}
        unknown = [tp for tp in tps if tp.partition not in self._written]
        fallback: dict[int, int] = {}
        if unknown:
            first = await asyncio.wait_for(consumer.beginning_offsets(unknown), timeout)
            for tp in unknown:
                committed = await asyncio.wait_for(consumer.committed(tp), timeout)
                fallback[tp.partition] = first[tp] if committed is None else committed
        # Read before what is fetched and written: a position read earlier is never past
        # records fetched later, which count as pending.
        positions: dict[int, int] = {}
        assigned = consumer.assignment()
        for tp in tps:
            if tp.partition in self._assigned and tp in assigned:
                with contextlib.suppress(KafkaError, TimeoutError):
                    positions[tp.partition] = await asyncio.wait_for(consumer.position(tp), timeout)
        for tp, end in ends.items():
            p = tp.partition
            written = self._written.get(p, fallback.get(p))
            if written is None or p not in (self._assigned | self._unpositioned):
                continue
            if p in self._assigned and p in positions and self._fetched.get(p, 0) <= written:
                written = max(written, positions[p])  # nothing fetched is waiting
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
            isolation_level="read_committed",
        )
        self.producer = self._new_producer()
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
            if self.producer is not None:
                with contextlib.suppress(Exception):
                    await self.producer.stop()

    def stop(self) -> None:
        self._stopping.set()


def _remove_lag(partition: int) -> None:
    """Drop ``partition``'s lag series: a series left on a worker that no longer owns the
    partition keeps its last value, and the dashboard's sum adds it to the owner's."""
    with contextlib.suppress(KeyError):
        metrics.consumer_lag.remove(str(partition))


def _fetched_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The end of ``tp`` as the last fetch saw it: its last stable offset (the end a
    ``read_committed`` consumer reads to), else its high watermark; None before any fetch."""
    stable = consumer.last_stable_offset(tp)
    if stable is not None and stable >= 0:
        return int(stable)
    high = consumer.highwater(tp)
    return None if high is None else int(high)


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

"""``ClickHouseSink``: usage events from Kafka into ClickHouse, each event counted exactly once.

The mechanism (DESIGN.md, "Exactly once, the traps"); ClickHouse, not Kafka, is the record of
progress, as in Kafka Connect sinks:

1. **On every partition assignment**, before reading: a batch whose insert a crash cut short
   between ``usage_events`` and the materialized views (ClickHouse does not write them
   atomically) has its rollups completed (``ClickHouseStorage.repair_unfinished_batch``); the
   recent-id set is rebuilt from ``usage_events`` for those partitions (ids whose event time
   is within twice the accepted lateness: every id inserted within the lateness;
   ``streams/dedupe.py``); the resume offset of each assigned partition is its
   ``sink_progress.next_offset`` (Kafka's committed offset only for a partition without
   progress: ClickHouse, not the commit, says what is stored), and the consumer seeks there;
   the offsets of rows stored past it (a batch cut short) are read. A partition with no
   progress yet (tables from before progress was recorded) resumes after its stored rows (max
   ``kafka_offset`` + 1), and its resume offset is recorded as progress.
2. **Per batch**, in this order:
   a. decode each message; malformed or invalid ones (a key other than the event's subject
      among them), and events older than ``now - lateness``, become dead letters (original
      bytes, reason in headers);
   b. drop events whose (tenant, id) is in the recent-id set (ids inserted within the
      lateness, whatever time the resend carries) or earlier in the same batch
      (a producer or client resend);
   c. send the dead letters and wait for Kafka's acknowledgement (the consumer's step: it
      skips those it sent already for the same offsets, see below);
   d. insert the remaining rows into ``usage_events``, each carrying its topic, partition and
      offset (one insert = one block; the rollups follow by materialized views);
   e. add the inserted ids to the recent-id set;
   f. write ``sink_progress`` (next offset per partition, covering duplicates and dead letters);
   g. commit the same offsets to Kafka (a hint for the next owner; never required for safety).

Why this order holds: a crash before (d) leaves nothing stored and the batch is read again. A
crash during or after (d) and before (f) leaves all, some or none of the batch's rows stored
(``usage_events`` is partitioned by day, and ClickHouse commits an insert's parts one after
another, so a batch holding yesterday's late events and today's can be cut between them): step
1 resumes from the recorded progress and reads the whole batch again: a message whose row
ClickHouse holds at its very offset is recognised (step 1 reads the offsets stored past the
resume point) and neither inserted again nor dead-lettered, though still handed to the Faust
tables with its batch's range (``PreparedBatch.stored``); the rest are inserted. Resuming after
the highest stored offset instead would skip the rows of a part that was not committed.
Committing first (g before d) would lose the batch; marking ids after the commit would double
count a replay; a dedup token made from batch offsets would miss a replay cut at other offsets.
Dead letters go out before progress is recorded (c before f), so after a crash they may be
dead-lettered twice (their headers carry the source offset), never lost. A batch read again in
the same process after a failed (d) or (f) holds the same dead letters: the consumer
(``streams/consumer.py``) keeps, per partition it is assigned, the offsets it dead-lettered
since its last written batch and does not send them again, however often ClickHouse refuses
the insert. That memory is the process's and the assignment's: after a crash or a rebalance the
next owner reads the batch from the recorded progress and sends its dead letters again. So dead
letters are at least once; usage rows stay exactly once (nothing of the above depends on what
was dead-lettered). Since no duplicate row is ever inserted, the materialized rollups are exact
too.

Events later than the lateness are dead-lettered rather than looked up, and each id is held
for the lateness from its arrival, which is what lets the id set forget: a resend slips past
it only when it carries a fresh time and arrives more than the lateness after its original.

Tests: ``tests/unit/test_streams_sink.py`` (order, dedupe, lateness) and
``tests/integration/test_streams_worker.py`` (totals, SIGKILL crash, two-worker rebalance).
"""

from __future__ import annotations

import datetime as dt
import time as _time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from metering.clickhouse.schema import checked_database
from metering.events import EventDecodeError, seconds_past
from metering.events_fast import FastUsageEvent, batch_decoder
from streams.dedupe import RecentIds

EVENT_COLUMNS = [
    "id",
    "type",
    "source",
    "tenant",
    "meter",
    "decision",
    "billable",
    "time",
    "quantity",
    "dimensions",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
]
#: what an emptied insert context holds: no rows (``data = None`` would keep the last batch)
_NO_COLUMNS: list[list[Any]] = [[] for _ in EVENT_COLUMNS]


#: the rollups fed by materialized views from usage_events, and each one's bucket function
ROLLUPS = {
    "usage_minute": "toStartOfMinute",
    "usage_hour": "toStartOfHour",
    "usage_day": "toStartOfDay",
    "usage_minute_by_time": "toStartOfMinute",
}


@dataclass(frozen=True)
class RepairedRollup:
    """How :meth:`ClickHouseStorage.repair_unfinished_batch` completes one rollup: the
    rollup's key columns, each with its expression over ``usage_events`` (as its view has
    it), the rows of ``usage_events`` it takes, and the columns besides the sum and count that
    a correcting row carries (idempotent states, or constants)."""

    keys: tuple[tuple[str, str], ...]
    where: str = "1"
    extra: tuple[tuple[str, str], ...] = ()
    #: a table of absolute totals (replaced by key, read ``FINAL``) that the rollup's readers
    #: add to it: the rows stored before its view existed (migration 007's fill)
    filled: str | None = None

    def repair_sql(self, db: str, table: str, tail: str) -> str:
        """One correcting row per key the rows past the progress (``tail``) touch: the sum and
        count ``usage_events`` holds there less what the rollup holds, where it holds less."""
        names = ", ".join(name for name, _ in self.keys)
        exprs = ", ".join(expr for _, expr in self.keys)
        picked = ", ".join(f"{expr} AS {name}" for name, expr in self.keys)
        extra_cols = "".join(f", {name}" for name, _ in self.extra)
        extra_vals = "".join(f", {expr} AS {name}" for name, expr in self.extra)
        held = f"{db}.{table}"
        if self.filled is not None:
            cols = f"{names}, quantity_sum, event_count"
            held = (
                f"(SELECT {cols} FROM {db}.{table}"  # noqa: S608
                f" UNION ALL SELECT {cols} FROM {db}.{self.filled} FINAL)"
            )
        keys = (
            f"SELECT DISTINCT {exprs} FROM {db}.usage_events"  # noqa: S608
            f" WHERE kafka_topic = {{t:String}} AND ({tail}) AND {self.where}"
        )
        return (
            f"INSERT INTO {db}.{table} ({names}, quantity_sum, event_count{extra_cols})"  # noqa: S608
            f" SELECT {', '.join(f'e.{n}' for n, _ in self.keys)}, e.s - r.s, e.c - r.c"
            f"{''.join(f', e.{n}' for n, _ in self.extra)} FROM ("
            f"  SELECT {picked}, sum(quantity) AS s, toUInt64(count()) AS c{extra_vals}"
            f"  FROM {db}.usage_events WHERE {self.where} AND ({exprs}) IN ({keys})"
            f"  GROUP BY {names}) AS e"
            f" LEFT JOIN ("
            f"  SELECT {names}, sum(quantity_sum) AS s, sum(event_count) AS c FROM {held}"
            f"  WHERE ({names}) IN ({keys}) GROUP BY {names}) AS r"
            f" USING ({names}) WHERE e.c > r.c"
        )


def _usage_rollup(bucket_fn: str) -> RepairedRollup:
    return RepairedRollup(
        keys=(
            ("tenant", "tenant"),
            ("meter", "meter"),
            ("billable", "billable"),
            ("bucket", f"toDateTime({bucket_fn}(time), 'UTC')"),
        ),
        extra=(
            ("quantity_max", "max(quantity)"),
            ("quantity_uniq", "uniqExactState(quantity)"),
            ("quantity_latest", "argMaxState(quantity, time)"),
        ),
    )


#: every rollup fed by a materialized view from usage_events, as the repair completes it
REPAIRED_ROLLUPS = {table: _usage_rollup(fn) for table, fn in ROLLUPS.items()} | {
    # metering/clickhouse/007_decisions_day.sql
    "decisions_day": RepairedRollup(
        keys=(
            ("tenant", "tenant"),
            ("meter", "meter"),
            ("decision", "decision"),
            ("degraded", "toUInt8(dimensions['degraded'] = 'true')"),
            ("bucket", "toDateTime(toStartOfDay(time), 'UTC')"),
        ),
        where="type = 'metering.ratelimit'",
        filled="decisions_day_filled",
    ),
}


class SinkRecord(Protocol):
    """What the sink reads of one Kafka message: aiokafka's ``ConsumerRecord`` as fetched (the
    consumer hands them over without copying), or a :class:`Record`."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Record(NamedTuple):
    """A :class:`SinkRecord` made by hand (tests, tools)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()


def record_headers(rec: SinkRecord) -> Sequence[tuple[str, bytes | None]]:
    """``rec``'s Kafka headers (aiokafka's ``ConsumerRecord.headers``); none for a record
    that has no such attribute (the :class:`SinkRecord` protocol does not require it)."""
    return getattr(rec, "headers", None) or ()


@dataclass(frozen=True)
class DeadLetter:
    record: SinkRecord
    reason: str  # "invalid" or "late"
    error: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("dlq.reason", self.reason.encode()),
            ("dlq.error", self.error.encode("utf-8", "replace")[:1000]),
            ("dlq.topic", self.record.topic.encode()),
            ("dlq.partition", str(self.record.partition).encode()),
            ("dlq.offset", str(self.record.offset).encode()),
        ]

    def original_headers(self) -> list[tuple[str, bytes]]:
        """The source message's headers, to follow :meth:`headers` on the dead letter (its
        producer's trace context, content type, CloudEvents attributes: what tells who sent
        it), but those named like one of :meth:`headers`, so that each ``dlq.*`` name the
        reader looks up appears once. A null header value is sent empty."""
        taken = {name for name, _ in self.headers()}
        return [
            (name, value or b"") for name, value in record_headers(self.record) if name not in taken
        ]


@dataclass
class PreparedBatch:
    """A batch after decoding and dedupe, before anything is written."""

    events: list[tuple[SinkRecord, FastUsageEvent]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    next_offsets: dict[int, int] = field(default_factory=dict)  # partition -> last offset + 1
    #: the recent-id set's (bucket, key) of each event, in ``events`` order (marked at step e)
    id_keys: list[tuple[int, str]] = field(default_factory=list)
    #: (bucket, key) of each resend found: its id's hold is renewed from this arrival
    renewed: list[tuple[int, str]] = field(default_factory=list)
    #: each event's time in whole milliseconds since the epoch (floored), in ``events`` order:
    #: the ``time`` column as inserted, and (``// 60_000``) the minute of its sums
    millis: list[int] = field(default_factory=list)
    #: events whose rows ClickHouse already holds at these very offsets (a batch whose insert
    #: was cut short, read again): not inserted again, but part of the batch's offset range,
    #: so the hand-off to the Faust tables counts them (rec, event, time in ms)
    stored: list[tuple[SinkRecord, FastUsageEvent, int]] = field(default_factory=list)

    def rows(self) -> list[tuple[Any, ...]]:
        """The ``usage_events`` rows (columns :data:`EVENT_COLUMNS`), one tuple per event."""
        return [
            (
                ev.id,
                ev.type,
                ev.source,
                ev.subject,
                (d := ev.data).meter,
                decision := d.decision or "",
                0 if decision == "rejected" else 1,
                ev.time,
                d.quantity,
                d.dimensions,
                rec.topic,
                rec.partition,
                rec.offset,
            )
            for rec, ev in self.events
        ]


def event_row(ev: FastUsageEvent, rec: SinkRecord) -> list[Any]:
    """One ``usage_events`` row (columns :data:`EVENT_COLUMNS`): :meth:`PreparedBatch.rows`
    makes them, inline, for a whole batch."""
    return list(PreparedBatch(events=[(rec, ev)]).rows()[0])


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
_TIME_COLUMN = EVENT_COLUMNS.index("time")


class SinkStorage(Protocol):
    """Where the sink writes; passed in, so the sink never builds its own connection."""

    def insert_events(
        self, rows: Sequence[Sequence[Any]], millis: Sequence[int] | None = None
    ) -> None: ...
    def record_progress(self, topic: str, next_offsets: dict[int, int]) -> None: ...
    def stored_next_offsets(
        self, topic: str, partitions: Iterable[int] | None = None
    ) -> dict[int, int]: ...
    def repair_unfinished_batch(self, topic: str, partitions: Iterable[int]) -> int: ...
    def recent_ids(
        self, topic: str, partitions: Iterable[int], since: dt.datetime
    ) -> Iterable[tuple[str, str, dt.datetime]]: ...
    def stored_offsets(self, topic: str, since: dict[int, int]) -> dict[int, set[int]]: ...


class ClickHouseStorage:
    """:class:`SinkStorage` on a clickhouse-connect client (embedded or server)."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = checked_database(database)  # the only name put into SQL text
        self._events_insert: Any = None  # clickhouse-connect's InsertContext, made once

    def insert_events(
        self, rows: Sequence[Sequence[Any]], millis: Sequence[int] | None = None
    ) -> None:
        """One insert (one block) of ``rows``, sent column by column.

        Transposed here at C speed (``zip``), times as DateTime64(3) ticks (whole milliseconds
        since the epoch, floored: what the client would write for the datetime), which spares
        the client a Python call per row and value. ``millis``: those ticks, already computed
        by the caller (``PreparedBatch.millis``), one per row.
        """
        if rows:
            columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
            if millis is None:
                millis = [(t - _EPOCH) // _MS for t in columns[_TIME_COLUMN]]
            elif len(millis) != len(rows):
                raise ValueError(f"{len(millis)} times for {len(rows)} rows")
            columns[_TIME_COLUMN] = millis
            ctx = self._events_insert
            if ctx is None:
                ctx = self._events_insert = self.client.create_insert_context(
                    f"{self.database}.usage_events",
                    column_names=EVENT_COLUMNS,
                    column_oriented=True,
                )
            try:
                self.client.insert(data=columns, context=ctx)
            except BaseException:
                self._events_insert = None  # a fresh context after a failure
                raise
            finally:
                # An InsertContext refers to itself (a bound method it keeps), so a throwaway
                # one, and the batch's columns it still holds after the insert, wait for the
                # cycle collector: with a large young generation, several batches' worth of
                # memory. One kept context, emptied here, lets the columns go at once.
                ctx.data = _NO_COLUMNS

    def record_progress(self, topic: str, next_offsets: dict[int, int]) -> None:
        if next_offsets:
            self.client.insert(
                f"{self.database}.sink_progress",
                [[topic, p, n] for p, n in sorted(next_offsets.items())],
                column_names=["topic", "partition", "next_offset"],
            )

    def stored_next_offsets(
        self, topic: str, partitions: Iterable[int] | None = None
    ) -> dict[int, int]:
        """The resume offset of each of ``partitions`` (default: every partition) that has
        one: its recorded progress; for a partition with no progress recorded (tables written
        before the sink recorded progress on assignment), the end of its stored rows (max
        ``kafka_offset`` + 1).

        Not the end of the rows when progress is recorded: rows past the progress are a batch
        whose insert was cut short, and such a batch may lack rows at lower offsets than the
        ones stored (``usage_events`` is partitioned by day and ClickHouse commits an
        insert's parts one after another: yesterday's late events can be missing while
        today's are stored). The batch is read again from the progress, and the rebuilt
        recent-id set drops the rows that were stored (``ClickHouseSink.on_assigned``).
        Only partitions with no progress have their rows read, once: the assignment records
        progress for each."""
        progress = self._progress(topic)
        if partitions is not None:
            asked = {int(p) for p in partitions}
            progress = {p: n for p, n in progress.items() if p in asked}
            missing: set[int] | None = asked - progress.keys()
        else:
            missing = None
        if missing is None:
            ends = self._rows_end(topic, None)
        else:
            ends = self._rows_end(topic, dict.fromkeys(missing)) if missing else {}
        return {p: progress[p] if p in progress else ends[p] for p in progress.keys() | ends.keys()}

    def _rows_end(self, topic: str, bounds: dict[int, int | None] | None) -> dict[int, int]:
        """max(``kafka_offset``) + 1 per partition over its rows at or past its bound (all its
        rows when the bound is None); ``bounds=None``: every partition, all rows."""
        db = self.database
        if bounds is None:
            queries = [
                f"SELECT kafka_partition, max(kafka_offset) + 1 FROM {db}.usage_events"  # noqa: S608
                f" WHERE kafka_topic = {{t:String}} GROUP BY kafka_partition"
            ]
        else:
            # One query per partition, so that each gets its own offset bound for the skip
            # index. Integers (partitions asked, our own progress), formatted as integers:
            # nothing from input reaches the SQL text.
            queries = [
                f"SELECT kafka_partition, max(kafka_offset) + 1 FROM {db}.usage_events"  # noqa: S608
                f" WHERE kafka_topic = {{t:String}} AND kafka_partition = {int(p):d}"
                + ("" if n is None else f" AND kafka_offset >= {int(n):d}")
                + " GROUP BY kafka_partition"
                for p, n in sorted(bounds.items())
            ]
        if not queries:
            return {}
        result = self.client.query(" UNION ALL ".join(queries), parameters={"t": topic})
        return {int(p): int(n) for p, n in result.result_rows}

    def stored_offsets(self, topic: str, since: dict[int, int]) -> dict[int, set[int]]:
        """The offsets of the rows stored at or past ``since[p]`` for each partition ``p``:
        a batch whose insert was cut short (normally none; at most a batch). The skip index
        leaves out the parts below the bound."""
        if not since:
            return {}
        # Integers (partitions asked, offsets from our own progress): nothing from input.
        queries = [
            f"SELECT kafka_partition, kafka_offset FROM {self.database}.usage_events"  # noqa: S608
            f" WHERE kafka_topic = {{t:String}} AND kafka_partition = {int(p):d}"
            f" AND kafka_offset >= {int(n):d}"
            for p, n in sorted(since.items())
        ]
        result = self.client.query(" UNION ALL ".join(queries), parameters={"t": topic})
        out: dict[int, set[int]] = {}
        for p, offset in result.result_rows:
            out.setdefault(int(p), set()).add(int(offset))
        return out

    def _progress(self, topic: str) -> dict[int, int]:
        result = self.client.query(
            f"SELECT partition, max(next_offset) FROM {self.database}.sink_progress"  # noqa: S608
            f" WHERE topic = {{t:String}} GROUP BY partition",
            parameters={"t": topic},
        )
        return {int(p): int(n) for p, n in result.result_rows}

    def repair_unfinished_batch(self, topic: str, partitions: Iterable[int]) -> int:
        """Complete the rollups of a batch whose insert was cut short by a crash.

        ClickHouse writes an insert's block to ``usage_events`` first and then to each
        materialized view, not atomically: a process killed in between leaves rows in
        ``usage_events`` that some rollups lack. Such rows are exactly those at or after the
        partition's recorded progress (progress is written only after the insert returned).
        For their buckets, each rollup gets one correcting row: sum and count of the missing
        difference against ``usage_events``, and the (idempotent) max, unique and latest
        states. Returns the number of correcting rows written (0 when nothing was cut short).
        Assumes a bucket's rows come from one partition (key = tenant), so no other worker
        writes these buckets meanwhile.
        """
        progress = self._progress(topic)
        asked = {int(p) for p in partitions}
        rows_end = self._rows_end(topic, {p: progress.get(p) for p in asked})
        # Only a partition whose rows reach past its recorded progress can have a cut batch.
        parts = sorted(p for p in asked if rows_end.get(p, 0) > progress.get(p, 0))
        if not parts:
            return 0
        # Integers from our own tables, formatted as integers: nothing from input reaches SQL.
        tail = " OR ".join(
            f"(kafka_partition = {p:d} AND kafka_offset >= {int(progress.get(p, 0)):d})"
            for p in parts
        )
        written = 0
        for table, rollup in REPAIRED_ROLLUPS.items():
            before = self._rollup_count(table)
            sql = rollup.repair_sql(self.database, table, tail)
            self.client.command(sql, parameters={"t": topic})
            written += self._rollup_count(table) - before
        return written

    # --- the hand-off ledger's records (streams/handoff.py) -----------------------------------
    def record_handoffs(self, topic: str, ranges: Iterable[tuple[int, int, int]]) -> None:
        """Record (partition, start, end) ranges about to be handed to the Faust tables."""
        rows = [[topic, int(p), int(a), int(b)] for p, a, b in ranges]
        if rows:
            self.client.insert(
                f"{self.database}.aggregate_handoffs",
                rows,
                column_names=["topic", "partition", "start_offset", "end_offset"],
            )

    def _latest(
        self, table: str, other: str, by: str, topic: str, partitions: Iterable[int]
    ) -> list[tuple[int, Any, Any]]:
        """Per partition of ``topic``: (partition, ``other`` of the row with the greatest
        ``by``, that greatest ``by``), from ``table``. Names are this class's own constants."""
        parts = sorted({int(p) for p in partitions})
        if not parts:
            return []
        result = self.client.query(
            f"SELECT partition, argMax({other}, {by}), max({by})"  # noqa: S608
            f" FROM {self.database}.{table}"
            f" WHERE topic = {{t:String}} AND partition IN {{ps:Array(Int32)}} GROUP BY partition",
            parameters={"t": topic, "ps": parts},
        )
        return [(int(p), a, b) for p, a, b in result.result_rows]

    def claims(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, str]]:
        """Each partition's latest hand-off claim: (claim number, owner)."""
        rows = self._latest("aggregate_claims", "owner", "claim", topic, partitions)
        return {p: (int(n), str(o)) for p, o, n in rows}

    def claim_partitions(
        self, topic: str, partitions: Iterable[int], owner: str
    ) -> dict[int, tuple[int, str]]:
        """Claim ``partitions`` for ``owner``, each with the number after its latest claim."""
        parts = sorted({int(p) for p in partitions})
        current = self.claims(topic, parts)
        claimed = {p: (current.get(p, (0, ""))[0] + 1, owner) for p in parts}
        if claimed:
            self.client.insert(
                f"{self.database}.aggregate_claims",
                [[topic, p, n, o] for p, (n, o) in claimed.items()],
                column_names=["topic", "partition", "claim", "owner"],
            )
        return claimed

    def last_handoffs(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Each partition's last recorded range (the one with the greatest end)."""
        rows = self._latest("aggregate_handoffs", "start_offset", "end_offset", topic, partitions)
        return {p: (int(a), int(b)) for p, a, b in rows}

    def billable_sums(
        self, topic: str, partition: int, start: int, end: int
    ) -> list[tuple[str, str, int, float]]:
        """(tenant, meter, minute start, quantity) of the billable rows inserted from
        ``partition``'s offsets ``[start, end)``."""
        result = self.client.query(
            f"SELECT tenant, meter, toInt64(toUnixTimestamp(toStartOfMinute(time))) AS m,"  # noqa: S608
            f" sum(quantity) FROM {self.database}.usage_events"
            f" WHERE kafka_topic = {{t:String}} AND kafka_partition = {{p:Int32}}"
            f" AND kafka_offset >= {{a:Int64}} AND kafka_offset < {{b:Int64}} AND billable = 1"
            f" GROUP BY tenant, meter, m",
            parameters={"t": topic, "p": int(partition), "a": int(start), "b": int(end)},
        )
        return [(t, m, int(minute), float(q)) for t, m, minute, q in result.result_rows]

    def _rollup_count(self, table: str) -> int:
        result = self.client.query(f"SELECT count() FROM {self.database}.{table}")  # noqa: S608
        return int(result.result_rows[0][0])

    def recent_ids(
        self, topic: str, partitions: Iterable[int], since: dt.datetime
    ) -> Iterable[tuple[str, str, dt.datetime]]:
        parts = sorted({int(p) for p in partitions})
        if not parts:
            return []
        result = self.client.query(
            f"SELECT tenant, id, time FROM {self.database}.usage_events"  # noqa: S608
            f" WHERE kafka_topic = {{t:String}} AND kafka_partition IN {{ps:Array(Int32)}}"
            f" AND time >= {{since:DateTime64(3, 'UTC')}}",
            parameters={"t": topic, "ps": parts, "since": since.astimezone(dt.UTC)},
        )
        return [
            (tenant, event_id, t if t.tzinfo else t.replace(tzinfo=dt.UTC))
            for tenant, event_id, t in result.result_rows
        ]


def resume_offsets(
    partitions: Iterable[int], stored: Mapping[int, int], committed: Mapping[int, int]
) -> dict[int, int]:
    """Where each partition resumes: ClickHouse's stored progress (the record), else Kafka's
    ``committed`` offset (a partition without progress: its first assignment in this
    database), else 0."""
    return {p: stored[p] if p in stored else committed.get(p, 0) for p in partitions}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ClickHouseSink:
    """Decodes, dedupes and writes batches; see the module docstring for the invariant.

    Not thread-safe: one consumer loop drives it (its blocking calls run in one worker thread).
    """

    def __init__(
        self,
        storage: SinkStorage,
        *,
        topic: str,
        lateness_seconds: float,
        max_future_skew: float,
        bucket_seconds: int = 10,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.storage = storage
        self.topic = topic
        self.max_future_skew = max_future_skew
        self.recent = RecentIds(lateness_seconds, bucket_seconds)
        self.clock = clock
        #: per partition, the offsets past its resume offset that ClickHouse holds rows for (a
        #: batch cut short, read again): empty but after such a crash
        self._stored_past: dict[int, set[int]] = {}

    # --- step 1: assignment ---------------------------------------------------------------------
    def on_assigned(
        self, partitions: Iterable[int], committed: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Complete a batch a crash cut short, rebuild the id set for ``partitions``; return
        their stored resume offsets. A partition without stored progress resumes at Kafka's
        ``committed`` offset, if it has one, else at 0: that is recorded as its progress."""
        parts = sorted(set(partitions))
        self.storage.repair_unfinished_batch(self.topic, parts)
        now = self.clock()
        recent = self.recent
        recent.evict(now)
        rows = self.storage.recent_ids(self.topic, parts, recent.rebuild_since(now))
        recent.add_rebuilt(rows, now)
        stored = self.storage.stored_next_offsets(self.topic, parts)
        resume = resume_offsets(parts, stored, committed or {})
        # The rows of a batch cut short, read again from the resume offset: recognised by
        # their offsets as the batch comes by (PreparedBatch.stored).
        past = self.storage.stored_offsets(self.topic, resume)
        for p in parts:
            if past.get(p):
                self._stored_past[p] = past[p]
            else:
                self._stored_past.pop(p, None)
        # Progress for every assigned partition (the rows below it are complete: the repair
        # ran first), so the next assignment reads only the rows past it, even for a partition
        # that has had no batch since.
        self.storage.record_progress(self.topic, resume)
        return {p: stored[p] for p in parts if p in stored}

    # --- steps a, b -----------------------------------------------------------------------------
    def prepare(self, records: Iterable[SinkRecord]) -> PreparedBatch:
        """Decode and dedupe ``records`` (one partition's records in offset order)."""
        now = self.clock()
        recent = self.recent
        recent.evict(now)
        decode = batch_decoder(now, self.max_future_skew)
        cutoff = recent.cutoff(now)
        batch = PreparedBatch()
        next_offsets, events, id_keys = batch.next_offsets, batch.events, batch.id_keys
        dead_letters, millis = batch.dead_letters, batch.millis
        key_of, seen = recent.key, recent.seen
        held_from = recent.bucket(now)  # each id is held for the lateness from its arrival
        renewed = batch.renewed
        in_batch: set[str] = set()
        duplicates = 0
        stored_past, stored = self._stored_past, batch.stored
        for rec in records:
            partition, offset, value = rec.partition, rec.offset, rec.value
            if next_offsets.get(partition, 0) <= offset:
                next_offsets[partition] = offset + 1
            if value is None:
                dead_letters.append(DeadLetter(rec, "invalid", "event: message has no value"))
                continue
            try:
                ev = decode(value)
            except EventDecodeError as exc:
                dead_letters.append(DeadLetter(rec, "invalid", _decode_error(rec, exc)))
                continue
            if stored_past and offset in stored_past.get(partition, ()):
                # Its row is in ClickHouse at this offset (it passed every check when it was
                # inserted, however late it is now): neither inserted again nor a dead letter.
                stored.append((rec, ev, (ev.time - _EPOCH) // _MS))
                continue
            if rec.key != ev.subject.encode():
                # The key is the tenant (DESIGN.md): one tenant's events, and their resends,
                # share a partition, so one worker's id set and rollup repair see them all. A
                # resend with another key could land on another worker's partition and count
                # twice.
                dead_letters.append(DeadLetter(rec, "invalid", _key_error(rec.key)))
                continue
            t = ev.time
            if t < cutoff:  # later than the lateness (RecentIds.is_late)
                lateness = recent.lateness.total_seconds()
                age = seconds_past((now - t).total_seconds(), lateness)
                dead_letters.append(
                    DeadLetter(
                        rec,
                        "late",
                        f"time: {age}s old, later than the accepted lateness ({lateness:g}s)",
                    )
                )
                continue
            key = key_of(ev.subject, ev.id)
            if key in in_batch or seen(key):  # by (tenant, id), whatever time a resend has
                duplicates += 1
                renewed.append((held_from, key))
                continue
            in_batch.add(key)
            events.append((rec, ev))
            id_keys.append((held_from, key))
            millis.append((t - _EPOCH) // _MS)  # the time column's ticks
        batch.duplicates = duplicates
        return batch

    # --- steps d, e, f (c is the caller's: it owns the producer) ----------------------------------
    def write(self, batch: PreparedBatch) -> float:
        """Insert the rows, mark their ids, record progress; return the insert's seconds."""
        rows = batch.rows()
        started = _time.perf_counter()
        self.storage.insert_events(rows, batch.millis)
        took = _time.perf_counter() - started
        self.recent.add_keys(batch.id_keys)
        self.recent.add_keys(batch.renewed)
        self.storage.record_progress(self.topic, batch.next_offsets)
        if self._stored_past:
            for p, nxt in batch.next_offsets.items():
                left = {o for o in self._stored_past.get(p, ()) if o >= nxt}
                if left:
                    self._stored_past[p] = left
                else:
                    self._stored_past.pop(p, None)
        return took


def _decode_error(rec: SinkRecord, exc: EventDecodeError) -> str:
    """Why ``rec`` could not be decoded. A CloudEvents binary-mode message (attributes in
    ``ce_*`` headers, only the data in the value) is named as such: the fields it lacks in its
    value would send its producer looking for the wrong mistake."""
    if any(name.lower() == "ce_specversion" for name, _ in record_headers(rec)):
        return "event: CloudEvents binary mode is not accepted: send structured-mode JSON"
    return str(exc)


def _key_error(key: bytes | None) -> str:
    shown = "none" if key is None else repr(key[:80])
    return f"key: must be the event's subject (the tenant id), got {shown}"


def dead_letter_value(letter: DeadLetter) -> bytes:
    """The dead letter's value: the original bytes, unchanged (an empty value stays empty)."""
    return letter.record.value or b""


__all__ = [
    "EVENT_COLUMNS",
    "REPAIRED_ROLLUPS",
    "ROLLUPS",
    "ClickHouseSink",
    "ClickHouseStorage",
    "DeadLetter",
    "PreparedBatch",
    "Record",
    "SinkRecord",
    "SinkStorage",
    "dead_letter_value",
    "event_row",
    "record_headers",
]

"""The sink's pure logic against a recorded storage: dedupe, lateness, dead letters, step order."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from metering.events import decision_event, encode_event, usage_event
from streams.dedupe import RecentIds
from streams.handoff import HandoffLedger, PartitionRange, Recovery
from streams.sink import ClickHouseSink, Record

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
TOPIC = "usage.events"


class RecordedStorage:
    """Keeps what the sink writes, in call order (the real one is tested in integration)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.rows: list[Sequence[Any]] = []
        self.progress: dict[int, int] = {}

    def insert_events(
        self, rows: Sequence[Sequence[Any]], millis: Sequence[int] | None = None
    ) -> None:
        self.calls.append("insert_events")
        self.rows.extend(rows)

    def record_progress(self, topic: str, next_offsets: dict[int, int]) -> None:
        self.calls.append("record_progress")
        for p, n in next_offsets.items():
            self.progress[p] = max(self.progress.get(p, 0), n)

    def stored_next_offsets(
        self, topic: str, partitions: Iterable[int] | None = None
    ) -> dict[int, int]:
        stored = dict(self.progress)  # as ClickHouseStorage: progress, else the rows' end
        for row in self.rows:
            p, off = row[11], row[12]
            if p not in self.progress:
                stored[p] = max(stored.get(p, 0), off + 1)
        if partitions is None:
            return stored
        asked = set(partitions)
        return {p: n for p, n in stored.items() if p in asked}

    def repair_unfinished_batch(self, topic: str, partitions: Iterable[int]) -> int:
        self.calls.append("repair_unfinished_batch")
        return 0

    def stored_offsets(self, topic: str, since: dict[int, int]) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for row in self.rows:
            p, off = row[11], row[12]
            if p in since and off >= since[p]:
                out.setdefault(p, set()).add(off)
        return out

    def recent_ids(
        self, topic: str, partitions: Iterable[int], since: dt.datetime
    ) -> list[tuple[str, str, dt.datetime]]:
        parts = set(partitions)
        return [(r[3], r[0], r[7]) for r in self.rows if r[11] in parts and r[7] >= since]


def make_sink(storage: RecordedStorage, lateness: float = 3600) -> ClickHouseSink:
    return ClickHouseSink(
        storage, topic=TOPIC, lateness_seconds=lateness, max_future_skew=300, clock=lambda: NOW
    )


def rec(offset: int, value: bytes | None, partition: int = 0, key: bytes | None = None) -> Record:
    """A record keyed by its event's subject (the tenant), as producers send them."""
    if key is None:
        try:
            key = json.loads(value or b"")["subject"].encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            key = b"k"
    return Record(TOPIC, partition, offset, key, value)


def ev(tenant: str, qty: float, *, minutes_ago: float = 1, id: str | None = None) -> bytes:
    t = NOW - dt.timedelta(minutes=minutes_ago)
    return encode_event(usage_event(tenant, "requests", qty, time=t, id=id))


def test_a_resent_event_id_counts_once_within_a_batch_and_across_batches() -> None:
    storage = RecordedStorage()
    sink = make_sink(storage)
    first = sink.prepare([rec(0, ev("acme", 5, id="e1")), rec(1, ev("acme", 5, id="e1"))])
    assert (len(first.events), first.duplicates) == (1, 1)
    sink.write(first)
    again = sink.prepare([rec(2, ev("acme", 5, id="e1")), rec(3, ev("acme", 7, id="e2"))])
    assert (len(again.events), again.duplicates) == (1, 1)
    sink.write(again)
    assert sum(r[8] for r in storage.rows) == 12.0
    # The same id under another tenant is another event.
    other = sink.prepare([rec(4, ev("globex", 1, id="e1"))])
    assert len(other.events) == 1


def test_a_resend_with_another_time_still_counts_once() -> None:
    """The id is the idempotency key: a client that rebuilds the event on retry (a fresh
    ``time``, here in another minute and bucket) is still a resend, in the next batch, after a
    restart (the set rebuilt from storage), and for another tenant's id the same string is not."""
    storage = RecordedStorage()
    sink = make_sink(storage)
    sink.write(sink.prepare([rec(0, ev("acme", 5, minutes_ago=30, id="order-123"))]))
    again = sink.prepare(
        [
            rec(1, ev("acme", 5, minutes_ago=2, id="order-123")),
            rec(2, ev("acme", 5, minutes_ago=0, id="order-123")),
            rec(3, ev("globex", 7, minutes_ago=2, id="order-123")),
        ]
    )
    assert again.duplicates == 2
    sink.write(again)
    restarted = make_sink(storage)
    restarted.on_assigned([0])
    replay = restarted.prepare([rec(4, ev("acme", 5, minutes_ago=1, id="order-123"))])
    assert replay.duplicates == 1 and not replay.events
    assert sorted((r[3], r[8]) for r in storage.rows) == [("acme", 5.0), ("globex", 7.0)]


def test_an_id_is_held_for_the_lateness_from_its_arrival_not_from_its_time() -> None:
    """An event stamped 59 minutes ago (lateness 60) arrives now; its resend, rebuilt with a
    fresh time, comes 2 minutes later, once after a restart: both times dropped. Only a resend
    arriving more than the lateness after the original counts again (the stated bound)."""
    storage = RecordedStorage()
    clock = [NOW]

    def sink_at() -> ClickHouseSink:
        return ClickHouseSink(
            storage, topic=TOPIC, lateness_seconds=3600, max_future_skew=300,
            clock=lambda: clock[0],
        )  # fmt: skip

    sink = sink_at()
    sink.write(sink.prepare([rec(0, ev("acme", 5, minutes_ago=59, id="order-1"))]))
    clock[0] = NOW + dt.timedelta(minutes=2)
    resend = sink.prepare([rec(1, ev("acme", 5, minutes_ago=-2, id="order-1"))])
    assert resend.duplicates == 1
    sink.write(resend)
    restarted = sink_at()
    restarted.on_assigned([0])
    again = restarted.prepare([rec(2, ev("acme", 5, minutes_ago=-2, id="order-1"))])
    assert again.duplicates == 1
    restarted.write(again)
    clock[0] = NOW + dt.timedelta(minutes=125)  # over an hour after the last resend arrived
    late = restarted.prepare([rec(3, ev("acme", 5, minutes_ago=-125, id="order-1"))])
    assert late.duplicates == 0 and len(late.events) == 1
    assert [r[8] for r in storage.rows] == [5.0]


def test_malformed_invalid_and_late_messages_become_dead_letters_with_reasons() -> None:
    sink = make_sink(RecordedStorage(), lateness=3600)
    batch = sink.prepare(
        [
            rec(0, b"not json"),
            rec(1, None),
            rec(2, b'{"specversion":"1.0"}'),
            rec(3, ev("acme", 1, minutes_ago=61)),  # later than the lateness
            rec(4, ev("acme", 2, minutes_ago=59)),  # late but accepted: counts in its own minute
        ]
    )
    reasons = [(d.record.offset, d.reason) for d in batch.dead_letters]
    assert reasons == [(0, "invalid"), (1, "invalid"), (2, "invalid"), (3, "late")]
    assert "not valid JSON" in batch.dead_letters[0].error
    assert "id: is required" in batch.dead_letters[2].error
    headers = dict(batch.dead_letters[3].headers())
    assert headers["dlq.reason"] == b"late" and headers["dlq.offset"] == b"3"
    assert [r.offset for r, _ in batch.events] == [4]
    ledger = HandoffLedger(TOPIC)
    ledger.recover([Recovery(0, None, PartitionRange(0, 0, 0))])  # partition 0, nothing before
    ledger.add(batch)
    (taken,) = ledger.take()
    ((_, _, minute),) = taken.sums  # the late-but-accepted event counts in its own minute
    assert minute == int((NOW - dt.timedelta(minutes=59)).timestamp()) // 60 * 60


def test_a_message_keyed_other_than_by_its_subject_is_a_dead_letter() -> None:
    """A resend keyed otherwise (no key, another tenant) could land on a partition another
    worker owns, beyond this worker's id set: it would count twice."""
    sink = make_sink(RecordedStorage())
    batch = sink.prepare(
        [
            rec(0, ev("acme", 1, id="a")),
            rec(1, ev("acme", 2, id="b"), key=b"globex"),
            rec(2, ev("acme", 3, id="c"), key=b""),
            Record(TOPIC, 0, 3, None, ev("acme", 4, id="d")),
        ]
    )
    assert [r.offset for r, _ in batch.events] == [0]
    assert [(d.record.offset, d.reason) for d in batch.dead_letters] == [
        (1, "invalid"),
        (2, "invalid"),
        (3, "invalid"),
    ]
    assert batch.dead_letters[0].error == (
        "key: must be the event's subject (the tenant id), got b'globex'"
    )
    assert batch.dead_letters[2].error.endswith("got none")
    assert batch.next_offsets == {0: 4}


def test_progress_covers_offsets_that_left_no_row() -> None:
    storage = RecordedStorage()
    sink = make_sink(storage)
    batch = sink.prepare(
        [rec(10, ev("acme", 1), partition=0), rec(11, b"bad", partition=0), rec(7, b"x", 1)]
    )
    assert batch.next_offsets == {0: 12, 1: 8}
    sink.write(batch)
    assert storage.calls == ["insert_events", "record_progress"]  # rows first, then progress
    assert storage.stored_next_offsets(TOPIC) == {0: 12, 1: 8}


def test_after_a_restart_the_id_set_is_rebuilt_from_storage_so_a_replay_adds_nothing() -> None:
    storage = RecordedStorage()
    sink = make_sink(storage)
    records = [rec(i, ev("acme", 1, id=f"e{i}")) for i in range(5)]
    sink.write(sink.prepare(records))
    # Crash after the insert, before anything else: a fresh sink over the same storage.
    restarted = make_sink(storage)
    assert restarted.on_assigned([0]) == {0: 5}
    replay = restarted.prepare(records)
    assert (len(replay.events), replay.duplicates) == (0, 5)


def test_rejected_decisions_are_stored_but_not_billable() -> None:
    storage = RecordedStorage()
    sink = make_sink(storage)
    rejected = decision_event("acme", False, cost=3, time=NOW)
    allowed = decision_event("acme", True, cost=2, time=NOW)
    sink.write(sink.prepare([rec(0, encode_event(rejected)), rec(1, encode_event(allowed))]))
    by_decision = {r[5]: (r[6], r[8]) for r in storage.rows}
    assert by_decision == {"rejected": (0, 3.0), "allowed": (1, 2.0)}


def test_recent_ids_forget_only_buckets_older_than_the_lateness() -> None:
    ids = RecentIds(lateness_seconds=600, bucket_seconds=60)
    for minutes_ago in range(0, 30):
        ids.add("acme", f"e{minutes_ago}", NOW - dt.timedelta(minutes=minutes_ago))
    dropped = ids.evict(NOW)
    assert dropped == 19  # minutes 11..29 end before now - 10 min
    assert ids.contains("acme", "e10", NOW - dt.timedelta(minutes=10))
    assert not ids.contains("acme", "e20", NOW - dt.timedelta(minutes=20))
    assert ids.is_late(NOW - dt.timedelta(minutes=11), NOW)
    assert not ids.is_late(NOW - dt.timedelta(minutes=9), NOW)


def test_an_id_held_by_two_buckets_stays_until_the_later_one_goes() -> None:
    """Rebuilt from rows an older version stored twice (two times, one id), the id is kept
    as long as its later time is within the lateness."""
    ids = RecentIds(lateness_seconds=600, bucket_seconds=60)
    ids.add("acme", "e", NOW - dt.timedelta(minutes=20))
    ids.add("acme", "e", NOW - dt.timedelta(minutes=5))
    ids.add("acme", "f", NOW - dt.timedelta(minutes=5))
    ids.add("acme", "f", NOW - dt.timedelta(minutes=20))
    assert len(ids) == 2
    assert ids.evict(NOW) == 0
    assert ids.contains("acme", "e") and ids.contains("acme", "f")
    assert ids.evict(NOW + dt.timedelta(minutes=6)) == 2
    assert len(ids) == 0


def test_recent_ids_refuse_a_nonsense_window() -> None:
    with pytest.raises(ValueError):
        RecentIds(lateness_seconds=0)

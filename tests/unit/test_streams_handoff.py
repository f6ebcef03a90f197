"""The hand-off to the Faust tables: every inserted event counts once in the day and window
values, across crashes at each step of a flush and replays of ``accepted_usage``.

The simulation drives the real sink (``ClickHouseSink`` over a recorded storage), the real
ledger, ``flush``, ``plan_recovery`` (each life claiming the partitions), ``record_claimed`` and
``fold_into``; only Kafka and ClickHouse are modelled
(the worker's SIGKILL test in ``tests/integration/test_streams_worker.py`` runs the real ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import random
from collections.abc import Iterable
from typing import Any

import pytest
from faust.windows import HoppingWindow

from metering.events import decision_event, encode_event, usage_event
from streams.handoff import (
    HANDOFF_PART_BYTES,
    Handoff,
    HandoffLedger,
    PartitionRange,
    closed_daily_keys,
    daily_key,
    expired_window_keys,
    first_open_day,
    flush,
    fold,
    fold_into,
    fold_legacy_into,
    plan_recovery,
    record_claimed,
    source_of,
    tenant_of,
    usage,
    window_key,
)
from streams.sink import ClickHouseSink, Record
from tests.unit.test_streams_sink import RecordedStorage

NOW = dt.datetime(2026, 3, 2, 0, 10, tzinfo=dt.UTC)  # events on both sides of midnight
TOPIC = "usage.events"
PARTITIONS = (0, 1, 2)
WINDOWS = HoppingWindow(300, 60)


class Storage(RecordedStorage):
    """The recorded sink storage plus the hand-off ledger's table."""

    def __init__(self) -> None:
        super().__init__()
        self.handoffs: list[tuple[int, int, int]] = []
        self.claimed: list[tuple[int, int, str]] = []  # (partition, claim, owner)

    def record_handoffs(self, topic: str, ranges: Iterable[tuple[int, int, int]]) -> None:
        self.handoffs.extend(ranges)

    def claims(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, str]]:
        wanted = set(partitions)
        out: dict[int, tuple[int, str]] = {}
        for p, n, owner in self.claimed:
            if p in wanted and n >= out.get(p, (0, ""))[0]:
                out[p] = (n, owner)
        return out

    def claim_partitions(
        self, topic: str, partitions: Iterable[int], owner: str
    ) -> dict[int, tuple[int, str]]:
        current = self.claims(topic, partitions)
        claimed = {p: (current.get(p, (0, ""))[0] + 1, owner) for p in sorted(set(partitions))}
        self.claimed.extend((p, n, o) for p, (n, o) in claimed.items())
        return claimed

    def last_handoffs(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        wanted = set(partitions)
        last: dict[int, tuple[int, int]] = {}
        for p, a, b in self.handoffs:
            if p in wanted and b >= last.get(p, (0, -1))[1]:
                last[p] = (a, b)
        return last

    def billable_sums(
        self, topic: str, partition: int, start: int, end: int
    ) -> list[tuple[str, str, int, float]]:
        return [
            (r[3], r[4], int(r[7].timestamp()) // 60 * 60, r[8])
            for r in self.rows
            if r[11] == partition and start <= r[12] < end and r[6] == 1
        ]


class Crash(Exception):
    """The worker process dies here."""


class Unavailable(Exception):
    """ClickHouse or Kafka fails the call; the process carries on (the flush is retried)."""


class Tables:
    """The Faust tables as the agent sees them after a crash: each changelog keeps a prefix of
    its writes (at least those before the committed offset), and the agent replays
    ``accepted_usage`` from its committed offset."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []  # accepted_usage
        self.processed = 0
        self.committed = 0
        self.writes: dict[str, list[tuple[Any, Any]]] = {"daily": [], "windows": []}
        self.writes_at_commit = {"daily": 0, "windows": 0}

    def state(self, name: str, upto: int | None = None) -> dict[Any, Any]:
        return dict(self.writes[name][:upto])

    def process(self, rng: random.Random) -> None:
        daily, windows = self.state("daily"), self.state("windows")
        recorder = {"daily": _Recording(daily), "windows": _Recording(windows)}
        for value in self.log[self.processed :]:
            fold_into(
                Handoff.from_message(value), recorder["daily"], recorder["windows"], WINDOWS.ranges
            )
            self.processed += 1
        for name, rec in recorder.items():
            self.writes[name].extend(rec.writes)
        if rng.random() < 0.7:  # a commit: the changelogs are flushed first (Faust does)
            self.committed = self.processed
            self.writes_at_commit = {k: len(v) for k, v in self.writes.items()}

    def crash(self, rng: random.Random) -> None:
        for name, writes in self.writes.items():
            keep = rng.randint(self.writes_at_commit[name], len(writes))
            del writes[keep:]
        self.processed = self.committed


class _Recording(dict[Any, Any]):
    def __init__(self, data: dict[Any, Any]) -> None:
        super().__init__(data)
        self.writes: list[tuple[Any, Any]] = []

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.writes.append((key, value))


def source_events(rng: random.Random, per_partition: int) -> dict[int, list[Record]]:
    tenants = ["acme", "globex", "initech"]
    out: dict[int, list[Record]] = {}
    n = 0
    for p in PARTITIONS:
        records: list[Record] = []
        for offset in range(per_partition):
            tenant = tenants[rng.randrange(3)]
            t = NOW - dt.timedelta(seconds=rng.randrange(0, 1500))
            roll = rng.random()
            if roll < 0.1 and records:  # a resend of an earlier message of this partition
                value = records[rng.randrange(len(records))].value
            elif roll < 0.2:
                value = encode_event(decision_event(tenant, False, cost=3, time=t))
            elif roll < 0.25:
                value = b"not json"
            else:
                n += 1
                qty = rng.choice([1, 2, 5, 0.5])
                meter = rng.choice(["requests", "requests", "tokens"])  # kept apart in the tables
                value = encode_event(usage_event(tenant, meter, qty, time=t, id=f"e{n}"))
            records.append(Record(TOPIC, p, offset, tenant.encode(), value))
        out[p] = records
    return out


def expected(storage: Storage) -> tuple[dict[str, float], dict[Any, float]]:
    daily: dict[str, float] = {}
    windows: dict[Any, float] = {}
    for r in storage.rows:
        if r[6] != 1:
            continue
        key = f"{r[3]}|{r[4]}|{r[7].date().isoformat()}"  # tenant, meter, UTC day
        daily[key] = daily.get(key, 0.0) + r[8]
        for wr in WINDOWS.ranges(float(int(r[7].timestamp()) // 60 * 60)):
            wkey = (f"{r[3]}|{r[4]}", wr)
            windows[wkey] = windows.get(wkey, 0.0) + r[8]
    return daily, windows


def run(seed: int) -> tuple[Storage, Tables]:
    rng = random.Random(seed)
    source = source_events(rng, per_partition=rng.randint(20, 60))
    storage = Storage()
    tables = Tables()
    lives: list[str] = []

    async def life(last: bool) -> bool:
        """One process: recover, then batches and flushes until a crash (or, if ``last``,
        until the source is drained and a final flush). Returns True when drained."""
        sink = ClickHouseSink(
            storage, topic=TOPIC, lateness_seconds=3600, max_future_skew=300, clock=lambda: NOW
        )
        stored = sink.on_assigned(PARTITIONS)
        resume = {p: stored.get(p, 0) for p in PARTITIONS}
        ledger = HandoffLedger(TOPIC)
        lives.append(f"life-{len(lives)}")  # each process claims the partitions anew
        ledger.recover(plan_recovery(storage, TOPIC, resume, lives[-1]))
        pos = dict(resume)
        crash_at = None if last else rng.randint(1, 12)
        step = 0

        async def record(ranges: list[tuple[int, int, int]]) -> set[int]:
            if mode == "before_record":
                raise Crash
            if fail == "record":
                raise Unavailable
            lost = record_claimed(storage, TOPIC, ranges, ledger.claims)
            assert not lost  # one process at a time: its claims stay the latest
            if mode == "after_record":
                raise Crash
            return lost

        async def send(handoffs: list[Handoff]) -> None:
            if (mode == "mid_send" or fail == "send") and handoffs:
                cut = rng.randrange(len(handoffs))
                tables.log.extend(h.message() for h in handoffs[:cut])
                raise Crash if mode else Unavailable
            tables.log.extend(h.message() for h in handoffs)
            if mode == "after_send":
                raise Crash

        while True:
            step += 1
            mode = None
            fail = None
            if crash_at is not None and step >= crash_at:
                mode = rng.choice(["before_record", "after_record", "mid_send", "after_send"])
            p = rng.choice(PARTITIONS)
            records = source[p][pos[p] : pos[p] + rng.randint(1, 15)]
            if records:
                batch = sink.prepare(records)
                sink.write(batch)
                ledger.add(batch)
                pos[p] += len(records)
            if mode is not None:  # the process dies in this flush, or right after it
                with contextlib.suppress(Crash):
                    await flush(ledger, record, send, rng.choice([None, {p}]))
                return False
            if last and all(pos[q] >= len(source[q]) for q in PARTITIONS):
                await flush(ledger, record, send)
                return True
            if rng.random() < 0.4:
                # Sometimes ClickHouse or Kafka fails the flush and the process carries on:
                # the next flush must resend or re-take it without loss or double count.
                fail = rng.choice([None, None, "record", "send"])
                with contextlib.suppress(Unavailable):
                    await flush(ledger, record, send, rng.choice([None, {p}]))
                fail = None
            if rng.random() < 0.3:
                tables.process(rng)

    for _ in range(6):  # a few crashed lives, each also crashing the agent
        asyncio.run(life(last=False))
        tables.process(rng)
        tables.crash(rng)
    assert asyncio.run(life(last=True))
    tables.process(rng)
    return storage, tables


@pytest.mark.parametrize("seed", range(60))
def test_every_inserted_event_counts_once_in_the_tables_across_crashes_failures_and_replays(
    seed: int,
) -> None:
    storage, tables = run(seed)
    want_daily, want_windows = expected(storage)
    daily = {k: usage(v) for k, v in tables.state("daily").items()}
    windows = {k: usage(v) for k, v in tables.state("windows").items()}
    assert daily == pytest.approx(want_daily)
    assert windows == pytest.approx(want_windows)
    assert len({r[0] for r in storage.rows}) == len(storage.rows)  # the sink's own guarantee
    assert sum(daily.values()) > 0


def test_a_replayed_or_resent_hand_off_changes_nothing() -> None:
    src = source_of(TOPIC, 3)
    v = fold(None, src, 10, 5.0)
    assert v == {"q": 5.0, "m": {src: 10}}
    assert fold(v, src, 10, 5.0) is None  # the same range again
    assert fold(v, src, 7, 1.0) is None  # an older range
    v2 = fold(v, source_of(TOPIC, 4), 3, 2.0)  # another partition's range
    assert v2 is not None and usage(v2) == 7.0
    assert usage(fold(7.5, src, 1, 1.0)) == 8.5  # a value of the earlier (float) format


def test_a_range_with_several_minutes_of_one_window_adds_them_all() -> None:
    minute = int(NOW.timestamp()) // 60 * 60
    h = Handoff("acme", "t:0", 0, 5, (("requests", minute - 60, 1.0), ("requests", minute, 2.0)))
    daily: dict[Any, Any] = {}
    windows: dict[Any, Any] = {}
    fold_into(h, daily, windows, WINDOWS.ranges)
    both = [wr for wr in WINDOWS.ranges(float(minute)) if wr[0] <= minute - 60]
    assert both and all(usage(windows[("acme|requests", wr)]) == 3.0 for wr in both)
    assert fold_into(h, daily, windows, WINDOWS.ranges) == 0


def test_a_tenant_with_too_many_sums_for_one_message_gets_several_cut_between_meters() -> None:
    """The scale audit's case: one tenant's 25,000 meters in one range made a 1.9 MB message,
    which Kafka refused; the flush retried it before anything newer, so the tables of every
    tenant stopped. The sums now go out in parts under the budget, each meter whole in one
    part, and the parts count exactly what one message would, each key once."""
    minute = int(NOW.timestamp()) // 60 * 60
    meters = [f"m{i:05d}" + "x" * 58 for i in range(3000)]  # 64 characters, the longest
    sums = {("big", m, minute - 60 * k): float(k + 1) for m in meters for k in range(20)}
    sums[("small", "requests", minute)] = 2.0
    rng = PartitionRange(0, 0, 100, sums)

    parts = rng.handoffs(TOPIC)

    small = [h for h in parts if h.tenant == "small"]
    assert [h.sums for h in small] == [(("requests", minute, 2.0),)]
    big = [h for h in parts if h.tenant == "big"]
    assert len(big) > 1
    for h in big:
        size = len(json.dumps(h.message()))
        assert size <= HANDOFF_PART_BYTES + 200  # the budget, plus the tenant and range
        assert (h.source, h.start, h.end) == (source_of(TOPIC, 0), 0, 100)
    owners = {}
    for i, h in enumerate(big):
        for meter, _, _ in h.sums:
            assert owners.setdefault(meter, i) == i, f"{meter} in parts {owners[meter]} and {i}"
    assert [s for h in big for s in h.sums] == sorted(
        (m, t, q) for (_, m, t), q in sums.items() if m != "requests"
    )

    whole = Handoff("big", source_of(TOPIC, 0), 0, 100, tuple(s for h in big for s in h.sums))
    want_daily: dict[Any, Any] = {}
    want_windows: dict[Any, Any] = {}
    fold_into(whole, want_daily, want_windows, WINDOWS.ranges)
    daily: dict[Any, Any] = {}
    windows: dict[Any, Any] = {}
    for h in big:
        fold_into(h, daily, windows, WINDOWS.ranges)
    assert daily == want_daily  # both days of every meter (the minutes cross midnight)
    assert windows == want_windows
    assert len(daily) == 2 * len(meters)
    assert sum(fold_into(h, daily, windows, WINDOWS.ranges) for h in big) == 0  # a resend


def test_one_meter_with_too_many_minutes_for_a_message_has_its_closed_minutes_merged_per_day() -> (
    None
):
    """The review's case: one meter's sums are never cut (a window key would get the range
    from two parts with the same mark), and with a lateness of days they alone passed Kafka's
    1 MB. The minutes no open window holds are merged per day: every day value and every
    window the agent still writes get what the unmerged sums gave them."""
    minute = int(NOW.timestamp()) // 60 * 60
    meter = "m" * 64
    sums = {("acme", meter, minute - 60 * k): 1.0 + (k % 7) / 8 for k in range(3 * 1440)}
    closed_before = NOW.timestamp() - 300 - 1800 - 300  # the window, its expiry, the margin
    rng = PartitionRange(0, 0, 100, sums)

    (merged,) = rng.handoffs(TOPIC, windows_closed_before=closed_before)
    (unmerged,) = rng.handoffs(TOPIC, part_bytes=10**9)

    assert len(json.dumps(merged.message())) < 20_000  # 4,320 sums before: ~500 KB
    assert len(merged.sums) <= 4 + (NOW.timestamp() - closed_before) / 60 + 1  # days, minutes
    windows_after = NOW.timestamp() - 1800  # what the agent still writes
    for applied_at in (0.0, 250.0):  # on a worker whose clock is as much behind or ahead
        tables: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
        for h in (merged, unmerged):
            daily: dict[Any, Any] = {}
            windows: dict[Any, Any] = {}
            fold_into(h, daily, windows, WINDOWS.ranges, windows_after=windows_after - applied_at)
            tables.append((daily, windows))
        assert tables[0] == tables[1]
    assert len(tables[0][0]) == 4  # the minutes reach back into a fourth day
    assert tables[0][1]  # and recent windows are written

    # A resend (a failed flush, a recovery) merged an hour later and applied then: each of the
    # two copies gives every key what the unmerged sums give it, so the marks may drop either.
    later = NOW.timestamp() + 3600
    (resent,) = rng.handoffs(TOPIC, windows_closed_before=closed_before + 3600)
    assert len(resent.sums) < len(merged.sums)
    applied_later: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
    for h in (resent, merged, unmerged):
        daily, windows = {}, {}
        fold_into(h, daily, windows, WINDOWS.ranges, windows_after=later - 1800)
        applied_later.append((daily, windows))
    assert applied_later[0] == applied_later[1] == applied_later[2]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ([], "expected an object"),
        ({"tenant": "", "source": "s", "start": 0, "end": 1, "sums": []}, "tenant"),
        ({"tenant": "a", "source": "s", "start": 2, "end": 1, "sums": []}, "offset range"),
        ({"tenant": "a", "source": "s", "start": True, "end": 1, "sums": []}, "offset range"),
        ({"tenant": "a", "source": "s", "start": 0, "end": 1, "sums": [["m", 60]]}, "bad sum"),
        (
            {"tenant": "a", "source": "s", "start": 0, "end": 1, "sums": [["m", 60, "1"]]},
            "bad sum",
        ),
        ({"tenant": "a", "source": "", "start": 0, "end": 1, "sums": []}, "source"),
    ],
)
def test_a_malformed_hand_off_is_named(value: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Handoff.from_message(value)


def test_a_failed_record_puts_the_range_back_merged_with_what_came_since() -> None:
    storage = Storage()
    sink = ClickHouseSink(
        storage, topic=TOPIC, lateness_seconds=3600, max_future_skew=300, clock=lambda: NOW
    )
    ledger = HandoffLedger(TOPIC)
    ledger.recover(plan_recovery(storage, TOPIC, {0: 0}))
    recs = [
        Record(
            TOPIC, 0, i, b"acme", encode_event(usage_event("acme", "r", 1, time=NOW, id=f"x{i}"))
        )
        for i in range(4)
    ]
    batch = sink.prepare(recs[:2])
    sink.write(batch)
    ledger.add(batch)
    (taken,) = ledger.take()
    batch = sink.prepare(recs[2:])
    sink.write(batch)
    ledger.add(batch)
    ledger.untake([taken])
    (again,) = ledger.take()
    assert (again.start, again.end, sum(again.sums.values())) == (0, 4, 4.0)


def test_a_message_of_the_earlier_format_is_folded_in_without_marks() -> None:
    minute = int(NOW.timestamp()) // 60 * 60
    old = {"tenant": "acme", "meter": "requests", "billable": 1, "minute": minute, "quantity": 2.5}
    daily: dict[Any, Any] = {"acme|requests|2026-03-02": 1.0}  # a float value (earlier format)
    windows: dict[Any, Any] = {}
    assert fold_legacy_into(old, daily, windows, WINDOWS.ranges) == 1 + len(WINDOWS.ranges(minute))
    assert daily["acme|requests|2026-03-02"] == {"q": 3.5, "m": {}}
    assert all(usage(v) == 2.5 for v in windows.values())
    assert {k for k, _ in windows} == {"acme|requests"}
    assert fold_legacy_into({**old, "billable": 0}, daily, windows, WINDOWS.ranges) == 0


def test_a_message_of_the_earlier_format_counts_under_its_own_meter() -> None:
    minute = int(NOW.timestamp()) // 60 * 60
    daily: dict[Any, Any] = {}
    windows: dict[Any, Any] = {}
    for meter, q in (("requests", 14.0), ("tokens", 64.0)):
        old = {"tenant": "acme", "meter": meter, "billable": 1, "minute": minute, "quantity": q}
        fold_legacy_into(old, daily, windows, WINDOWS.ranges)
    assert {k: usage(v) for k, v in daily.items()} == {
        "acme|requests|2026-03-02": 14.0,
        "acme|tokens|2026-03-02": 64.0,
    }
    for wr in WINDOWS.ranges(float(minute)):
        assert usage(windows[("acme|requests", wr)]) == 14.0
        assert usage(windows[("acme|tokens", wr)]) == 64.0


def test_each_meter_has_its_own_daily_and_window_values() -> None:
    """The audit's case: 14 ``requests`` and 64 ``tokens`` of one tenant were one daily value of
    78 (and windows likewise), adding up quantities of different units."""
    minute = int(NOW.timestamp()) // 60 * 60
    src = source_of(TOPIC, 0)
    h = Handoff(
        "acme",
        src,
        0,
        9,
        (("requests", minute - 60, 4.0), ("requests", minute, 10.0), ("tokens", minute, 64.0)),
    )
    daily: dict[Any, Any] = {}
    windows: dict[Any, Any] = {}
    fold_into(h, daily, windows, WINDOWS.ranges)
    assert {k: usage(v) for k, v in daily.items()} == {
        daily_key("acme", "requests", NOW.date()): 14.0,
        daily_key("acme", "tokens", NOW.date()): 64.0,
    }
    assert daily_key("acme", "tokens", NOW.date()) == "acme|tokens|2026-03-02"
    assert window_key("acme", "tokens") == "acme|tokens"
    for wr in WINDOWS.ranges(float(minute)):
        both_minutes = wr[0] <= minute - 60
        assert usage(windows[("acme|requests", wr)]) == (14.0 if both_minutes else 10.0)
        assert usage(windows[("acme|tokens", wr)]) == 64.0
    assert {k for k, _ in windows} == {"acme|requests", "acme|tokens"}
    # Each key keeps its own mark: the same range again changes none of them.
    assert all(v["m"] == {src: 9} for v in [*daily.values(), *windows.values()])
    assert fold_into(h, daily, windows, WINDOWS.ranges) == 0


def test_the_first_open_day_is_the_day_before_the_lateness_reaches() -> None:
    lateness = 3600
    at = dt.datetime(2026, 3, 5, 0, 30, tzinfo=dt.UTC).timestamp()  # now - lateness: 4 March
    assert first_open_day(at, lateness) == dt.date(2026, 3, 3)
    at = dt.datetime(2026, 3, 5, 1, 0, tzinfo=dt.UTC).timestamp()  # now - lateness: 5 March
    assert first_open_day(at, lateness) == dt.date(2026, 3, 4)
    assert first_open_day(at, 3 * 86400) == dt.date(2026, 3, 1)


def test_closed_days_and_expired_windows_are_found_and_not_written_again() -> None:
    first_open = dt.date(2026, 3, 1)
    keys = [
        "acme|requests|2026-02-28",  # closed
        "acme|2026-02-27",  # the earlier key format, closed
        "acme|requests|2026-03-01",  # open
        "acme|tokens|2026-03-02",  # open
        "acme|requests|notadate!!",  # not a key of ours: left alone
        "x",
    ]
    assert closed_daily_keys(keys, first_open, limit=10) == keys[:2]
    assert closed_daily_keys(keys, first_open, limit=1) == keys[:1]  # bounded
    before = NOW.timestamp() - 1800
    old, fresh = (before - 360, before - 60.1), (before - 299.9, before + 0.1)
    wkeys = [("acme|requests", old), ("acme", old), ("acme|tokens", fresh)]
    assert expired_window_keys(wkeys, before, limit=10) == wkeys[:2]
    assert expired_window_keys(wkeys, before, limit=1) == wkeys[:1]
    assert [tenant_of(k) for k in (*keys[:3], *wkeys)] == ["acme"] * 6

    # The agent does not write what the sweep deletes: a late resend of a closed day or an
    # expired window would come back without its marks (and count again on a replay).
    minute = int(NOW.timestamp()) // 60 * 60
    h = Handoff("acme", "t:0", 0, 5, (("requests", minute, 1.0), ("requests", minute - 86400, 2.0)))
    daily: dict[Any, Any] = {}
    windows: dict[Any, Any] = {}
    fold_into(h, daily, windows, WINDOWS.ranges, days_from=NOW.date(), windows_after=minute + 60)
    assert list(daily) == [daily_key("acme", "requests", NOW.date())]
    assert windows and all(wr[1] >= minute + 60 for _, wr in windows)
    assert len(windows) < len(WINDOWS.ranges(float(minute)))


def test_a_batch_cut_short_is_read_again_and_handed_off_whole() -> None:
    """A crash in the middle of an insert (ClickHouse commits an insert's day partitions one
    after another) leaves some of the batch's rows stored past the progress. The next owner
    reads the batch again from the progress: the stored rows are recognised by their offsets,
    not inserted again, and still handed off with the range, so the tables get every row once."""
    storage = Storage()
    first = ClickHouseSink(
        storage, topic=TOPIC, lateness_seconds=3600, max_future_skew=300, clock=lambda: NOW
    )
    recs = [
        Record(
            TOPIC,
            0,
            i,
            b"acme",
            encode_event(usage_event("acme", "r", i + 1, time=NOW, id=f"c{i}")),
        )
        for i in range(6)
    ]
    ledger = HandoffLedger(TOPIC)
    ledger.recover(plan_recovery(storage, TOPIC, {0: first.on_assigned([0]).get(0, 0)}))
    batch = first.prepare(recs[:2])
    first.write(batch)
    ledger.add(batch)
    (taken,) = ledger.take()
    storage.record_handoffs(TOPIC, [(0, taken.start, taken.end)])
    cut = first.prepare(recs[2:])  # offsets 2-5; only the rows of 4 and 5 are committed
    storage.insert_events([r for r in cut.rows() if r[12] >= 4])

    second = ClickHouseSink(
        storage, topic=TOPIC, lateness_seconds=3600, max_future_skew=300, clock=lambda: NOW
    )
    resume = second.on_assigned([0])
    assert resume == {0: 2}  # the progress, not after the stored offsets 4 and 5
    ledger = HandoffLedger(TOPIC)
    ledger.recover(plan_recovery(storage, TOPIC, resume))
    again = second.prepare(recs[2:])
    assert [r.offset for r, _ in again.events] == [2, 3]
    assert [r.offset for r, _, _ in again.stored] == [4, 5]
    assert (again.duplicates, again.dead_letters) == (0, [])
    second.write(again)
    ledger.add(again)
    (taken,) = ledger.take()
    assert (taken.start, taken.end, sum(taken.sums.values())) == (2, 6, 3 + 4 + 5 + 6)
    assert sorted(r[12] for r in storage.rows) == [0, 1, 2, 3, 4, 5]  # each row once
    # Past the cut batch, nothing is taken for stored any more.
    assert second.prepare([Record(TOPIC, 0, 4, b"acme", recs[4].value)]).stored == []


class Owner:
    """A worker's sink and ledger over the shared ``storage`` (a shared ClickHouse server), as
    the worker drives them: recover on assignment (claiming the partitions when ``name`` is
    given), insert batches, flush (recording through the claim check when claimed)."""

    def __init__(self, storage: Storage, name: str | None = "w") -> None:
        self.storage = storage
        self.sink = ClickHouseSink(
            storage, topic=TOPIC, lateness_seconds=3600, max_future_skew=300, clock=lambda: NOW
        )
        resume = {0: self.sink.on_assigned([0]).get(0, 0)}
        self.ledger = HandoffLedger(TOPIC)
        self.ledger.recover(plan_recovery(storage, TOPIC, resume, name))
        self.claimed = name is not None
        self.sent: list[Handoff] = []

    def insert(self, records: list[Record]) -> None:
        batch = self.sink.prepare(records)
        self.sink.write(batch)
        self.ledger.add(batch)

    def flush(self, partitions: set[int] | None = None) -> list[Handoff]:
        """One flush; returns the messages it sent."""
        before = len(self.sent)

        async def record(ranges: list[tuple[int, int, int]]) -> set[int] | None:
            if not self.claimed:
                self.storage.record_handoffs(TOPIC, ranges)
                return None
            return record_claimed(self.storage, TOPIC, ranges, self.ledger.claims)

        async def send(handoffs: list[Handoff]) -> None:
            self.sent.extend(handoffs)

        asyncio.run(flush(self.ledger, record, send, partitions))
        return self.sent[before:]


def wrong_orders(storage: Storage, before: list[Handoff], new: list[Handoff], late: list[Handoff]):
    """Each order of ``late`` (kept in its own order, as one producer sends it) among ``new``
    after ``before`` whose tables differ from ClickHouse's rows; and how many orders there are."""
    want_daily, want_windows = expected(storage)
    wrong, orders = [], 0
    for at in itertools.combinations(range(len(new) + len(late)), len(late)):
        orders += 1
        pending_new, pending_late, log = list(new), list(late), list(before)
        for i in range(len(new) + len(late)):
            log.append((pending_late if i in at else pending_new).pop(0))
        daily: dict[Any, Any] = {}
        windows: dict[Any, Any] = {}
        for h in log:
            fold_into(Handoff.from_message(h.message()), daily, windows, WINDOWS.ranges)
        got_daily = {k: usage(v) for k, v in daily.items()}
        got_windows = {k: usage(v) for k, v in windows.items()}
        if got_daily != pytest.approx(want_daily) or got_windows != pytest.approx(want_windows):
            wrong.append(at)
    return wrong, orders


def partition_zero() -> list[Record]:
    return source_events(random.Random(7), per_partition=60)[0]


@pytest.mark.parametrize("claimed", [True, False], ids=["claimed", "unclaimed"])
def test_an_evicted_owners_late_hand_off_of_its_open_range_counts_once(claimed: bool) -> None:
    """A stalled worker loses its partition to an eviction (its session timed out) with rows
    inserted and not yet handed off. The next owner recovers them from the shared ClickHouse
    and hands them off; the evicted worker, waking, would hand the same rows off from its open
    range when its revoke callback runs. Wherever its messages land among the new owner's, the
    rows count once: by the claim (it sends nothing), and, without one, because the recovered
    range has its bounds (they counted twice when it was merged with the new owner's rows)."""
    storage, records = Storage(), partition_zero()
    name = "z" if claimed else None
    z = Owner(storage, name)
    z.insert(records[:15])
    before = z.flush()  # handed off: [0, 15)
    z.insert(records[15:25])
    z.insert(records[25:35])  # inserted, still open when the eviction comes
    b = Owner(storage, "b" if claimed else None)
    b.insert(records[35:50])
    new = b.flush()
    b.insert(records[50:])
    new += b.flush()
    late = z.flush({0})  # the evicted worker's revoke callback
    assert bool(late) is not claimed  # claimed by b meanwhile: z sends nothing
    wrong, orders = wrong_orders(storage, before, new, late)
    assert not wrong, f"{len(wrong)} of {orders} orders wrong"


def test_an_owner_evicted_inside_its_insert_sends_nothing_the_next_owner_counts() -> None:
    """Stalled between its rows' insert and its progress write: the next owner reads the old
    progress, reads the batch again and counts its stored rows in its own open range, while
    the evicted worker, waking, adds the batch to its open range, so the two ranges end at
    different offsets and the marks applied both (407 of 455 orders wrong without the claim
    check). The claim makes the evicted worker's flush record and send nothing."""
    storage, records = Storage(), partition_zero()
    z = Owner(storage, "z")
    z.insert(records[:15])
    before = z.flush()
    z.insert(records[15:35])
    new: list[Handoff] = []
    record_progress = storage.record_progress

    def stalled(topic: str, next_offsets: dict[int, int]) -> None:
        storage.record_progress = record_progress  # type: ignore[method-assign]
        b = Owner(storage, "b")  # resumes at 35; 35.. are stored past it
        b.insert(records[35:50])  # read again: recognised as stored
        new.extend(b.flush())
        b.insert(records[50:])
        new.extend(b.flush())
        record_progress(topic, next_offsets)  # z wakes

    storage.record_progress = stalled  # type: ignore[method-assign]
    z.insert(records[35:50])
    late = z.flush({0})
    wrong, orders = wrong_orders(storage, before, new, late)
    assert not wrong, f"{len(wrong)} of {orders} orders wrong"
    assert late == []


def test_an_owner_evicted_with_a_recovered_range_pending_sends_nothing() -> None:
    """The evicted worker had itself just recovered a range (kept apart from its newer rows)
    and sent neither; the next owner recovers both as one range. Unclaimed, the evicted one's
    first range could land first and both were applied."""
    storage, records = Storage(), partition_zero()
    first = Owner(storage, "a")
    first.insert(records[:15])
    before = first.flush()
    first.insert(records[15:35])  # it dies: [15, 35) never handed off
    z = Owner(storage, "z")  # recovers [15, 35) as a range of its own
    z.insert(records[35:45])  # more rows, then the stall
    b = Owner(storage, "b")  # last recorded [0, 15): recovers [15, 45)
    b.insert(records[45:])
    new = b.flush()
    late = z.flush({0})
    # A batch it was processing when it woke (its insert is the fencing case the README
    # names; not simulated): its partition is lost, so nothing of it is added.
    z.ledger.add(z.sink.prepare(records[50:55]))
    late += z.flush()
    wrong, orders = wrong_orders(storage, before, new, late)
    assert not wrong, f"{len(wrong)} of {orders} orders wrong"
    # Only the resend of the range recorded before z's claim ([0, 15), which b resends too)
    assert {(h.start, h.end) for h in late} <= {(0, 15)}


def test_a_partition_claimed_again_by_the_same_worker_is_handed_off_again() -> None:
    """Losing a partition is per claim: recovered here again (a new assignment), it is this
    worker's again."""
    storage, records = Storage(), partition_zero()
    z = Owner(storage, "z")
    z.insert(records[:20])
    b = Owner(storage, "b")
    late = z.flush({0})
    stored = z.sink.on_assigned([0])
    z.ledger.recover(plan_recovery(storage, TOPIC, {0: stored.get(0, 0)}, "z"))
    z.insert(records[20:40])
    late += b.flush()  # b's claim was superseded before it flushed: it sends nothing
    sent = z.flush()
    wrong, orders = wrong_orders(storage, [], sent, late)
    assert not wrong, f"{len(wrong)} of {orders} orders wrong"
    assert late == []

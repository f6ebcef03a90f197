"""The sink's sums handed to the Faust tables, each counted once, also across a crash.

The sink inserts rows into ClickHouse (exactly once, see :mod:`streams.sink`); the Faust tables
(``tenant_daily_usage``, ``tenant_recent_usage``) are fed by the ``aggregate`` agent from the
``accepted_usage`` topic. Handing the inserted rows' sums over is a second write, after the
insert, so a worker killed in between would lose them from the tables, and a replay of
``accepted_usage`` (Faust is at-least-once) would count them twice. The mechanism:

- **Ranges of source offsets.** The sums are kept per source partition as an open range
  ``[start, end)`` of its offsets (``end`` = the next offset after the last inserted batch).
  Every ``WORKER_AGGREGATE_INTERVAL`` s the open ranges are closed and handed off: one message
  per (tenant, range) carrying the range and the tenant's per-(meter, minute) billable sums.
  A tenant with sums too many for one Kafka message (thousands of meters, or hours of minutes
  of many meters) gets several messages for the range, cut between meters
  (:data:`HANDOFF_PART_BYTES`): every table key is of one meter, so each key still gets the
  range's quantity from exactly one message, and the marks work as for one message. One
  meter's sums too many for a message (days of minutes: a lateness of a week or more) have
  the minutes that no open window holds any more merged per UTC day
  (:func:`merge_closed_minutes`): the day's value is the same, and those windows are not
  written any more.
- **Intent before sending.** A flush records its ranges in ClickHouse's ``aggregate_handoffs``
  (one row per partition) *before* sending, sends, and waits for Kafka's acknowledgements. The
  next flush starts only after that, and a failed flush is retried as a whole before any newer
  range of its partitions: so only a partition's last recorded range can have been sent in part.
- **Keys.** Quantities of different meters are never added up: ``tenant_daily_usage`` is keyed
  ``"<tenant>|<meter>|<YYYY-MM-DD>"`` (:func:`daily_key`, UTC day of the event) and
  ``tenant_recent_usage`` ``("<tenant>|<meter>", window range)`` (:func:`window_key`).
- **Marks in the table values.** Each table value is ``{"q": quantity, "m": {source: end}}``:
  the quantity and, per source partition, the ``end`` of the last range applied to it, written
  together in one changelog record. The agent applies a message to a key only when the key's
  mark for that source is below the message's ``end``; a replayed or resent message is dropped
  key by key. Faust flushes the changelog before it commits the agent's offsets.
- **Recovery on assignment** (a restart, a rebalance, a failed batch): the new owner of a
  partition reads its last recorded range, resends it with sums recomputed from
  ``usage_events`` (rows carry their source offsets; the same rows give the same sums), and
  hands off ``[that end, resume offset)``, the rows inserted there which no flush has covered,
  as a range of its own before the rows it inserts itself. On a revoke the current owner
  flushes the partition's range first.
- **Claims: a previous owner still running.** A worker evicted from the sink's group (stalled
  past its session timeout) does not know it until it wakes, and its open ranges then need not
  match what the new owner recovered (a batch it was writing when it stalled is read again by
  the new owner; a range it had recovered itself is kept apart from its newer rows); applied,
  both owners' copies counted. So each recovery first claims its partitions in ClickHouse's
  ``aggregate_claims`` (the next claim number, and the worker's name), and a flush records a
  partition's ranges only while its claim is still the latest (:func:`record_claimed`); a
  superseded worker drops them (:meth:`HandoffLedger.lose`) and the new owner, which recovered
  those rows, hands them off. The check and the record are two ClickHouse calls: a claim made
  between them is not seen (a stall of those few milliseconds).

Messages of the earlier format (one per tenant, meter and minute, no range) are still folded in,
without marks, under the same per-meter keys.

**Bounded tables.** A day no event can reach any more (:func:`first_open_day`: older than the
lateness, with a day's margin) and a window past its expiry are neither written
(:func:`fold_into`'s ``days_from`` / ``windows_after``) nor kept: the worker's sweep deletes
them with a changelog tombstone (:func:`closed_daily_keys`, :func:`expired_window_keys`), also
those recovered from the changelog after a restart.

Tests: ``tests/unit/test_streams_handoff.py`` and the worker's tests (SIGKILL, the sweep) in
``tests/integration/test_streams_worker.py``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

from streams.sink import PreparedBatch

#: (tenant, meter, minute start in epoch seconds) -> billable quantity
Sums = dict[tuple[str, str, int], float]

#: A tenant's sums of one range go out in messages of at most about this many bytes of JSON, cut
#: between meters: Kafka refuses a message over the producer's ``max_request_size`` (Faust's
#: default 1,000,000), and a refused hand-off is retried before anything newer, so one tenant's
#: oversized message would stop the tables of every tenant. One meter's sums are never cut
#: (they are at most a minute each of the lateness: ~8,000 minutes fit in a message).
HANDOFF_PART_BYTES = 256 * 1024
#: a bound on the JSON of one sum ``["<meter>", minute, quantity]`` beyond its meter's length
_SUM_JSON_OVERHEAD = 48
#: how far the clock of the worker that applies a hand-off may be behind the sender's
CLOCK_MARGIN_SECONDS = 300.0


def source_of(topic: str, partition: int) -> str:
    """The mark key of a source partition in the table values."""
    return f"{topic}:{partition:d}"


@dataclass(frozen=True)
class Handoff:
    """One tenant's billable sums over the source offsets ``[start, end)`` of one partition."""

    tenant: str
    source: str
    start: int
    end: int
    sums: tuple[tuple[str, int, float], ...]  # (meter, minute start, quantity), sorted

    def message(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "source": self.source,
            "start": self.start,
            "end": self.end,
            "sums": [list(s) for s in self.sums],
        }

    @classmethod
    def from_message(cls, value: Any) -> Handoff:
        """Parse an ``accepted_usage`` value of this format; ValueError names what is wrong."""
        if not isinstance(value, Mapping):
            raise ValueError(f"hand-off: expected an object, got {type(value).__name__}")
        tenant, source, start, end = (value.get(k) for k in ("tenant", "source", "start", "end"))
        if not isinstance(tenant, str) or not tenant:
            raise ValueError("hand-off: tenant must be a non-empty string")
        if not isinstance(source, str) or not source:
            raise ValueError("hand-off: source must be a non-empty string")
        if not (_is_int(start) and _is_int(end) and 0 <= start <= end):
            raise ValueError(f"hand-off: bad offset range [{start!r}, {end!r})")
        raw = value.get("sums")
        if not isinstance(raw, list):
            raise ValueError("hand-off: sums must be a list")
        sums = []
        for item in raw:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and _is_int(item[1])
                and isinstance(item[2], int | float)
                and not isinstance(item[2], bool)
                and math.isfinite(item[2])
            ):
                raise ValueError(f"hand-off: bad sum {item!r}")
            sums.append((item[0], int(item[1]), float(item[2])))
        return cls(tenant, source, start, end, tuple(sums))

    def by_day(self) -> dict[tuple[str, dt.date], float]:
        """Sums per (meter, UTC day): a meter's quantities are never added to another's."""
        out: dict[tuple[str, dt.date], float] = {}
        for meter, minute, q in self.sums:
            k = (meter, dt.datetime.fromtimestamp(minute, dt.UTC).date())
            out[k] = out.get(k, 0.0) + q
        return out

    def by_window(self, ranges: Any) -> dict[tuple[str, Any], float]:
        """Sums per (meter, window of ``ranges(timestamp)``) (a Faust window's ``ranges``)."""
        out: dict[tuple[str, Any], float] = {}
        for meter, minute, q in self.sums:
            for wr in ranges(float(minute)):
                k = (meter, wr)
                out[k] = out.get(k, 0.0) + q
        return out


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def is_handoff_message(value: Any) -> bool:
    """A message of this format (the earlier per-minute format has no ``end``)."""
    return isinstance(value, Mapping) and "end" in value


# --- the table values ---------------------------------------------------------------------------
def daily_key(tenant: str, meter: str, day: dt.date) -> str:
    """The key of ``tenant_daily_usage``: ``"<tenant>|<meter>|<YYYY-MM-DD>"`` (UTC day). Tenant
    ids and meter names never hold ``|`` (:mod:`metering.ids`); the day is the last 10
    characters (the sweep reads it there, see :func:`closed_daily_keys`)."""
    return f"{tenant}|{meter}|{day.isoformat()}"


def window_key(tenant: str, meter: str) -> str:
    """The value key of ``tenant_recent_usage`` (Faust's table key is ``(it, window range)``):
    ``"<tenant>|<meter>"``."""
    return f"{tenant}|{meter}"


def tenant_of(key: Any) -> str:
    """The tenant of a key of either table (also of the earlier ``"<tenant>|<day>"`` and
    ``(tenant, window range)`` keys): the agent writes a key while it processes a hand-off of
    that tenant, so the key lives in the tenant's partition."""
    text = key[0] if isinstance(key, tuple) else key
    return str(text).partition("|")[0]


def first_open_day(now: float, lateness_seconds: float) -> dt.date:
    """The first UTC day whose daily values can still change at ``now`` (epoch seconds).

    The sink dead-letters events older than ``lateness_seconds``, so a day that ended before
    ``now - lateness_seconds`` gets no more of them; one more day of margin covers a hand-off
    sent well after its rows were inserted. Earlier days are closed: not written, and swept."""
    return dt.datetime.fromtimestamp(now - lateness_seconds, dt.UTC).date() - dt.timedelta(days=1)


def closed_daily_keys(keys: Iterable[Any], first_open: dt.date, limit: int) -> list[Any]:
    """Up to ``limit`` keys of ``tenant_daily_usage`` whose day (the key's last 10 characters,
    also in the earlier ``"<tenant>|<day>"`` keys) is before ``first_open``.

    Runs on the event loop over every key: one slice per key (ISO dates compare as strings);
    only a key found old is checked to end in a real date."""
    before = first_open.isoformat()
    found: list[Any] = []
    for key in keys:
        if isinstance(key, str) and key[-11:-10] == "|" and key[-10:] < before:
            try:
                dt.date.fromisoformat(key[-10:])
            except ValueError:
                continue  # not a key of ours: left alone
            found.append(key)
            if len(found) >= limit:
                break
    return found


def expired_window_keys(keys: Iterable[Any], before: float, limit: int) -> list[Any]:
    """Up to ``limit`` keys of the windowed table (Faust's ``(key, (start, end))``) whose window
    ended before ``before`` (epoch seconds). No allocation per key."""
    found: list[Any] = []
    for key in keys:
        if isinstance(key, tuple) and len(key) == 2 and key[1][1] < before:
            found.append(key)
            if len(found) >= limit:
                break
    return found


def usage(value: Any) -> float:
    """The quantity of a table value (``{"q": ..., "m": ...}``, or a float of the old format)."""
    if value is None:
        return 0.0
    if isinstance(value, Mapping):
        return float(value.get("q", 0.0))
    return float(value)


def fold(old: Any, source: str, end: int, quantity: float) -> dict[str, Any] | None:
    """The new table value after adding ``quantity`` from ``source`` up to offset ``end``, or
    None when the value already holds it (its mark for ``source`` is at or past ``end``)."""
    if isinstance(old, Mapping):
        q, marks = float(old.get("q", 0.0)), dict(old.get("m") or {})
    else:
        q, marks = usage(old), {}
    if marks.get(source, -1) >= end:
        return None
    marks[source] = end
    return {"q": q + quantity, "m": marks}


def superseded(value: Any, current: Any) -> bool:
    """Whether table value ``value`` is older than ``current``: both carry marks, none of
    ``value``'s is past ``current``'s, and one is behind. Every write of a key moves one of its
    marks forward (:func:`fold`), so a changelog record with such a value was written before
    ``current``'s and landed after it: a worker evicted from the agent's group (stalled past its
    session timeout) flushes the table writes it had buffered when it wakes, after the new
    owner's. Recovery keeps ``current`` (:class:`streams.stores.MarkedMemoryStore`)."""
    if not (isinstance(value, Mapping) and isinstance(current, Mapping)):
        return False
    marks, held = value.get("m"), current.get("m")
    if not (isinstance(marks, Mapping) and isinstance(held, Mapping)) or marks == held:
        return False
    return all(
        isinstance(end, int) and isinstance(held.get(source), int) and end <= held[source]
        for source, end in marks.items()
    )


def add_legacy(old: Any, quantity: float) -> dict[str, Any]:
    """Add an old-format message's quantity (no range, so no mark)."""
    marks = dict(old.get("m") or {}) if isinstance(old, Mapping) else {}
    return {"q": usage(old) + quantity, "m": marks}


# --- the sink side ------------------------------------------------------------------------------
@dataclass
class PartitionRange:
    """A closed range of one source partition and the billable sums of its inserted rows.

    ``fixed``: its bounds are kept as they are (never merged with other rows): a recovered
    range, which the partition's previous owner may still hand off itself with the same
    bounds and sums (see :meth:`HandoffLedger.recover`)."""

    partition: int
    start: int
    end: int
    sums: Sums = field(default_factory=dict)
    fixed: bool = False

    def handoffs(
        self,
        topic: str,
        part_bytes: int = HANDOFF_PART_BYTES,
        windows_closed_before: float | None = None,
    ) -> list[Handoff]:
        """One message per tenant, or several for a tenant whose sums take more than
        ``part_bytes`` of JSON (cut between meters, see :data:`HANDOFF_PART_BYTES`); a meter
        whose sums alone take more has its minutes before ``windows_closed_before`` merged per
        day (:func:`merge_closed_minutes`)."""
        per_tenant: dict[str, list[tuple[str, int, float]]] = {}
        for (tenant, meter, minute), q in sorted(self.sums.items()):
            per_tenant.setdefault(tenant, []).append((meter, minute, q))
        source = source_of(topic, self.partition)
        return [
            Handoff(tenant, source, self.start, self.end, part)
            for tenant, items in per_tenant.items()
            for part in _cut_between_meters(items, part_bytes, windows_closed_before)
        ]


#: a meter name is at most 64 characters (``metering.ids``)
_MAX_SUM_JSON = 64 + _SUM_JSON_OVERHEAD


def _cut_between_meters(
    items: list[tuple[str, int, float]],
    part_bytes: int,
    windows_closed_before: float | None = None,
) -> Iterator[tuple[tuple[str, int, float], ...]]:
    """``items`` (sorted by meter, then minute) in parts of at most ``part_bytes`` of JSON,
    each meter's sums whole in one part; a meter with more than that alone has its closed
    minutes merged per day (when ``windows_closed_before`` is given) and is a part of its own."""
    if len(items) * _MAX_SUM_JSON <= part_bytes:  # nearly always: one message
        yield tuple(items)
        return
    part: list[tuple[str, int, float]] = []
    size = 0
    for meter, group in itertools.groupby(items, key=lambda item: item[0]):
        sums = list(group)
        grown = len(sums) * (len(meter) + _SUM_JSON_OVERHEAD)
        if grown > part_bytes and windows_closed_before is not None:
            sums = merge_closed_minutes(sums, windows_closed_before)
            grown = len(sums) * (len(meter) + _SUM_JSON_OVERHEAD)
        if part and size + grown > part_bytes:
            yield tuple(part)
            part, size = [], 0
        part.extend(sums)
        size += grown
    if part:
        yield tuple(part)


def merge_closed_minutes(
    sums: list[tuple[str, int, float]], before: float
) -> list[tuple[str, int, float]]:
    """One meter's sums (sorted by minute) with the minutes before ``before`` merged per UTC
    day into that day's first such minute.

    ``before`` is a time by which every window holding those minutes has expired on the
    worker that applies the hand-off (the sender's now, less the windows' size and expiry
    and :data:`CLOCK_MARGIN_SECONDS`): the agent writes no window that ended that long ago
    (:func:`fold_into`'s ``windows_after``), so those minutes only count toward their day,
    whose value is the same sum, added in the same order. A resend merged at another time
    gives every key it writes the same quantity."""
    merged: dict[int, int] = {}  # UTC day number -> its index in ``out``
    out: list[tuple[str, int, float]] = []
    for meter, minute, q in sums:
        if minute >= before:
            out.append((meter, minute, q))
            continue
        day = minute // 86400
        at = merged.get(day)
        if at is None:
            merged[day] = len(out)
            out.append((meter, minute, q))
        else:
            m, first, total = out[at]
            out[at] = (m, first, total + q)
    return out


class HandoffStorage(Protocol):
    def record_handoffs(self, topic: str, ranges: Iterable[tuple[int, int, int]]) -> None: ...
    def claims(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, str]]: ...
    def claim_partitions(
        self, topic: str, partitions: Iterable[int], owner: str
    ) -> dict[int, tuple[int, str]]: ...
    def last_handoffs(
        self, topic: str, partitions: Iterable[int]
    ) -> dict[int, tuple[int, int]]: ...
    def billable_sums(
        self, topic: str, partition: int, start: int, end: int
    ) -> Iterable[tuple[str, str, int, float]]: ...


@dataclass
class Recovery:
    """What a newly assigned partition's hand-off starts from (see :func:`plan_recovery`)."""

    partition: int
    resend: PartitionRange | None  # the last recorded range, maybe sent in part
    open: PartitionRange  # inserted rows no flush has covered, and where the next range starts
    claim: tuple[int, str] | None = None  # (claim number, owner), when the partition was claimed


def _sums(rows: Iterable[tuple[str, str, int, float]]) -> Sums:
    out: Sums = {}
    for tenant, meter, minute, q in rows:
        k = (tenant, meter, int(minute))
        out[k] = out.get(k, 0.0) + float(q)
    return out


def plan_recovery(
    storage: HandoffStorage, topic: str, resume: Mapping[int, int], owner: str | None = None
) -> list[Recovery]:
    """For each assigned partition (``resume``: partition -> the sink's resume offset), read its
    last recorded range and the rows after it from ClickHouse. Blocking: run in the ClickHouse
    thread, under the hand-off lock (no flush may record a range meanwhile).

    With an ``owner``, the partitions are claimed for it first (:func:`record_claimed`): from
    then on, a previous owner still running (evicted from the group, not yet aware of it)
    records no more ranges of them, so the last recorded range read next is final."""
    claimed = storage.claim_partitions(topic, resume, owner) if owner is not None else {}
    last = storage.last_handoffs(topic, resume)
    plans = []
    for p, resume_at in sorted(resume.items()):
        claim = claimed.get(p)
        if p not in last:
            # Nothing handed off from this partition yet: every row inserted from it is open.
            # (Migration 004 recorded where the earlier hand-off, without ranges, had got to.)
            rows = storage.billable_sums(topic, p, 0, resume_at) if resume_at > 0 else []
            plans.append(Recovery(p, None, PartitionRange(p, 0, resume_at, _sums(rows)), claim))
            continue
        start, end = last[p]
        resend = PartitionRange(p, start, end, _sums(storage.billable_sums(topic, p, start, end)))
        if resume_at > end:
            rows = storage.billable_sums(topic, p, end, resume_at)
            opened = PartitionRange(p, end, resume_at, _sums(rows))
        else:
            opened = PartitionRange(p, end, end)
        plans.append(Recovery(p, resend, opened, claim))
    return plans


def record_claimed(
    storage: HandoffStorage,
    topic: str,
    ranges: Iterable[tuple[int, int, int]],
    claims: Mapping[int, tuple[int, str]],
) -> set[int]:
    """Record the (partition, start, end) ranges whose partition is still claimed as in
    ``claims`` (the claims this worker made when it recovered them); return the partitions
    claimed since by another owner, whose ranges are not recorded. Blocking.

    A worker evicted from the sink's group (a process stalled past its session timeout) does
    not know it until it wakes, and its open ranges then have other bounds than those the new
    owner recovered: its batch in flight was read again by the new owner, or it held a
    recovered range apart from its newer rows. Sent, both owners' ranges were applied. The
    check and the insert are two ClickHouse calls: a claim landing between them is not seen."""
    ranges = list(ranges)
    parts = {p for p, _, _ in ranges}
    current = storage.claims(topic, parts) if parts else {}
    lost = {p for p in parts if p in claims and current.get(p, claims[p]) != claims[p]}
    kept = [r for r in ranges if r[0] not in lost]
    if kept:
        storage.record_handoffs(topic, kept)
    return lost


class HandoffLedger:
    """The open ranges of the assigned partitions and the ranges recorded but not yet sent.

    Used on the event loop only (the ClickHouse reads and writes are the caller's, in its
    thread); the caller serialises :meth:`take`, :meth:`recover` and the sending (one lock).
    """

    def __init__(
        self, topic: str, windows_closed_before: Callable[[], float] | None = None
    ) -> None:
        self.topic = topic
        #: the time before which a minute is in no open window any more, now (see
        #: :func:`merge_closed_minutes`); None: never merged
        self.windows_closed_before = windows_closed_before
        self._open: dict[int, PartitionRange] = {}
        #: a partition's recovered range, closed and not yet recorded: taken before its open one
        self._closed: dict[int, PartitionRange] = {}
        #: recorded in ``aggregate_handoffs`` and not yet acknowledged: resent before any newer
        self.unsent: list[PartitionRange] = []
        #: the claim each partition was recovered under (:func:`record_claimed`)
        self.claims: dict[int, tuple[int, str]] = {}
        #: claimed by another owner since: nothing more of them is handed off from here
        self._lost: set[int] = set()

    def recover(self, plans: Iterable[Recovery]) -> None:
        """Take a newly assigned partition's :class:`Recovery`. The rows after its last recorded
        range are handed off as a range of their own, with exactly the bounds the previous
        owner's open range had if that owner lost the partition to an eviction (a stalled
        process whose session timed out) instead of a revoke: when it wakes, its revoke
        callback hands off those same rows with the same bounds, and whichever copy comes
        second is dropped by the marks. Merged with this owner's new rows into one longer
        range, the two copies differed and both were applied."""
        for plan in plans:
            p = plan.partition
            self._lost.discard(p)
            if plan.claim is not None:
                self.claims[p] = plan.claim
            else:
                self.claims.pop(p, None)
            # The partition's unsent ranges end at or before its last recorded one: resending
            # that one (recomputed) covers them.
            self.unsent = [r for r in self.unsent if r.partition != p]
            if plan.resend is not None and plan.resend.sums:
                self.unsent.append(plan.resend)
            if plan.open.sums:
                rng = plan.open
                self._closed[p] = PartitionRange(p, rng.start, rng.end, rng.sums, fixed=True)
                self._open[p] = PartitionRange(p, rng.end, rng.end)
            else:
                self._closed.pop(p, None)
                self._open[p] = plan.open

    def add(self, batch: PreparedBatch) -> None:
        """Add an inserted batch's billable sums (rejected decisions are never billed) to the
        open ranges and move their ends past the batch. The rows a cut batch had stored at
        these offsets (``batch.stored``, read again after a crash) count too: a range's sums
        are those of every row stored at its offsets, as :func:`plan_recovery` reads them."""
        lost = self._lost
        for p, nxt in batch.next_offsets.items():
            if p in lost:
                continue  # its new owner hands these rows off (it reads them from ClickHouse)
            rng = self._open[p]  # opened by recover(): the consumer positions before it processes
            rng.end = max(rng.end, nxt)
        inserted = ((rec, ev, ms) for (rec, ev), ms in zip(batch.events, batch.millis, strict=True))
        current, sums = -1, None
        for rec, ev, ms in itertools.chain(inserted, batch.stored):
            d = ev.data
            if d.decision == "rejected" or (lost and rec.partition in lost):
                continue
            if rec.partition != current:
                current = rec.partition
                sums = self._open[current].sums
            assert sums is not None
            k = (ev.subject, d.meter, ms // 60_000 * 60)
            sums[k] = sums.get(k, 0.0) + d.quantity

    def take(self, partitions: Iterable[int] | None = None) -> list[PartitionRange]:
        """One range per partition (of ``partitions``, default all): its closed (recovered)
        range if it has one, else its open range if that holds sums; an open range taken
        starts again at its end. One per partition, so that a flush records at most one range
        of each partition and only a partition's last recorded range can be unsent (what
        :func:`plan_recovery` resends). A range without sums is skipped: the rows in it bill
        nothing, so no flush needs to cover it."""
        parts = self._open.keys() if partitions is None else set(partitions) & self._open.keys()
        taken = []
        for p in sorted(parts):
            if (closed := self._closed.pop(p, None)) is not None:
                taken.append(closed)  # the open range waits for the next take
                continue
            rng = self._open[p]
            if rng.end > rng.start and rng.sums:
                taken.append(rng)
            self._open[p] = PartitionRange(p, rng.end, rng.end)
        return taken

    def untake(self, ranges: Iterable[PartitionRange]) -> None:
        """Put ranges taken by :meth:`take` back (recording them failed): a ``fixed`` range as
        it was, before its partition's open range; any other merged with what was added to its
        partition since."""
        for rng in ranges:
            cur = self._open.get(rng.partition)
            if cur is None:
                continue  # revoked meanwhile: the next owner recomputes it
            if rng.fixed:
                self._closed[rng.partition] = rng
                continue
            merged = dict(rng.sums)
            for k, q in cur.sums.items():
                merged[k] = merged.get(k, 0.0) + q
            self._open[rng.partition] = PartitionRange(
                rng.partition, rng.start, max(cur.end, rng.end), merged
            )

    def close(self, partitions: Iterable[int]) -> None:
        """Forget revoked partitions (after their ranges were flushed)."""
        for p in partitions:
            self._open.pop(p, None)
            self._closed.pop(p, None)
            self.claims.pop(p, None)
            self._lost.discard(p)

    def lose(self, partitions: Iterable[int]) -> None:
        """Partitions another owner claimed since this one recovered them: drop their ranges
        (the new owner recovered those rows from ClickHouse, and resends the last recorded
        range) and hand nothing more of them off until they are recovered here again."""
        lost = set(partitions)
        for p in lost:
            self._open.pop(p, None)
            self._closed.pop(p, None)
        self.unsent = [r for r in self.unsent if r.partition not in lost]
        self._lost |= lost


def messages(
    topic: str, ranges: Iterable[PartitionRange], windows_closed_before: float | None = None
) -> Iterator[Handoff]:
    for rng in ranges:
        yield from rng.handoffs(topic, windows_closed_before=windows_closed_before)


#: records (partition, start, end) ranges; returns the partitions it refused (claimed by
#: another owner, see :func:`record_claimed`), or None when it recorded them all
RecordRanges = Callable[[list[tuple[int, int, int]]], Awaitable[Collection[int] | None]]
SendHandoffs = Callable[[list[Handoff]], Awaitable[None]]


async def _send_unsent(ledger: HandoffLedger, send: SendHandoffs) -> int:
    """Send the ranges recorded but not yet acknowledged; forget them once acknowledged."""
    pending = list(ledger.unsent)
    if not pending:
        return 0
    closed = ledger.windows_closed_before
    handoffs = list(messages(ledger.topic, pending, closed() if closed is not None else None))
    await send(handoffs)
    done = {id(r) for r in pending}
    ledger.unsent = [r for r in ledger.unsent if id(r) not in done]
    return len(handoffs)


async def flush(
    ledger: HandoffLedger,
    record: RecordRanges,
    send: SendHandoffs,
    partitions: Iterable[int] | None = None,
) -> int:
    """One hand-off: resend the recorded but unacknowledged ranges, then close the open ranges
    (of ``partitions``, default all), ``record`` them (partition, start, end) and ``send`` their
    messages; ``send`` returns once Kafka acknowledged them all. Returns the messages sent.

    A partition with a recovered range (:meth:`HandoffLedger.recover`) takes two rounds: the
    recovered range, recorded and acknowledged, then its open range; each round records at
    most one range per partition.

    On failure the ranges stay queued (recorded ones in ``ledger.unsent``, unrecorded ones back
    in the open ranges) for the next flush, and nothing newer of a partition is recorded or
    sent while an older range of it is unsent. Callers serialise flushes and recoveries."""
    sent = await _send_unsent(ledger, send)  # all of them first: the marks compare ends
    while taken := ledger.take(partitions):
        try:
            lost = await record([(r.partition, r.start, r.end) for r in taken])
        except BaseException:
            ledger.untake(taken)
            raise
        if lost:
            ledger.lose(lost)
            taken = [r for r in taken if r.partition not in lost]
        ledger.unsent.extend(taken)  # recorded: from here on only ever resent whole
        sent += await _send_unsent(ledger, send)
        if not any(r.fixed for r in taken):
            break  # a recovered range was taken alone: its partition's open range comes next
    return sent


def fold_into(
    handoff: Handoff,
    daily: MutableMapping[Any, Any],
    windows: MutableMapping[Any, Any],
    window_ranges: Callable[[float], Iterable[Any]],
    apply: Callable[[Any, float], Any] | None = None,
    *,
    days_from: dt.date | None = None,
    windows_after: float | None = None,
) -> int:
    """Apply one hand-off to the per-day values (keys ``"<tenant>|<meter>|<YYYY-MM-DD>"``) and
    the window values (keys ``("<tenant>|<meter>", window range)``), each meter on its own; a
    key whose mark for the source is already at or past the hand-off's end keeps its value (a
    replay or a resend). Returns the number of keys changed. The ``aggregate`` agent calls it
    with the Faust tables.

    ``apply(old value, quantity)`` gives a key's new value, or None to keep it (default:
    :func:`fold` with the hand-off's source and end). Days before ``days_from`` (closed, see
    :func:`first_open_day`) and windows ending before ``windows_after`` (expired) are not
    written: the sweep deletes them, and a write would bring them back without their marks."""
    if apply is None:

        def apply(old: Any, q: float) -> Any:
            return fold(old, handoff.source, handoff.end, q)

    changed = 0
    for (meter, day), q in handoff.by_day().items():
        if days_from is not None and day < days_from:
            continue
        key = daily_key(handoff.tenant, meter, day)
        if (new := apply(daily.get(key), q)) is not None:
            daily[key] = new
            changed += 1
    for (meter, wr), q in handoff.by_window(window_ranges).items():
        if windows_after is not None and wr[1] < windows_after:
            continue
        wkey = (window_key(handoff.tenant, meter), wr)
        if (new := apply(windows.get(wkey), q)) is not None:
            windows[wkey] = new
            changed += 1
    return changed


def fold_legacy_into(
    value: Mapping[str, Any],
    daily: MutableMapping[Any, Any],
    windows: MutableMapping[Any, Any],
    window_ranges: Callable[[float], Iterable[Any]],
    *,
    days_from: dt.date | None = None,
    windows_after: float | None = None,
) -> int:
    """:func:`fold_into` for a message of the earlier format (one tenant, meter and minute, no
    range, so no mark: :func:`add_legacy`), under its meter's keys; non-billable ones were
    never counted."""
    if not value.get("billable"):
        return 0
    sums = ((str(value["meter"]), int(value["minute"]), float(value["quantity"])),)
    legacy = Handoff(str(value["tenant"]), "", 0, 0, sums)
    return fold_into(
        legacy,
        daily,
        windows,
        window_ranges,
        apply=add_legacy,
        days_from=days_from,
        windows_after=windows_after,
    )


__all__ = [
    "Handoff",
    "HandoffLedger",
    "HandoffStorage",
    "PartitionRange",
    "Recovery",
    "add_legacy",
    "closed_daily_keys",
    "daily_key",
    "expired_window_keys",
    "first_open_day",
    "flush",
    "fold",
    "fold_into",
    "fold_legacy_into",
    "is_handoff_message",
    "messages",
    "plan_recovery",
    "record_claimed",
    "source_of",
    "superseded",
    "tenant_of",
    "usage",
    "window_key",
]

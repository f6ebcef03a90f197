"""The recent-id set: which event ids were already inserted, over the accepted lateness.

An id is looked up by (tenant, id) alone, whatever time the resend carries: a client that
rebuilds an event on retry (a new ``time``, the same ``id``) is still a resend. Each id is held
for the accepted lateness from when it was inserted (the sink's clock), in buckets of
``bucket_seconds`` (a minute by default); a resend found in the set renews the hold. So a
resend is dropped when it arrives within the lateness of its original's arrival, whatever time
either carries (an event stamped close to the lateness and resent a few minutes later included).
Older resends are dead-lettered as late when their time is old, and counted again only when
they carry a fresh time more than the lateness (3 h by default) after the original arrived:
no bounded set can remember every id for ever. Memory is bounded by the ids of
``lateness + bucket_seconds`` worth of events.

After a restart, or when a partition is assigned, the set is rebuilt from ClickHouse
(``usage_events``, the exact record of what was inserted), which stores event times, not
arrival times. An event arrives at most the lateness after its time (later ones are dead
letters), so every id inserted within the lateness has a time within twice the lateness: those
rows are read, and each is held as if it arrived at its time plus the lateness, or now if that
is sooner. Until those holds run out the set may hold up to twice its usual ids.
Tests: ``tests/unit/test_streams_sink.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MINUTE = dt.timedelta(minutes=1)


class _Bucket(list[str]):
    """The keys added to one bucket (for eviction), and its number."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number


class RecentIds:
    """Event ids inserted recently, keyed by (tenant, id); each is held for the lateness from
    when it was inserted (or last resent)."""

    def __init__(self, lateness_seconds: float, bucket_seconds: int = 60) -> None:
        if lateness_seconds <= 0 or bucket_seconds <= 0:
            raise ValueError("lateness_seconds and bucket_seconds must be positive")
        if bucket_seconds % 60:
            raise ValueError("bucket_seconds must be a whole number of minutes")
        self.lateness = dt.timedelta(seconds=lateness_seconds)
        self.bucket_seconds = bucket_seconds
        self.minutes_per_bucket = bucket_seconds // 60
        #: key -> the bucket that holds it (the one evicted last, if added to several): one
        #: shared object per bucket, not an int per id
        self._where: dict[str, _Bucket] = {}
        self._buckets: dict[int, _Bucket] = {}

    @staticmethod
    def minute(time: dt.datetime) -> int:
        """Whole minutes since the epoch of an event time (aware), floored: the unit buckets
        are made of (the sink derives it from each event's millisecond ticks, computed once)."""
        return (time - _EPOCH) // _MINUTE

    def bucket_of_minute(self, minute: int) -> int:
        """:meth:`bucket` for a :meth:`minute` computed by the caller."""
        return minute // self.minutes_per_bucket

    def bucket(self, time: dt.datetime) -> int:
        """The bucket of an event time (aware): whole bucket spans since the epoch, floored."""
        return self.bucket_of_minute(self.minute(time))

    @staticmethod
    def key(tenant: str, event_id: str) -> str:
        """One string per (tenant, id): tenant ids and event ids are printable ASCII, so NUL
        cannot occur inside either."""
        return f"{tenant}\x00{event_id}"

    def contains(self, tenant: str, event_id: str, time: dt.datetime | None = None) -> bool:
        """Whether (tenant, id) was inserted within the lateness. ``time`` is not needed (an
        id is found whatever time a resend carries); it is accepted for older callers."""
        return self.key(tenant, event_id) in self._where

    def seen(self, key: str) -> bool:
        """:meth:`contains` for a :meth:`key` computed by the caller."""
        return key in self._where

    def add(self, tenant: str, event_id: str, time: dt.datetime) -> None:
        """Hold (tenant, id) for the lateness from ``time``, when it was inserted."""
        self.add_keys(((self.bucket(time), self.key(tenant, event_id)),))

    def add_keys(self, entries: Iterable[tuple[int, str]]) -> None:
        """:meth:`add` for (:meth:`bucket`, :meth:`key`) pairs computed by the caller. A key
        already held stays until the later of its buckets is evicted."""
        where, buckets = self._where, self._buckets
        for bucket, key in entries:
            held = where.get(key)
            if held is not None and held.number >= bucket:
                continue
            keys = buckets.get(bucket)
            if keys is None:
                keys = buckets[bucket] = _Bucket(bucket)
            where[key] = keys
            keys.append(key)

    def add_many(self, entries: Iterable[tuple[str, str, dt.datetime]]) -> int:
        n = 0
        for tenant, event_id, time in entries:
            self.add(tenant, event_id, time)
            n += 1
        return n

    def rebuild_since(self, now: dt.datetime) -> dt.datetime:
        """The earliest event time a row must have to be read back on a rebuild."""
        return now - 2 * self.lateness

    def add_rebuilt(self, entries: Iterable[tuple[str, str, dt.datetime]], now: dt.datetime) -> int:
        """Hold ids read back from storage (tenant, id, event time): each as if inserted at its
        time plus the lateness, or ``now`` if that is sooner (see the module docstring)."""
        n = 0
        lateness = self.lateness
        for tenant, event_id, time in entries:
            self.add(tenant, event_id, min(time + lateness, now))
            n += 1
        return n

    def cutoff(self, now: dt.datetime) -> dt.datetime:
        """Events with a time before this are too late to count (they go to the dead letters)."""
        return now - self.lateness

    def is_late(self, time: dt.datetime, now: dt.datetime) -> bool:
        return time < self.cutoff(now)

    def evict(self, now: dt.datetime) -> int:
        """Drop the buckets of insert times older than the lateness, and the ids they hold
        (not those a later bucket holds too); return how many ids went."""
        oldest_kept = self.bucket(self.cutoff(now))
        where = self._where
        dropped = 0
        for bucket in [b for b in self._buckets if b < oldest_kept]:
            keys = self._buckets.pop(bucket)
            for key in keys:
                if where.get(key) is keys:
                    del where[key]
                    dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._where)


__all__ = ["RecentIds"]

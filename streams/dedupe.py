"""The recent-id set: which event ids were already inserted, over the accepted lateness.

An id is looked up by (tenant, id) alone, whatever time the resend carries: a client that
rebuilds an event on retry (a new ``time``, the same ``id``) is still a resend. Each id is held
until the time of the event first inserted with it leaves the accepted lateness: its bucket
(``bucket_seconds`` of that event time, a minute by default) is then dropped, and the id with it.
An event older than ``now - lateness`` is dead-lettered before it is looked up. Memory is
bounded by the ids of ``lateness + bucket_seconds`` worth of events. After a restart, or when a
partition is assigned, the set is rebuilt from ClickHouse (``usage_events``), the exact record
of what was inserted.

The bound, stated: a resend whose original's time has already left the lateness window, but
which itself carries a time inside it, is not recognised (no bounded set can remember every id
for ever). With the default lateness (3 h) that is a retry hours after the first attempt.
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
    """Event ids inserted recently, keyed by (tenant, id); each is held until the time of its
    first event leaves the lateness (its bucket of event time is evicted)."""

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

    def cutoff(self, now: dt.datetime) -> dt.datetime:
        """Events with a time before this are too late to count (they go to the dead letters)."""
        return now - self.lateness

    def is_late(self, time: dt.datetime, now: dt.datetime) -> bool:
        return time < self.cutoff(now)

    def evict(self, now: dt.datetime) -> int:
        """Drop the buckets that end before the lateness cutoff, and the ids they hold (not
        those a later bucket holds too); return how many ids went."""
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

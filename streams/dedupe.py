"""The recent-id set: which event ids were already inserted, over the accepted lateness.

Ids are held per tenant in time buckets of the event's own time (``bucket_seconds``, a minute by
default). An event older than ``now - lateness`` is dead-lettered before it is looked up, so a
bucket that ends before ``now - lateness`` can never be asked about again and is dropped: memory
is bounded by the ids of ``lateness + bucket_seconds`` worth of events. After a restart, or when
a partition is assigned, the set is rebuilt from ClickHouse (``usage_events``), the exact record
of what was inserted. Tests: ``tests/unit/test_streams_dedupe.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MINUTE = dt.timedelta(minutes=1)


class RecentIds:
    """Event ids inserted recently, keyed by (tenant, id) in buckets of event time."""

    def __init__(self, lateness_seconds: float, bucket_seconds: int = 60) -> None:
        if lateness_seconds <= 0 or bucket_seconds <= 0:
            raise ValueError("lateness_seconds and bucket_seconds must be positive")
        if bucket_seconds % 60:
            raise ValueError("bucket_seconds must be a whole number of minutes")
        self.lateness = dt.timedelta(seconds=lateness_seconds)
        self.bucket_seconds = bucket_seconds
        self.minutes_per_bucket = bucket_seconds // 60
        self._buckets: dict[int, set[str]] = {}

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

    def contains(self, tenant: str, event_id: str, time: dt.datetime) -> bool:
        return self.contains_key(self.bucket(time), self.key(tenant, event_id))

    def contains_key(self, bucket: int, key: str) -> bool:
        """:meth:`contains` for a :meth:`bucket` and :meth:`key` computed by the caller."""
        ids = self._buckets.get(bucket)
        return ids is not None and key in ids

    def add(self, tenant: str, event_id: str, time: dt.datetime) -> None:
        self._buckets.setdefault(self.bucket(time), set()).add(self.key(tenant, event_id))

    def add_keys(self, entries: Iterable[tuple[int, str]]) -> None:
        """:meth:`add` for (:meth:`bucket`, :meth:`key`) pairs computed by the caller."""
        buckets = self._buckets
        for bucket, key in entries:
            ids = buckets.get(bucket)
            if ids is None:
                ids = buckets[bucket] = set()
            ids.add(key)

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
        """Drop the buckets that end before the lateness cutoff; return how many ids went."""
        oldest_kept = self.bucket(self.cutoff(now))
        gone = [b for b in self._buckets if b < oldest_kept]
        dropped = sum(len(self._buckets.pop(b)) for b in gone)
        return dropped

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._buckets.values())


__all__ = ["RecentIds"]

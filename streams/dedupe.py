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


class RecentIds:
    """Event ids inserted recently, keyed by (tenant, id) in buckets of event time."""

    def __init__(self, lateness_seconds: float, bucket_seconds: int = 60) -> None:
        if lateness_seconds <= 0 or bucket_seconds <= 0:
            raise ValueError("lateness_seconds and bucket_seconds must be positive")
        self.lateness = dt.timedelta(seconds=lateness_seconds)
        self.bucket_seconds = bucket_seconds
        self._buckets: dict[int, set[str]] = {}

    def _bucket(self, time: dt.datetime) -> int:
        return int((time - _EPOCH).total_seconds()) // self.bucket_seconds

    @staticmethod
    def _key(tenant: str, event_id: str) -> str:
        # Tenant ids and event ids are printable ASCII, so NUL cannot occur inside either.
        return f"{tenant}\x00{event_id}"

    def contains(self, tenant: str, event_id: str, time: dt.datetime) -> bool:
        ids = self._buckets.get(self._bucket(time))
        return ids is not None and self._key(tenant, event_id) in ids

    def add(self, tenant: str, event_id: str, time: dt.datetime) -> None:
        self._buckets.setdefault(self._bucket(time), set()).add(self._key(tenant, event_id))

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
        oldest_kept = self._bucket(self.cutoff(now))
        gone = [b for b in self._buckets if b < oldest_kept]
        dropped = sum(len(self._buckets.pop(b)) for b in gone)
        return dropped

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._buckets.values())


__all__ = ["RecentIds"]

"""The recent-id set: which event ids were already inserted, over the accepted lateness.

An id is looked up by (tenant, id) alone, whatever time the resend carries: a client that
rebuilds an event on retry (a new ``time``, the same ``id``) is still a resend. Each id is held
for the accepted lateness from when it was inserted (the sink's clock), in buckets of
``bucket_seconds`` (10 s by default); a resend found in the set renews the hold. So a
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


class RecentIds:
    """Event ids inserted recently, keyed by (tenant, id); each is held for the lateness from
    when it was inserted (or last resent)."""

    def __init__(self, lateness_seconds: float, bucket_seconds: int = 10) -> None:
        if lateness_seconds <= 0 or bucket_seconds <= 0:
            raise ValueError("lateness_seconds and bucket_seconds must be positive")
        self.lateness = dt.timedelta(seconds=lateness_seconds)
        self.bucket_seconds = int(bucket_seconds)
        self._bucket_span = dt.timedelta(seconds=self.bucket_seconds)
        #: every key held (the lookup), and the keys of each bucket (the eviction), each key
        #: in exactly one bucket: evicting a bucket is a set difference at C speed, not a loop
        #: over its keys (2 M keys took 0.55 s of the GIL that way, a stall of the worker).
        #: Small buckets (10 s) keep each eviction short: ~0.26 s per 2 M keys even so.
        self._all: set[str] = set()
        self._buckets: dict[int, set[str]] = {}

    def bucket(self, time: dt.datetime) -> int:
        """The bucket of an insert time (aware): whole bucket spans since the epoch, floored."""
        return (time - _EPOCH) // self._bucket_span

    @staticmethod
    def key(tenant: str, event_id: str) -> str:
        """One string per (tenant, id): tenant ids and event ids are printable ASCII, so NUL
        cannot occur inside either."""
        return f"{tenant}\x00{event_id}"

    def contains(self, tenant: str, event_id: str, time: dt.datetime | None = None) -> bool:
        """Whether (tenant, id) was inserted within the lateness. ``time`` is not needed (an
        id is found whatever time a resend carries); it is accepted for older callers."""
        return self.key(tenant, event_id) in self._all

    def seen(self, key: str) -> bool:
        """:meth:`contains` for a :meth:`key` computed by the caller."""
        return key in self._all

    def add(self, tenant: str, event_id: str, time: dt.datetime) -> None:
        """Hold (tenant, id) for the lateness from ``time``, when it was inserted."""
        self.add_keys(((self.bucket(time), self.key(tenant, event_id)),))

    def add_keys(self, entries: Iterable[tuple[int, str]]) -> None:
        """:meth:`add` for (:meth:`bucket`, :meth:`key`) pairs computed by the caller. A key
        already held moves to the later of its buckets (a renewal: rare, so the search for its
        bucket is affordable)."""
        held, buckets = self._all, self._buckets
        for bucket, key in entries:
            keys = buckets.get(bucket)
            if keys is None:
                keys = buckets[bucket] = set()
            if key in held:
                if key in keys:
                    continue
                older = next(b for b, ks in buckets.items() if key in ks)
                if older > bucket:
                    continue
                buckets[older].discard(key)
            else:
                held.add(key)
            keys.add(key)

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
        """Drop the buckets of insert times older than the lateness, and the ids they hold;
        return how many ids went."""
        oldest_kept = self.bucket(self.cutoff(now))
        dropped = 0
        for bucket in [b for b in self._buckets if b < oldest_kept]:
            keys = self._buckets.pop(bucket)
            self._all.difference_update(keys)
            dropped += len(keys)
        return dropped

    def __len__(self) -> int:
        return len(self._all)


__all__ = ["RecentIds"]

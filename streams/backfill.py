"""The quota-DB backfill: per tenant per UTC day totals, from ClickHouse.

By default a total is the cost of the tenant's allowed limiter decisions that day, every
meter, as the limiter's daily counter counts it (``WORKER_BACKFILL_MEASURE``; the measures are
defined in :mod:`metering.clickhouse.totals`): ``tenant_daily_usage`` is what a lost counter is
seeded with. Totals are read from rollups (``decisions_day``, or ``usage_day`` for one meter's
billable usage) of the deduplicated ``usage_events``,
rather than from the Faust table: ClickHouse is the one place where each event counts exactly
once (the Faust tables are fed after the insert and can replay or miss a batch around a crash;
they serve the live view). Each round upserts ABSOLUTE totals (``QuotaStore.upsert_daily_usage``),
so a repeated or overlapping round changes nothing. Only days an event can still arrive for
(today, and the days within the accepted lateness) are re-read, and each of them for a margin
after that: an event the sink accepted at the last moment of its day's lateness is inserted a
batch later, and the next round must still read its day. A round that failed leaves its days
to the next one, which reads from the earlier of its own first day and the failed one's (a
quota DB down across the moment a day closed would otherwise leave that day's total stale for
good).

A round upserts only the totals that changed since the rounds before it wrote them (with tens of
thousands of tenants, rewriting every open tenant-day every few seconds took most of the thread
the sink inserts from); every ``rewrite_seconds`` a round writes them all again, so a quota DB
restored or edited meanwhile is put right.

A worker's first round also reads the days, up to ``catch_up_days`` back, whose totals count
another measure (``tenant_daily_usage.measure``: written by the release before, or before
``WORKER_BACKFILL_MEASURE`` changed), and replaces them, setting to 0 those of a tenant with
none of this measure's usage that day. It also reads the days that were
still open when the quota DB was last written (from its latest day's start less the lateness and
margin, at most ``catch_up_days`` back): a worker stopped or crashed before its last batch was
read, and restarted after that day closed, would otherwise leave the day short for good. The
worker also runs a last round once its sink has stopped (``streams.app``). Tests:
``tests/integration/test_streams_backfill.py``, ``tests/integration/test_streams_worker.py``,
``tests/integration/test_lifecycle_backfill.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from metering.clickhouse.totals import (
    DECISIONS,
    Measure,
    daily_billable_totals,
    daily_totals,
    measure_key,
)


class DailyUsageStore(Protocol):
    def upsert_daily_usage(
        self, rows: Any, measure: str | None = None, *, covering: Any = None
    ) -> int: ...


def latest_backfilled_day(store: Any) -> dt.date | None:
    """The latest day ``tenant_daily_usage`` holds a total for: None when it holds none, or
    when ``store`` cannot say (not a :class:`~metering.quota_db.QuotaStore`)."""
    latest = getattr(store, "latest_daily_usage_day", None)
    return latest() if latest is not None else None


class Backfill:
    """One round = read the open days' totals from ClickHouse, upsert them into the quota DB."""

    def __init__(
        self,
        client: Any,
        database: str,
        store: DailyUsageStore,
        *,
        meter: str = "requests",
        measure: Measure = DECISIONS,
        lateness_seconds: float,
        margin_seconds: float = 300.0,
        catch_up_days: int = 31,
        rewrite_seconds: float = 300.0,
    ) -> None:
        self.client = client
        self.database = database
        self.store = store
        #: what a total is (:mod:`metering.clickhouse.totals`); ``meter`` is read for "meter"
        self.measure: Measure = measure
        self.meter = meter
        #: what the totals count, as the quota DB records it: a stored total of another
        #: measure (an upgrade, a changed setting) is replaced, not only ever raised
        self.measure_key = measure_key(measure, meter)
        self.lateness = dt.timedelta(seconds=lateness_seconds)
        #: how long after its lateness ran out a day is still read: the sink's batch wait and
        #: insert, and the rounds' interval, with room to spare
        self.margin = dt.timedelta(seconds=margin_seconds)
        #: how far back the first round reads at most (a quota DB last written long ago)
        self.catch_up_days = catch_up_days
        #: the first day of the last round that failed (None after a round that succeeded)
        self._unfinished_since: dt.date | None = None
        #: True until a round succeeded: the first one also reads the days left open by the
        #: worker that wrote the quota DB last (:meth:`catch_up_since`)
        self._catching_up = True
        #: the totals written since the last full round, per (tenant, day): a round upserts
        #: only the totals that differ
        self._written: dict[tuple[str, dt.date], float] = {}
        #: how often a round writes every total it read (none is skipped as unchanged)
        self.rewrite_every = dt.timedelta(seconds=rewrite_seconds)
        self._rewrite_at: dt.datetime | None = None  # None: the next round writes them all

    def open_since(self, now: dt.datetime) -> dt.date:
        """The first UTC day that can still change (an event as late as allowed lands there,
        and is inserted within the margin)."""
        return (now.astimezone(dt.UTC) - self.lateness - self.margin).date()

    def catch_up_since(self, now: dt.datetime) -> dt.date:
        """The first day a worker's first round reads. The last round of the worker before it
        (stopped, crashed, its host gone) ran on or after the quota DB's latest day began, and
        read the days open then; events inserted after it, up to its stop, may be missing from
        them. Without a latest day (a new quota DB) only the open days are read, as always."""
        since = self.open_since(now)
        oldest = (now.astimezone(dt.UTC) - dt.timedelta(days=self.catch_up_days)).date()
        other = getattr(self.store, "earliest_day_of_another_measure", None)
        if other is not None and (day := other(self.measure_key, oldest)) is not None:
            # Totals of another measure (the release before, a changed setting): rewrite them
            # all, up to catch_up_days back, so the seeds and reconcile count one thing.
            since = min(since, day)
        latest = latest_backfilled_day(self.store)
        if latest is None:
            return since
        return min(since, max(self._open_at(latest), oldest))

    def _open_at(self, day: dt.date) -> dt.date:
        """The first day still open at the start of ``day``."""
        return self.open_since(dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC))

    def run_once(self, now: dt.datetime | None = None) -> int:
        """One round; returns the number of totals upserted (those that changed, or all of
        them in a full round)."""
        now = now or dt.datetime.now(dt.UTC)
        since = self.open_since(now)
        if self._unfinished_since is not None:
            since = min(since, self._unfinished_since)
        try:
            if self._catching_up:
                since = min(since, self.catch_up_since(now))
            rows = daily_totals(
                self.client, self.database, measure=self.measure, meter=self.meter, since=since
            )
            full = self._rewrite_at is None or now >= self._rewrite_at
            written = self._written
            if not full:
                rows = [r for r in rows if written.get((r[0], r[1])) != r[2]]
            if self._catching_up and full:
                # Every total of the days read: one of another measure that these leave out (a
                # tenant with no usage of this measure that day) is set to 0, not left as is.
                self.store.upsert_daily_usage(
                    rows, measure=self.measure_key, covering=(since, None)
                )
            elif rows:
                self.store.upsert_daily_usage(rows, measure=self.measure_key)
        except BaseException:
            self._unfinished_since = since
            raise
        if full:
            written.clear()  # also forgets the days closed since
            self._rewrite_at = now + self.rewrite_every
        for tenant, day, used in rows:
            written[(tenant, day)] = used
        self._unfinished_since = None
        self._catching_up = False
        return len(rows)


__all__ = ["Backfill", "daily_billable_totals", "daily_totals", "latest_backfilled_day"]

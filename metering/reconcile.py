"""Reconciliation: for one UTC day, each tenant's usage as three places see it.

- Redis: the limiter's daily counter ``rl:{<tenant>}:day:<YYYYMMDD>`` (what enforcement counted);
- ClickHouse: the same count as the pipeline recorded it, from a rollup of the deduplicated
  ``usage_events``: by default the cost of the tenant's allowed limiter decisions on every meter
  (``decisions_day``), or with ``WORKER_BACKFILL_MEASURE=meter`` the billable usage of
  ``WORKER_BACKFILL_METER`` (``usage_day``); :mod:`metering.clickhouse.totals`;
- the quota DB: ``tenant_daily_usage`` (what the worker backfilled, the same definition).

The three agree once the pipeline has caught up. A tenant whose numbers differ is a drift: an
event lost or double counted, a backfill that stalled, or a counter that was reset or seeded
wrong. The comparison is a pure function (:func:`compare`); the fetchers are thin I/O at the
edges, sync for the CLI and async for the API route.

The day counter expires ``DAY_GRACE_SECONDS`` (1 h) after its day ends, while late events keep
arriving for ``EVENT_MAX_LATENESS`` (3 h) and the backfill's margin: a closed day is final in
ClickHouse and the quota DB only after its counters are gone. A counter missing then is
*expired*, as designed, not drift: such a day is reconciled as ClickHouse against the quota DB.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from limiter.clock import epoch_day, utc_from_ns
from limiter.scripts import DAY_GRACE_SECONDS
from metering.clickhouse.totals import DECISIONS, Measure, daily_totals
from metering.ids import is_valid_tenant_id

_DAY_KEY_RE = re.compile(r"^rl:\{(?P<tenant>[^{}]+)\}:day:(?P<day>\d{8})$", re.ASCII)


@dataclass(frozen=True)
class ReconcileRow:
    tenant: str
    redis: int | None
    clickhouse: int | None
    quota_db: int | None
    #: The Redis counter is gone because its day ended more than the grace ago (see
    #: :func:`counters_expired`); Redis is then left out of the comparison.
    expired: bool = False

    @property
    def agrees(self) -> bool:
        return not self.drift

    @property
    def drift(self) -> dict[str, int]:
        """Each source's difference from ClickHouse (the deduplicated record), where non-zero."""
        base = self.clickhouse or 0
        out = {}
        sources = (("redis", self.redis), ("quota_db", self.quota_db))
        for name, value in sources[1:] if self.expired else sources:
            if (value or 0) != base:
                out[name] = (value or 0) - base
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agrees": self.agrees, "drift": self.drift}


def compare(
    redis: Mapping[str, int],
    clickhouse: Mapping[str, int],
    quota_db: Mapping[str, int],
    *,
    counters_expired: bool = False,
) -> list[ReconcileRow]:
    """One row per tenant seen by any source, sorted by tenant. ``counters_expired``: the day's
    Redis counters are gone by design, so a tenant without one is marked expired rather than
    compared as 0 (one still there, kept by a longer grace, is compared)."""
    tenants = sorted(set(redis) | set(clickhouse) | set(quota_db))
    return [
        ReconcileRow(
            t,
            redis.get(t),
            clickhouse.get(t),
            quota_db.get(t),
            counters_expired and t not in redis,
        )
        for t in tenants
    ]


def counters_expired(
    day: dt.date, now: dt.datetime, grace_seconds: int = DAY_GRACE_SECONDS
) -> bool:
    """Whether the limiter's counters of the UTC ``day`` have expired at ``now``: acquire.lua
    sets them to expire at the end of the day plus the grace. Before that a missing counter is
    drift for a tenant with usage (Redis restarted empty, a key deleted); a tenant without
    decisions has none, and agrees as long as ClickHouse and the quota DB show none either."""
    return now.timestamp() >= (epoch_day(day) + 1) * 86400 + grace_seconds


def _server_time(reply: Any) -> dt.datetime:
    """A ``TIME`` reply as an aware UTC datetime. A Cluster client answers per node: the
    earliest, so that a day's counters count as expired once every master's clock says so."""
    replies = list(reply.values()) if isinstance(reply, dict) else [reply]
    seconds, micros = min((int(s), int(u)) for s, u in replies)
    return utc_from_ns(seconds * 1_000_000_000 + micros * 1000)


def redis_now(client: Any) -> dt.datetime:
    """The Redis server's time: the clock acquire.lua expires the day counters by (EXAT), so
    the one :func:`counters_expired` is judged by. The host's own clock, off by X seconds,
    showed a missing counter as drift, or as expired, for X seconds around the expiry."""
    return _server_time(client.time())


async def aredis_now(client: Any) -> dt.datetime:
    return _server_time(await client.time())


def day_key(tenant: str, day: dt.date) -> str:
    return f"rl:{{{tenant}}}:day:{day:%Y%m%d}"


def _day_pattern(day: dt.date) -> str:
    return f"rl:{{*}}:day:{day:%Y%m%d}"


def _tenant_of(key: bytes | str) -> str | None:
    m = _DAY_KEY_RE.match(key.decode() if isinstance(key, bytes) else key)
    return m["tenant"] if m and is_valid_tenant_id(m["tenant"]) else None


#: the counters read in one pipelined round trip (one SCAN page's worth)
_READ_BATCH = 1000


class _CounterReads:
    """The day counters SCAN finds, read a page at a time in one pipelined round trip (the sync
    and the async reader share it: only their ``execute`` differs)."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.page: list[tuple[Any, str]] = []  # (key, its tenant)

    def add(self, key: Any) -> bool:
        """Take a key SCAN found; True when the page is full (read it)."""
        if (tenant := _tenant_of(key)) is not None:
            self.page.append((key, tenant))
        return len(self.page) >= _READ_BATCH

    def pipeline(self, client: Any) -> Any:
        pipe = client.pipeline(transaction=False)
        for key, _ in self.page:
            pipe.get(key)
        return pipe

    def take(self, values: list[Any]) -> None:
        for (_, tenant), value in zip(self.page, values, strict=True):
            if value is not None:  # expired between the SCAN and the GET
                self.counters[tenant] = int(float(value))
        self.page = []


def redis_daily_counters(client: Any, day: dt.date) -> dict[str, int]:
    """Every tenant's daily counter for ``day`` (SCAN, so Redis is never blocked; on Cluster
    redis-py scans every primary), read a SCAN page at a time in one pipelined round trip."""
    reads = _CounterReads()
    for key in client.scan_iter(match=_day_pattern(day), count=_READ_BATCH):
        if reads.add(key):
            reads.take(reads.pipeline(client).execute())
    if reads.page:
        reads.take(reads.pipeline(client).execute())
    return reads.counters


async def aredis_daily_counters(client: Any, day: dt.date) -> dict[str, int]:
    reads = _CounterReads()
    async for key in client.scan_iter(match=_day_pattern(day), count=_READ_BATCH):
        if reads.add(key):
            reads.take(await reads.pipeline(client).execute())
    if reads.page:
        reads.take(await reads.pipeline(client).execute())
    return reads.counters


def clickhouse_daily_totals(
    client: Any, database: str, day: dt.date, meter: str, measure: Measure = DECISIONS
) -> dict[str, int]:
    """Each tenant's total for the UTC day by ``measure`` (the backfill's definition; ``meter``
    is read for ``"meter"``), rounded up as the quota DB's day totals are read
    (``QuotaStore.daily_usage_for_day``), so a fractional total copied exactly is not reported
    as drift."""
    rows = daily_totals(
        client,
        database,
        measure=measure,
        meter=meter,
        since=day,
        until=day + dt.timedelta(days=1),
    )
    return {tenant: math.ceil(total) for tenant, _day, total in rows}


def format_report(rows: Iterable[ReconcileRow], day: dt.date, measure: str | None = None) -> str:
    """The table ``metering reconcile`` prints; ``measure`` says what was counted
    (:func:`metering.clickhouse.totals.describe_measure`)."""
    rows = list(rows)
    counted = f" of {measure}" if measure else ""
    lines = [
        f"reconcile {day.isoformat()} (UTC): redis counter / clickhouse / quota db{counted}",
        f"{'tenant':<28}{'redis':>12}{'clickhouse':>12}{'quota db':>12}  status",
    ]

    def show(v: int | None) -> str:
        return "-" if v is None else str(v)

    for r in rows:
        status = (
            "ok" if r.agrees else "DRIFT " + ", ".join(f"{k} {v:+d}" for k, v in r.drift.items())
        )
        redis = "expired" if r.expired else show(r.redis)
        lines.append(
            f"{r.tenant:<28}{redis:>12}{show(r.clickhouse):>12}{show(r.quota_db):>12}  {status}"
        )
    drifted = sum(1 for r in rows if not r.agrees)
    expired = sum(1 for r in rows if r.expired)
    summary = f"{len(rows)} tenants, {drifted} with drift"
    if expired:
        summary += (
            f"; {expired} Redis counters expired after the day ended"
            " (compared: clickhouse with quota db)"
        )
    lines.append(summary)
    return "\n".join(lines)

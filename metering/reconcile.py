"""Reconciliation: for one UTC day, each tenant's usage as three places see it.

- Redis: the limiter's daily counter ``rl:{<tenant>}:day:<YYYYMMDD>`` (what enforcement counted);
- ClickHouse: the billable usage of the limiter's meter (``WORKER_BACKFILL_METER``, default
  ``requests``) for that day, from the ``usage_day`` rollup of the deduplicated ``usage_events``
  (what the pipeline recorded);
- the quota DB: ``tenant_daily_usage`` (what the worker backfilled, the same definition).

The three agree once the pipeline has caught up. A tenant whose numbers differ is a drift: an
event lost or double counted, a backfill that stalled, or a counter that was reset or seeded
wrong. The comparison is a pure function (:func:`compare`); the fetchers are thin I/O at the
edges, sync for the CLI and async for the API route.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from metering.ids import is_valid_tenant_id

_DAY_KEY_RE = re.compile(r"^rl:\{(?P<tenant>[^{}]+)\}:day:(?P<day>\d{8})$", re.ASCII)


@dataclass(frozen=True)
class ReconcileRow:
    tenant: str
    redis: int | None
    clickhouse: int | None
    quota_db: int | None

    @property
    def agrees(self) -> bool:
        return len({v or 0 for v in (self.redis, self.clickhouse, self.quota_db)}) == 1

    @property
    def drift(self) -> dict[str, int]:
        """Each source's difference from ClickHouse (the deduplicated record), where non-zero."""
        base = self.clickhouse or 0
        out = {}
        for name, value in (("redis", self.redis), ("quota_db", self.quota_db)):
            if (value or 0) != base:
                out[name] = (value or 0) - base
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agrees": self.agrees, "drift": self.drift}


def compare(
    redis: Mapping[str, int], clickhouse: Mapping[str, int], quota_db: Mapping[str, int]
) -> list[ReconcileRow]:
    """One row per tenant seen by any source, sorted by tenant."""
    tenants = sorted(set(redis) | set(clickhouse) | set(quota_db))
    return [ReconcileRow(t, redis.get(t), clickhouse.get(t), quota_db.get(t)) for t in tenants]


def day_key(tenant: str, day: dt.date) -> str:
    return f"rl:{{{tenant}}}:day:{day:%Y%m%d}"


def _day_pattern(day: dt.date) -> str:
    return f"rl:{{*}}:day:{day:%Y%m%d}"


def _tenant_of(key: bytes | str) -> str | None:
    m = _DAY_KEY_RE.match(key.decode() if isinstance(key, bytes) else key)
    return m["tenant"] if m and is_valid_tenant_id(m["tenant"]) else None


def redis_daily_counters(client: Any, day: dt.date) -> dict[str, int]:
    """Every tenant's daily counter for ``day`` (SCAN, so Redis is never blocked; on Cluster
    redis-py scans every primary)."""
    out: dict[str, int] = {}
    for key in client.scan_iter(match=_day_pattern(day), count=1000):
        tenant = _tenant_of(key)
        value = client.get(key) if tenant else None
        if tenant and value is not None:
            out[tenant] = int(float(value))
    return out


async def aredis_daily_counters(client: Any, day: dt.date) -> dict[str, int]:
    out: dict[str, int] = {}
    async for key in client.scan_iter(match=_day_pattern(day), count=1000):
        tenant = _tenant_of(key)
        value = await client.get(key) if tenant else None
        if tenant and value is not None:
            out[tenant] = int(float(value))
    return out


def clickhouse_daily_totals(client: Any, database: str, day: dt.date, meter: str) -> dict[str, int]:
    """Billable usage of ``meter`` per tenant for the UTC day (the backfill's definition),
    rounded up as the quota DB's day totals are read (``QuotaStore.daily_usage_for_day``), so
    a fractional total copied exactly is not reported as drift."""
    from metering.clickhouse.totals import daily_billable_totals

    rows = daily_billable_totals(
        client, database, meter=meter, since=day, until=day + dt.timedelta(days=1)
    )
    return {tenant: math.ceil(total) for tenant, _day, total in rows}


def format_report(rows: Iterable[ReconcileRow], day: dt.date) -> str:
    rows = list(rows)
    lines = [
        f"reconcile {day.isoformat()} (UTC): redis counter / clickhouse / quota db",
        f"{'tenant':<28}{'redis':>12}{'clickhouse':>12}{'quota db':>12}  status",
    ]

    def show(v: int | None) -> str:
        return "-" if v is None else str(v)

    for r in rows:
        status = (
            "ok" if r.agrees else "DRIFT " + ", ".join(f"{k} {v:+d}" for k, v in r.drift.items())
        )
        lines.append(
            f"{r.tenant:<28}{show(r.redis):>12}{show(r.clickhouse):>12}"
            f"{show(r.quota_db):>12}  {status}"
        )
    drifted = sum(1 for r in rows if not r.agrees)
    lines.append(f"{len(rows)} tenants, {drifted} with drift")
    return "\n".join(lines)

"""Reconciliation: for one UTC day, each tenant's usage as three places see it.

- Redis: the limiter's daily counter ``rl:{<tenant>}:day:<YYYYMMDD>`` (what enforcement counted);
- ClickHouse: the sum of allowed limiter decisions for that day in ``usage_events`` (what the
  pipeline recorded, deduplicated by event id);
- the quota DB: ``tenant_daily_usage`` (what the worker backfilled).

The three agree when the pipeline has caught up. A tenant whose numbers differ is a drift:
an event lost or double counted, a backfill that stalled, or a counter that was reset.
The comparison is a pure function (:func:`compare`); the fetchers are thin I/O at the edges.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from metering.ids import is_valid_tenant_id

_DAY_KEY_RE = re.compile(r"^rl:\{(?P<tenant>[^{}]+)\}:day:(?P<day>\d{8})$")


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


def compare(
    redis: Mapping[str, int], clickhouse: Mapping[str, int], quota_db: Mapping[str, int]
) -> list[ReconcileRow]:
    """One row per tenant seen by any source, sorted by tenant."""
    tenants = sorted(set(redis) | set(clickhouse) | set(quota_db))
    return [
        ReconcileRow(t, redis.get(t), clickhouse.get(t), quota_db.get(t)) for t in tenants
    ]


def day_key(tenant: str, day: dt.date) -> str:
    return f"rl:{{{tenant}}}:day:{day:%Y%m%d}"


def redis_daily_counters(client: Any, day: dt.date) -> dict[str, int]:
    """Every tenant's daily counter for ``day`` (SCAN, so it never blocks Redis; on Cluster
    redis-py scans every primary)."""
    pattern = f"rl:{{*}}:day:{day:%Y%m%d}"
    keys = [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match=pattern,
                                                                               count=1000)]
    out: dict[str, int] = {}
    for key in keys:
        m = _DAY_KEY_RE.match(key)
        if not m or not is_valid_tenant_id(m["tenant"]):
            continue
        value = client.get(key)
        if value is not None:
            out[m["tenant"]] = int(float(value))
    return out


def clickhouse_daily_totals(client: Any, database: str, day: dt.date) -> dict[str, int]:
    """Allowed limiter decisions per tenant for the UTC day, from the deduplicated raw table."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    result = client.query(
        # the database name is validated by Settings (CLICKHOUSE_DATABASE pattern)
        f"SELECT tenant, sum(quantity) FROM {database}.usage_events "  # noqa: S608
        "WHERE time >= {start:DateTime64(3, 'UTC')} AND time < {end:DateTime64(3, 'UTC')} "
        "AND type = 'metering.ratelimit' AND decision = 'allowed' GROUP BY tenant",
        parameters={"start": start, "end": start + dt.timedelta(days=1)},
    )
    return {str(t): round(v) for t, v in result.result_rows}


def format_report(rows: Iterable[ReconcileRow], day: dt.date) -> str:
    rows = list(rows)
    lines = [f"reconcile {day.isoformat()} (UTC): redis counter / clickhouse / quota db",
             f"{'tenant':<28}{'redis':>12}{'clickhouse':>12}{'quota db':>12}  status"]

    def show(v: int | None) -> str:
        return "-" if v is None else str(v)

    for r in rows:
        status = "ok" if r.agrees else "DRIFT " + ", ".join(
            f"{k} {v:+d}" for k, v in r.drift.items())
        lines.append(f"{r.tenant:<28}{show(r.redis):>12}{show(r.clickhouse):>12}"
                     f"{show(r.quota_db):>12}  {status}")
    drifted = sum(1 for r in rows if not r.agrees)
    lines.append(f"{len(rows)} tenants, {drifted} with drift")
    return "\n".join(lines)

"""``metering reconcile [--day D] [--json] [--api URL]``: Redis counters, ClickHouse and the
quota DB side by side for a UTC day; exit code 1 when any tenant drifts. The Redis counters of a
day that ended more than the limiter's grace ago have expired by design: they show as
``expired`` and the day is checked as ClickHouse against the quota DB
(:func:`metering.reconcile.counters_expired`).

It reads the three sources directly. In embedded mode a running ``metering up`` or ``metering
api`` may own the ClickHouse data folder; then it asks that process, at its own ``--host`` and
``--port`` (``GET /v1/admin/reconcile``, with an admin token signed by the same secret). A
folder held by a process that serves no API (a worker) is an error naming it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from metering import reconcile
from metering.cli import CommandError
from metering.clickhouse.totals import describe_measure
from metering.commands.argtypes import utc_day
from metering.commands.store_errors import EngineHolder, embedded_engine_held, engine_holder
from metering.settings import Settings, get_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rec = sub.add_parser("reconcile", help="compare Redis, ClickHouse and the quota DB for a day")
    rec.add_argument("--day", type=utc_day, default=None, help="UTC day YYYY-MM-DD (default today)")
    rec.add_argument("--json", action="store_true", help="print JSON")
    rec.add_argument(
        "--api",
        default=None,
        help="ask a running API (e.g. http://127.0.0.1:8000) instead of the sources",
    )
    rec.set_defaults(handler=_run)


def direct(settings: Settings, day: dt.date) -> list[reconcile.ReconcileRow]:
    from limiter.redis_factory import redis_from_settings
    from metering.clickhouse.client import clickhouse_client
    from metering.quota_db import QuotaStore

    ch = clickhouse_client(settings.clickhouse_url, timeout=settings.clickhouse_query_timeout)
    redis = redis_from_settings(settings)
    try:
        counters = reconcile.redis_daily_counters(redis, day)
        # After the scan: a counter that expired during it is missing as designed. By the
        # Redis server's clock, which expires them.
        now = reconcile.redis_now(redis)
    finally:
        redis.close()
    totals = reconcile.clickhouse_daily_totals(
        ch,
        settings.clickhouse_database,
        day,
        settings.worker_backfill_meter,
        settings.worker_backfill_measure,
    )
    db = QuotaStore(settings.quota_db_url).daily_usage_for_day(day)
    expired = reconcile.counters_expired(day, now)
    return reconcile.compare(counters, totals, db, counters_expired=expired)


def via_api(settings: Settings, base: str, day: dt.date) -> list[reconcile.ReconcileRow]:
    return ask_api(settings, base, day)[0]


def ask_api(
    settings: Settings, base: str, day: dt.date
) -> tuple[list[reconcile.ReconcileRow], tuple[str, str]]:
    """The API's reconciliation of ``day``, and the measure and meter it compared (its own
    settings, which may not be this shell's)."""
    import httpx

    from metering.commands.up import sign_token

    token = sign_token(settings, "metering-reconcile", admin=True, ttl=300)
    try:
        r = httpx.get(
            f"{base.rstrip('/')}/v1/admin/reconcile",
            params={"day": day.isoformat()},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise CommandError(f"could not reach the API at {base}: {exc}") from None
    if r.status_code != 200:
        raise CommandError(f"the API at {base} answered {r.status_code}: {r.text[:500]}")
    answer = r.json()
    rows = [
        reconcile.ReconcileRow(
            t["tenant"], t["redis"], t["clickhouse"], t["quota_db"], t.get("expired", False)
        )
        for t in answer["tenants"]
    ]
    # A release before this one named only the meter, and compared its billable usage.
    return rows, (answer.get("measure", "meter"), answer.get("meter", "requests"))


def _ask(holder: EngineHolder) -> str:
    """The API of the process holding the folder, which answers for it; else a CommandError
    naming that process."""
    url = holder.api_url
    if url is None:
        raise CommandError(
            f"the embedded ClickHouse is in use by {holder.describe()}, which serves no API; "
            "stop it, or pass --api URL of a `metering up` or `metering api` that owns the folder"
        )
    print(
        f"metering reconcile: the embedded ClickHouse is in use by {holder.describe()}; "
        f"asking it at {url}",
        file=sys.stderr,
    )
    return url


def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    day = args.day or dt.datetime.now(dt.UTC).date()
    compared: tuple[str, str] = (settings.worker_backfill_measure, settings.worker_backfill_meter)
    if args.api:
        rows, compared = ask_api(settings, args.api, day)
    elif (holder := engine_holder(settings)) is not None:
        rows, compared = ask_api(settings, _ask(holder), day)
    else:
        try:
            rows = direct(settings, day)
        except Exception as exc:  # held since the look above (a start in between)
            if not embedded_engine_held(settings, exc) or not (holder := engine_holder(settings)):
                raise
            rows, compared = ask_api(settings, _ask(holder), day)
    measure, meter = compared  # by the API's settings when it answered, not this shell's
    if args.json:
        out: dict[str, Any] = {
            "day": day.isoformat(),
            "measure": measure,
            "meter": meter,
            "tenants": [r.as_dict() for r in rows],
        }
        print(json.dumps(out, indent=2))
    else:
        described = describe_measure(measure, meter)
        print(reconcile.format_report(rows, day, described))
    return 0 if all(r.agrees for r in rows) else 1

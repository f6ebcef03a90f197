"""``metering db migrate``: bring the quota DB and the ClickHouse schema up to date (idempotent).

``metering db backfill --since D [--until D]``: write the days' totals from ClickHouse into the
quota DB's ``tenant_daily_usage``, as the worker does for the open days: for days a worker no
longer reads (closed more than ``catch_up_days`` ago when it started; a quota DB restored from
an old backup; totals of a measure in force before). Totals of the configured measure only
grow, unless ``--replace``; those of another measure are replaced, and set to 0 where
ClickHouse has none (``QuotaStore.upsert_daily_usage``)."""

from __future__ import annotations

import argparse
import datetime as dt

from metering.commands.argtypes import utc_day
from metering.quota_db import migrate as migrate_quota_db
from metering.settings import load_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="database schemas")
    dsub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    migrate = dsub.add_parser(
        "migrate", help="migrate the quota DB (QUOTA_DB_URL) and ClickHouse (CLICKHOUSE_URL)"
    )
    migrate.add_argument(
        "--only",
        choices=["quota", "clickhouse"],
        default=None,
        help="migrate only this database",
    )
    migrate.set_defaults(handler=_migrate)
    backfill = dsub.add_parser(
        "backfill",
        help="write days' totals from ClickHouse into the quota DB (tenant_daily_usage)",
    )
    backfill.add_argument("--since", type=utc_day, required=True, help="first UTC day, YYYY-MM-DD")
    backfill.add_argument(
        "--until", type=utc_day, default=None, help="last UTC day, YYYY-MM-DD (default today)"
    )
    backfill.add_argument(
        "--replace",
        action="store_true",
        help="set every total of those days to ClickHouse's, also where it is smaller (totals"
        " a worker of an earlier release raised beside a new one)",
    )
    backfill.set_defaults(handler=_backfill)


#: The days ClickHouse's Date holds (it clamps others silently).
FIRST_DAY, LAST_DAY = dt.date(1970, 1, 1), dt.date(2149, 6, 5)


def _migrate(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.only in (None, "quota"):
        revision = migrate_quota_db(settings.quota_db_url)
        print(f"quota DB: at revision {revision}")
    if args.only in (None, "clickhouse"):
        from metering.clickhouse.schema import migrate as migrate_clickhouse

        applied = migrate_clickhouse(settings)
        print(f"ClickHouse: applied {', '.join(map(str, applied)) if applied else 'nothing new'}")
        for table, before, now in applied.retention:
            was = f"{before} days" if before is not None else "no TTL"
            print(
                f"ClickHouse: {table} keeps rows {now} days (was {was}; CLICKHOUSE_RETENTION_DAYS)"
            )
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from metering.cli import CommandError
    from metering.clickhouse.client import clickhouse_client
    from metering.clickhouse.totals import daily_totals, describe_measure, measure_key
    from metering.commands.store_errors import engine_holder
    from metering.quota_db import QuotaStore

    settings = load_settings()
    until = args.until or dt.datetime.now(dt.UTC).date()
    if args.since > until:
        raise CommandError(f"--since {args.since} is after --until {until}")
    for name, day in (("--since", args.since), ("--until", until)):
        if not FIRST_DAY <= day <= LAST_DAY:
            raise CommandError(
                f"{name} {day} is outside ClickHouse's days ({FIRST_DAY} to {LAST_DAY})"
            )
    if (holder := engine_holder(settings)) is not None:
        raise CommandError(
            f"the embedded ClickHouse is in use by {holder.describe()}: stop it first (a"
            " running worker backfills the open days itself)"
        )
    measure, meter = settings.worker_backfill_measure, settings.worker_backfill_meter
    client = clickhouse_client(settings.clickhouse_url, timeout=settings.clickhouse_query_timeout)
    end = until + dt.timedelta(days=1)
    rows = daily_totals(
        client,
        settings.clickhouse_database,
        measure=measure,
        meter=meter,
        since=args.since,
        until=end,
    )
    # Every total of those days: one of another measure they leave out is set to 0.
    QuotaStore(settings.quota_db_url).upsert_daily_usage(
        rows, measure=measure_key(measure, meter), covering=(args.since, end), replace=args.replace
    )
    tenants = len({tenant for tenant, _, _ in rows})
    print(
        f"quota DB: {len(rows)} day totals of {tenants} tenants, {args.since} to {until}"
        f" ({describe_measure(measure, meter)})"
    )
    return 0

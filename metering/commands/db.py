"""``metering db migrate``: bring the quota DB and the ClickHouse schema up to date (idempotent)."""

from __future__ import annotations

import argparse

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

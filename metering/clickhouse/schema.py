"""The versioned ClickHouse schema: ``NNN_name.sql`` files applied in order, each once.

Applied versions are recorded in ``<database>.schema_migrations``; every statement is also
``IF NOT EXISTS``, so re-running (or a crash half-way through a file) is harmless. The files use
two placeholders, ``${database}`` and ``${retention_days}``, filled from validated settings
(never from request input), and a migration that fills a new rollup from the rows stored
before it uses a third, ``${cut}`` (:func:`view_cut`): its view takes the rows inserted from
the cut on, its fill those inserted before, so no row is counted twice or missed while workers
insert; the fill writes absolute totals that replace each other, so it may run again or twice at
once. Tests: ``tests/integration/test_clickhouse_schema.py``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

from metering.settings import Settings

_FILE_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$", re.ASCII)
_DATABASE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self, database: str, retention_days: int, cut: str | None = None) -> list[str]:
        text = Template(self.sql).substitute(
            database=database, retention_days=retention_days, cut=cut or ""
        )
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
        return [s.strip() for s in body.split(";") if s.strip()]


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found = []
    for entry in resources.files("metering.clickhouse").iterdir():
        if m := _FILE_RE.match(entry.name):
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate ClickHouse migration versions: {versions}")
    return found


class NewerSchemaError(RuntimeError):
    """The database holds a migration version this release does not ship: a newer release
    migrated it (a deploy rolled back). Its tables may not be what this code reads and writes."""

    def __init__(self, found: int, known: int | None) -> None:
        self.found = f"schema version {found}"
        self.known = str(known) if known is not None else "none"
        super().__init__(
            f"ClickHouse is at {self.found}, newer than this release knows ({self.known}): "
            "deploy the newer release"
        )


def checked_database(database: str) -> str:
    """``database`` if it is a plain identifier (safe to put into SQL text), else ValueError."""
    if not isinstance(database, str) or not _DATABASE_RE.match(database):
        raise ValueError(f"ClickHouse database name {database!r} is not a plain identifier")
    return database


#: The retention a table is made with when no setting gives one (``CLICKHOUSE_RETENTION_DAYS``'s
#: default).
DEFAULT_RETENTION_DAYS = 400
#: The tables whose rows expire after the retention, each with its TTL's time expression (as in
#: the migrations that make them).
RETENTION_TABLES = {
    "usage_events": "toDateTime(time)",
    "usage_minute": "bucket",
    "usage_hour": "bucket",
    "usage_day": "bucket",
    "usage_minute_by_time": "bucket",
    "decisions_day": "bucket",
    "decisions_day_filled": "bucket",
}
#: How far ahead of a ClickHouse server's clock a migration sets its cut, and how long past the
#: cut it waits before its fill: an insert begun before the view existed (a worker of the
#: release before, still running) stamps its rows before the cut and has stored them by then.
#: The embedded engine runs in this process alone (one process per data folder): no wait.
SERVER_CUT_SECONDS = 10.0
_VIEW_RE = re.compile(r"CREATE MATERIALIZED VIEW IF NOT EXISTS \$\{database\}\.(\w+)")
_CUT_RE = re.compile(r"inserted_at >= toDateTime64\('([0-9: .-]+)'")
_TTL_DAYS = re.compile(r"\bTTL .*?\+ toIntervalDay\((\d+)\)")


class Applied(list[str]):
    """The names of the migrations applied, and ``retention``: the tables whose TTL was changed
    to the configured retention, as ``(table, days before, days now)``."""

    def __init__(self) -> None:
        super().__init__()
        self.retention: list[tuple[str, int | None, int]] = []


def retention_in_force(client: Any, database: str) -> dict[str, int | None]:
    """Each retention table of ``database`` that exists, with the days its TTL keeps rows for
    (None: no TTL of that form)."""
    rows = client.query(
        "SELECT name, engine_full FROM system.tables"
        " WHERE database = {d:String} AND name IN {names:Array(String)}",
        parameters={"d": checked_database(database), "names": list(RETENTION_TABLES)},
    ).result_rows
    found: dict[str, int | None] = {}
    for name, engine in rows:
        m = _TTL_DAYS.search(engine or "")
        found[name] = int(m.group(1)) if m else None
    return found


def apply_retention(
    client: Any, database: str, retention_days: int
) -> list[tuple[str, int | None, int]]:
    """Make every retention table keep rows for ``retention_days`` (``ALTER TABLE ... MODIFY
    TTL``: ClickHouse then drops the rows a shorter retention expires, in the background).
    A table made by migration 001/002 got the retention in force at that first migration;
    ``CLICKHOUSE_RETENTION_DAYS`` changed later must still apply, or late events that the
    lateness check lets through would be deleted by the old TTL (or rows kept past a shorter
    one). Returns the tables changed."""
    changed = []
    for table, days in sorted(retention_in_force(client, database).items()):
        if days == retention_days:
            continue
        client.command(
            f"ALTER TABLE {database}.{table} MODIFY TTL "
            f"{RETENTION_TABLES[table]} + INTERVAL {int(retention_days)} DAY"
        )
        changed.append((table, days, retention_days))
    return changed


def _embedded(client: Any) -> bool:
    return "chdb" in type(client).__module__


def _server_now(client: Any) -> dt.datetime:
    (now,) = client.query("SELECT now64(3, 'UTC')").result_rows[0]
    return now.replace(tzinfo=None) if isinstance(now, dt.datetime) else now


def _made_cut(client: Any, database: str, migration: Migration) -> str | None:
    """The cut in the definition of ``migration``'s view, if the view exists."""
    view = _VIEW_RE.search(migration.sql)
    if view is None:
        return None
    rows = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {d:String}"
        " AND name = {v:String}",
        parameters={"d": database, "v": view.group(1)},
    ).result_rows
    made = _CUT_RE.search(rows[0][0] or "") if rows else None
    return made.group(1) if made else None


def view_cut(client: Any, database: str, migration: Migration) -> str:
    """The cut of ``migration``'s view (``${cut}``): the one in the view's definition when a
    run (cut short, or running beside this one) made the view already, else the server's
    clock, plus :data:`SERVER_CUT_SECONDS` for a server, plus a millisecond (the resolution of
    ``inserted_at``: a row stored in the millisecond the clock was read is before the cut)."""
    made = _made_cut(client, database, migration)
    if made is not None:
        return made
    ahead = 0.0 if _embedded(client) else SERVER_CUT_SECONDS
    cut = _server_now(client) + dt.timedelta(seconds=ahead, milliseconds=1)
    return cut.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def wait_past_cut(client: Any, cut: str) -> None:
    """Return once the server's clock is past ``cut`` (by :data:`SERVER_CUT_SECONDS` for a
    server): every row stamped before the cut is stored by then."""
    settle = 0.0 if _embedded(client) else SERVER_CUT_SECONDS
    until = dt.datetime.strptime(cut, "%Y-%m-%d %H:%M:%S.%f") + dt.timedelta(seconds=settle)
    while (left := (until - _server_now(client)).total_seconds()) >= 0:
        time.sleep(min(left + 0.001, 1.0))


def _apply_with_cut(client: Any, database: str, retention_days: int, mig: Migration) -> None:
    """Apply a migration whose view starts at a cut and whose fill (its INSERT statements) sums
    the rows before it. The fill runs with the cut of the view that exists once the view is
    made: another run of the migration at the same moment (two workers starting) may have made
    it first, with its own cut, and ``IF NOT EXISTS`` kept that one."""
    for statement in mig.statements(database, retention_days, view_cut(client, database, mig)):
        if not statement.startswith("INSERT"):
            client.command(statement)
    cut = _made_cut(client, database, mig)
    if cut is None:
        raise RuntimeError(f"migration {mig.version:03d}: its view holds no cut after it was made")
    wait_past_cut(client, cut)
    for statement in mig.statements(database, retention_days, cut):
        if statement.startswith("INSERT"):
            client.command(statement)


def migrate_client(client: Any, database: str, *, retention_days: int | None = None) -> Applied:
    """Apply the pending migrations to ``database`` through ``client``; return their names.
    A database a newer release migrated raises :class:`NewerSchemaError`, before any change.
    With ``retention_days`` (from settings), the retention tables' TTL is brought to it too
    (:func:`apply_retention`); without, new tables get :data:`DEFAULT_RETENTION_DAYS` and an
    existing TTL is left as it is."""
    checked_database(database)
    if retention_days is not None and retention_days < 1:
        raise ValueError(f"retention_days must be at least 1, got {retention_days}")
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    versions = client.query(f"SELECT version FROM {database}.schema_migrations")  # noqa: S608
    done = {row[0] for row in versions.result_rows}
    shipped = migrations()
    _refuse_newer(max(done, default=None), shipped)
    applied = Applied()
    for mig in shipped:
        if mig.version in done:
            continue
        retention = retention_days or DEFAULT_RETENTION_DAYS
        if "${cut}" not in mig.sql:
            for statement in mig.statements(database, retention):
                client.command(statement)
        else:
            _apply_with_cut(client, database, retention, mig)
        client.insert(
            f"{database}.schema_migrations",
            [[mig.version, mig.name]],
            column_names=["version", "name"],
        )
        applied.append(f"{mig.version:03d}_{mig.name}")
    if retention_days is not None:
        applied.retention = apply_retention(client, database, retention_days)
    return applied


def _refuse_newer(found: int | None, shipped: list[Migration]) -> None:
    """Raise :class:`NewerSchemaError` if ``found`` (the newest version applied) is one that
    ``shipped`` lacks."""
    newest = max((mig.version for mig in shipped), default=None)
    if found is not None and (newest is None or found > newest):
        raise NewerSchemaError(found, newest)


def check_not_newer(client: Any, database: str) -> None:
    """Raise :class:`NewerSchemaError` if ``database`` was migrated by a newer release. Reads
    only (no ``CREATE``): a database not migrated yet passes."""
    checked_database(database)
    tables = client.query(
        "SELECT count() FROM system.tables"
        " WHERE database = {d:String} AND name = 'schema_migrations'",
        parameters={"d": database},
    ).result_rows
    if not tables[0][0]:
        return
    rows = client.query(
        f"SELECT max(version), count() FROM {database}.schema_migrations"  # noqa: S608
    ).result_rows
    found, count = rows[0]
    _refuse_newer(found if count else None, migrations())


def migrate(settings_or_client: Settings | Any, database: str | None = None) -> Applied:
    """Migrate ClickHouse: ``migrate(settings)`` (what ``metering db migrate`` calls) or
    ``migrate(client, database)``. Returns the names of the migrations applied now."""
    if isinstance(settings_or_client, Settings):
        from metering.clickhouse.client import clickhouse_client

        settings = settings_or_client
        return migrate_client(
            clickhouse_client(settings.clickhouse_url),
            database or settings.clickhouse_database,
            retention_days=settings.clickhouse_retention_days,
        )
    if database is None:
        raise ValueError("migrate(client, database): the database name is required")
    return migrate_client(settings_or_client, database)


__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "RETENTION_TABLES",
    "Applied",
    "Migration",
    "NewerSchemaError",
    "apply_retention",
    "check_not_newer",
    "checked_database",
    "migrate",
    "migrate_client",
    "migrations",
    "retention_in_force",
    "view_cut",
    "wait_past_cut",
]

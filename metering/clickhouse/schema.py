"""The versioned ClickHouse schema: ``NNN_name.sql`` files applied in order, each once.

Applied versions are recorded in ``<database>.schema_migrations``; every statement is also
``IF NOT EXISTS``, so re-running (or a crash half-way through a file) is harmless. The files use
two placeholders, ``${database}`` and ``${retention_days}``, filled from validated settings
(never from request input). Tests: ``tests/integration/test_clickhouse_schema.py``.
"""

from __future__ import annotations

import re
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

    def statements(self, database: str, retention_days: int) -> list[str]:
        text = Template(self.sql).substitute(database=database, retention_days=retention_days)
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


def checked_database(database: str) -> str:
    """``database`` if it is a plain identifier (safe to put into SQL text), else ValueError."""
    if not isinstance(database, str) or not _DATABASE_RE.match(database):
        raise ValueError(f"ClickHouse database name {database!r} is not a plain identifier")
    return database


def migrate_client(client: Any, database: str, *, retention_days: int = 400) -> list[str]:
    """Apply the pending migrations to ``database`` through ``client``; return their names."""
    checked_database(database)
    if retention_days < 1:
        raise ValueError(f"retention_days must be at least 1, got {retention_days}")
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    versions = client.query(f"SELECT version FROM {database}.schema_migrations")  # noqa: S608
    done = {row[0] for row in versions.result_rows}
    applied = []
    for mig in migrations():
        if mig.version in done:
            continue
        for statement in mig.statements(database, retention_days):
            client.command(statement)
        client.insert(
            f"{database}.schema_migrations",
            [[mig.version, mig.name]],
            column_names=["version", "name"],
        )
        applied.append(f"{mig.version:03d}_{mig.name}")
    return applied


def migrate(settings_or_client: Settings | Any, database: str | None = None) -> list[str]:
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


__all__ = ["Migration", "checked_database", "migrate", "migrate_client", "migrations"]

"""Test data for the query tests: the real schema (``metering.clickhouse.schema.migrate``) and
events inserted into ``usage_events`` (the materialized views fill the rollups from them)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from metering.clickhouse.schema import migrate


def create_schema(client: Any, db: str) -> None:
    migrate(client, db)


@contextmanager
def scratch_database(client: Any) -> Iterator[str]:
    """A migrated database that lives for a ``with`` block (for module-scoped fixtures)."""
    name = f"q_{uuid.uuid4().hex[:12]}"
    client.command(f"CREATE DATABASE {name}")
    try:
        create_schema(client, name)
        yield name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")


def at(text: str) -> dt.datetime:
    """An aware datetime from RFC 3339 text (``2026-03-29T01:00:00Z``)."""
    return dt.datetime.fromisoformat(text)


class RecordingClient:
    """Passes everything to the real client and records the SQL of each query, so a test can
    show that a refused request ran nothing."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.queries: list[str] = []

    def query(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self.queries.append(sql)
        return self._client.query(sql, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def insert_events(client: Any, db: str, events: list[dict[str, Any]]) -> None:
    """Insert events (dicts with tenant, meter, time, quantity and optionally dimensions,
    decision, id) into ``usage_events``; the materialized views fill the rollups."""
    columns = ["id", "type", "source", "tenant", "meter", "decision", "billable", "time"]
    columns += ["quantity", "dimensions", "kafka_topic", "kafka_partition", "kafka_offset"]
    rows = []
    for n, ev in enumerate(events):
        decision = ev.get("decision", "")
        rows.append(
            [
                ev.get("id") or uuid.uuid4().hex,
                "metering.ratelimit" if decision else "metering.usage",
                "urn:test",
                ev["tenant"],
                ev["meter"],
                decision,
                0 if decision == "rejected" else 1,
                ev["time"],
                float(ev["quantity"]),
                ev.get("dimensions", {}),
                "usage.events",
                0,
                n,
            ]
        )
    client.insert(f"{db}.usage_events", rows, column_names=columns)

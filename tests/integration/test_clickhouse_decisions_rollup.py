"""``decisions_day`` (migration 007): the limiter's decisions per tenant and UTC day, which the
backfill and reconcile read. Its view takes the rows inserted from a cut on and the migration
fills the rows stored before it: every row counts once, on a database migrated with rows in it,
on a migration cut short and run again, with inserts running while it migrates, and with two
migrations at once."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import uuid

import pytest

from metering.clickhouse import schema
from metering.clickhouse.schema import migrate, migrate_client
from metering.clickhouse.totals import daily_allowed_decisions
from streams.sink import EVENT_COLUMNS, ClickHouseStorage, Record
from tests.integration.streams_support import produce, read_all, unique_topics
from tests.integration.test_streams_sink import make_sink, run_until_caught_up

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
_offsets = itertools.count()


def row(tenant: str, qty: float, decision: str = "allowed", **kw) -> list:  # type: ignore[no-untyped-def,type-arg]
    """A usage_events row: a limiter decision (or with ``decision=""`` a usage event)."""
    when = NOW - dt.timedelta(days=kw.get("days_ago", 0))
    dims = {"degraded": "true"} if kw.get("degraded") else {}
    typ = "metering.ratelimit" if decision else "metering.usage"
    billable = 0 if decision == "rejected" else 1
    meter = kw.get("meter", "requests")
    n = next(_offsets)
    return [f"e{n}", typ, "urn:t", tenant, meter, decision, billable, when, qty, dims, "t", 0, n]


def mixed_rows(tenant: str) -> list[list]:  # type: ignore[type-arg]
    return [
        row(tenant, 2),
        row(tenant, 3, meter="queries"),
        row(tenant, 50, "rejected"),
        row(tenant, 7, degraded=True),
        row(tenant, 100, ""),  # a usage event: not a decision
        row(tenant, 4, days_ago=1),
    ]


def expected_from_raw(client, db: str) -> dict[tuple[str, dt.date], float]:  # type: ignore[no-untyped-def]
    """The allowed decisions made by Redis per tenant and day, summed from usage_events."""
    rows = client.query(
        f"SELECT tenant, toDate(time) AS day, sum(quantity) FROM {db}.usage_events"
        " WHERE type = 'metering.ratelimit' AND decision = 'allowed'"
        " AND dimensions['degraded'] != 'true' GROUP BY tenant, day"
    ).result_rows
    return {(t, d): float(q) for t, d, q in rows}


def from_rollup(client, db: str) -> dict[tuple[str, dt.date], float]:  # type: ignore[no-untyped-def]
    since = (NOW - dt.timedelta(days=30)).date()
    return {(t, d): q for t, d, q in daily_allowed_decisions(client, db, since=since)}


def insert(client, db: str, rows: list[list]) -> None:  # type: ignore[no-untyped-def,type-arg]
    client.insert(f"{db}.usage_events", rows, column_names=EVENT_COLUMNS)


def migrate_up_to(client, db: str, version: int, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """``db`` as a release shipping migrations up to ``version`` left it."""
    shipped = schema.migrations()
    with monkeypatch.context() as m:
        m.setattr(schema, "migrations", lambda: [x for x in shipped if x.version <= version])
        migrate_client(client, db)


def view_definition(client, db: str) -> str:  # type: ignore[no-untyped-def]
    return str(
        client.query(
            "SELECT create_table_query FROM system.tables WHERE database = {d:String}"
            " AND name = 'decisions_day_mv'",
            parameters={"d": db},
        ).result_rows[0][0]
    )


def test_a_database_migrated_with_rows_counts_each_decision_once(
    clickhouse_client, clickhouse_db: str, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate_up_to(clickhouse_client, clickhouse_db, 6, monkeypatch)
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))  # stored before 007
    assert migrate(clickhouse_client, clickhouse_db) == ["007_decisions_day"]
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))  # through the view
    today, yesterday = NOW.date(), (NOW - dt.timedelta(days=1)).date()
    expected = {(tenant, today): 2 * 5.0, (tenant, yesterday): 2 * 4.0}
    assert expected_from_raw(clickhouse_client, clickhouse_db) == expected
    assert from_rollup(clickhouse_client, clickhouse_db) == expected
    # Every decision, rejected and degraded ones too: by the view, and by the fill.
    assert origins(clickhouse_client, clickhouse_db) == (5, 5)


def origins(client, db: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The decisions counted by the view, and by the fill of the rows stored before it."""
    viewed = client.query(f"SELECT sum(event_count) FROM {db}.decisions_day").result_rows[0][0]
    filled = client.query(
        f"SELECT sum(event_count) FROM {db}.decisions_day_filled FINAL"
    ).result_rows[0][0]
    return int(viewed), int(filled)


def test_a_migration_cut_short_runs_again_with_its_cut_and_counts_nothing_twice(
    clickhouse_client, clickhouse_db: str, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate_up_to(clickhouse_client, clickhouse_db, 6, monkeypatch)
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))
    migrate(clickhouse_client, clickhouse_db)
    made = view_definition(clickhouse_client, clickhouse_db)
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))
    # Killed after the fill, before 007 was recorded: the next start runs 007 again.
    clickhouse_client.command(
        f"ALTER TABLE {clickhouse_db}.schema_migrations DELETE WHERE version = 7"
        " SETTINGS mutations_sync = 2"
    )
    assert migrate(clickhouse_client, clickhouse_db) == ["007_decisions_day"]
    assert view_definition(clickhouse_client, clickhouse_db) == made  # the cut it was made with
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))
    expected = expected_from_raw(clickhouse_client, clickhouse_db)
    assert expected[(tenant, NOW.date())] == 3 * 5.0
    assert from_rollup(clickhouse_client, clickhouse_db) == expected


def test_rows_inserted_while_a_server_migrates_count_once(
    clickhouse_client, clickhouse_db: str, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ClickHouse server: workers of the release before keep inserting while 007 runs. The
    cut is set ahead of the clock and the fill waits past it; each row is the view's or the
    fill's by its own ``inserted_at``. (The embedded engine stands in for the server here, with
    a shorter wait.)"""
    migrate_up_to(clickhouse_client, clickhouse_db, 6, monkeypatch)
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))
    monkeypatch.setattr(schema, "_embedded", lambda client: False)
    monkeypatch.setattr(schema, "SERVER_CUT_SECONDS", 0.5)
    stop = threading.Event()
    batches = 0

    def keep_inserting() -> None:
        nonlocal batches
        while not stop.is_set():
            insert(clickhouse_client, clickhouse_db, [row(tenant, 1) for _ in range(20)])
            batches += 1

    worker = threading.Thread(target=keep_inserting)
    worker.start()
    try:
        assert migrate(clickhouse_client, clickhouse_db) == ["007_decisions_day"]
    finally:
        stop.set()
        worker.join(30)
    assert batches > 1
    viewed, filled = origins(clickhouse_client, clickhouse_db)
    assert filled > 5 and viewed > 0  # the inserts ran on both sides of the cut
    expected = expected_from_raw(clickhouse_client, clickhouse_db)
    assert expected[(tenant, NOW.date())] == 5 + 20 * batches
    assert from_rollup(clickhouse_client, clickhouse_db) == expected


def test_two_migrations_at_once_count_each_decision_once(
    clickhouse_client, clickhouse_db: str, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's case: two workers of the new release start together on a ClickHouse
    server, each migrating. Both ran 007; each deleted the fill rows and wrote its own, so the
    decisions stored before the upgrade counted twice, for good. Now the fill's totals replace
    each other, and the second run fills with the cut of the view the first one made."""
    migrate_up_to(clickhouse_client, clickhouse_db, 6, monkeypatch)
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))
    monkeypatch.setattr(schema, "_embedded", lambda client: False)
    monkeypatch.setattr(schema, "SERVER_CUT_SECONDS", 0.5)
    applied: list[list[str]] = []

    def run(delay: float) -> None:
        threading.Event().wait(delay)
        applied.append(migrate_client(clickhouse_client, clickhouse_db))

    runs = [threading.Thread(target=run, args=(d,)) for d in (0.0, 0.3)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(30)
    assert applied == [["007_decisions_day"], ["007_decisions_day"]]
    insert(clickhouse_client, clickhouse_db, mixed_rows(tenant))
    assert origins(clickhouse_client, clickhouse_db) == (5, 5)
    expected = expected_from_raw(clickhouse_client, clickhouse_db)
    assert expected[(tenant, NOW.date())] == 2 * 5.0
    assert from_rollup(clickhouse_client, clickhouse_db) == expected


def decision_message(tenant: str, qty: float, decision: str = "allowed") -> tuple[bytes, bytes]:
    from metering.events import decision_event, encode_event

    return tenant.encode(), encode_event(decision_event(tenant, decision == "allowed", cost=qty))


@pytest.mark.timeout(120)
async def test_a_crash_before_the_decisions_view_is_completed_on_restart(
    kafka_bootstrap: str, clickhouse_client, clickhouse_db: str
) -> None:
    """As the other rollups: a kill after usage_events and before this view leaves it short by
    the batch, and the next assignment completes it (``repair_unfinished_batch``)."""
    migrate(clickhouse_client, clickhouse_db)
    topic, dlq = unique_topics(kafka_bootstrap, partitions=1)
    tenant = f"cut-{uuid.uuid4().hex[:6]}"
    messages = [decision_message(tenant, 2) for _ in range(150)]
    messages += [decision_message(tenant, 5, "rejected") for _ in range(50)]
    produce(kafka_bootstrap, topic, messages)
    records = [
        Record(m.topic, m.partition, m.offset, m.key, m.value)
        for m in read_all(kafka_bootstrap, topic)
    ]
    first = make_sink(clickhouse_client, clickhouse_db, topic)
    first.write(first.prepare(records[:80]))
    clickhouse_client.command(f"DETACH TABLE {clickhouse_db}.decisions_day_mv")
    first.storage.insert_events(first.prepare(records[80:170]).rows())
    clickhouse_client.command(f"ATTACH TABLE {clickhouse_db}.decisions_day_mv")
    day = NOW.date()
    assert from_rollup(clickhouse_client, clickhouse_db) == {(tenant, day): 160.0}

    await run_until_caught_up(
        make_sink(clickhouse_client, clickhouse_db, topic), kafka_bootstrap, f"g-{topic}", dlq
    )
    assert from_rollup(clickhouse_client, clickhouse_db) == {(tenant, day): 300.0}
    counts = clickhouse_client.query(
        f"SELECT decision, sum(event_count), sum(quantity_sum) FROM {clickhouse_db}.decisions_day"
        " GROUP BY decision ORDER BY decision"
    ).result_rows
    assert counts == [("allowed", 150, 300.0), ("rejected", 50, 250.0)]
    assert (
        ClickHouseStorage(clickhouse_client, clickhouse_db).repair_unfinished_batch(topic, [0]) == 0
    )  # nothing left to complete

"""The hand-off ledger's ClickHouse side on the embedded engine: recorded ranges, the sums a
recovery recomputes from ``usage_events``, and migration 004's starting point for data stored
before it (the logic itself: ``tests/unit/test_streams_handoff.py``)."""

from __future__ import annotations

import datetime as dt

from metering.clickhouse.schema import migrate
from metering.events import decision_event, encode_event, usage_event
from streams.handoff import HandoffLedger, plan_recovery, record_claimed
from streams.sink import ClickHouseSink, ClickHouseStorage, Record

TOPIC = "usage.events"
T0 = dt.datetime.now(dt.UTC).replace(second=30, microsecond=0) - dt.timedelta(minutes=10)


def records(partition: int, start: int, n: int, tenant: str = "acme") -> list[Record]:
    out = []
    for i in range(start, start + n):
        if i % 5 == 4:  # a rejected decision: stored, never billed
            ev = decision_event(tenant, False, cost=7, time=T0)
        else:  # two minutes: offsets below 10 in T0's minute, the rest in the next one
            t = T0 + dt.timedelta(minutes=0 if i < 10 else 1)
            ev = usage_event(tenant, "requests", 2, time=t, id=f"p{partition}-{i}")
        out.append(Record(TOPIC, partition, i, tenant.encode(), encode_event(ev)))
    return out


def sink_on(client, db: str) -> ClickHouseSink:  # type: ignore[no-untyped-def]
    return ClickHouseSink(
        ClickHouseStorage(client, db), topic=TOPIC, lateness_seconds=3600, max_future_skew=300
    )


def test_recorded_ranges_and_the_sums_recovery_recomputes(clickhouse_client, clickhouse_db):  # type: ignore[no-untyped-def]
    migrate(clickhouse_client, clickhouse_db)
    sink = sink_on(clickhouse_client, clickhouse_db)
    storage = sink.storage
    assert isinstance(storage, ClickHouseStorage)
    sink.write(sink.prepare(records(0, 0, 20)))
    sink.write(sink.prepare(records(1, 0, 5, tenant="globex")))

    storage.record_handoffs(TOPIC, [(0, 0, 8), (1, 0, 5)])
    storage.record_handoffs(TOPIC, [(0, 8, 15)])
    assert storage.last_handoffs(TOPIC, [0, 1, 2]) == {0: (8, 15), 1: (0, 5)}
    assert storage.last_handoffs("other.topic", [0]) == {}

    minute = int(T0.timestamp()) // 60 * 60
    # offsets 8..14: 8 (T0), 9 (rejected), 10..13 (next minute), 14 (rejected)
    assert sorted(storage.billable_sums(TOPIC, 0, 8, 15)) == [
        ("acme", "requests", minute, 2.0),
        ("acme", "requests", minute + 60, 8.0),
    ]

    # A new owner of partition 0 at resume offset 20: resend [8, 15), open [15, 20).
    (plan,) = plan_recovery(storage, TOPIC, {0: 20})
    assert plan.resend is not None and (plan.resend.start, plan.resend.end) == (8, 15)
    assert sum(plan.resend.sums.values()) == 10.0
    assert (plan.open.start, plan.open.end, sum(plan.open.sums.values())) == (15, 20, 8.0)
    ledger = HandoffLedger(TOPIC)
    ledger.recover([plan])
    assert [(r.start, r.end) for r in ledger.unsent] == [(8, 15)]
    assert [(r.start, r.end) for r in ledger.take()] == [(15, 20)]


def test_migration_004_counts_rows_stored_before_it_as_handed_off(clickhouse_client, clickhouse_db):  # type: ignore[no-untyped-def]
    migrate(clickhouse_client, clickhouse_db)
    sink = sink_on(clickhouse_client, clickhouse_db)
    sink.write(sink.prepare(records(0, 0, 12)))
    sink.write(sink.prepare(records(3, 40, 3)))
    # As if the database predated version 4: its table empty and the version not applied.
    clickhouse_client.command(f"TRUNCATE TABLE {clickhouse_db}.aggregate_handoffs")
    clickhouse_client.command(
        f"ALTER TABLE {clickhouse_db}.schema_migrations DELETE WHERE version = 4"
        " SETTINGS mutations_sync = 1"
    )
    assert migrate(clickhouse_client, clickhouse_db) == ["004_aggregate_handoffs"]
    storage = ClickHouseStorage(clickhouse_client, clickhouse_db)
    assert storage.last_handoffs(TOPIC, [0, 1, 3]) == {0: (12, 12), 3: (43, 43)}
    # So a recovery resends nothing and opens only what is stored after that point.
    plans = plan_recovery(storage, TOPIC, {0: 12, 1: 0, 3: 43})
    assert all(p.resend is None or not p.resend.sums for p in plans)
    assert all(not p.open.sums for p in plans)


def test_claims_fence_a_previous_owners_ranges(clickhouse_client, clickhouse_db):  # type: ignore[no-untyped-def]
    """Each assignment claims its partitions with the next number (migration 006); a worker
    whose claim was superseded (evicted, then woken) records no range of them."""
    migrate(clickhouse_client, clickhouse_db)
    sink = sink_on(clickhouse_client, clickhouse_db)
    storage = sink.storage
    assert isinstance(storage, ClickHouseStorage)
    sink.write(sink.prepare(records(0, 0, 20)))
    (z,) = plan_recovery(storage, TOPIC, {0: 0}, "worker-z")
    assert z.claim == (1, "worker-z")
    zs = {0: z.claim}
    assert record_claimed(storage, TOPIC, [(0, 0, 8)], zs) == set()
    b, _ = plan_recovery(storage, TOPIC, {0: 20, 1: 0}, "worker-b")
    assert b.claim == (2, "worker-b")
    assert storage.claims(TOPIC, [0, 1, 2]) == {0: (2, "worker-b"), 1: (1, "worker-b")}
    # b read z's last range as final: z can record no more of partition 0, b can.
    assert b.resend is not None and (b.resend.start, b.resend.end) == (0, 8)
    assert record_claimed(storage, TOPIC, [(0, 8, 20)], zs) == {0}
    assert storage.last_handoffs(TOPIC, [0]) == {0: (0, 8)}
    assert record_claimed(storage, TOPIC, [(0, 8, 20)], {0: b.claim}) == set()
    assert storage.last_handoffs(TOPIC, [0]) == {0: (8, 20)}
    assert storage.claims("other.topic", [0]) == {}

"""The quota-DB backfill reads exact day totals from ClickHouse and upserts them: by default the
cost of each tenant's allowed limiter decisions on every meter (what the daily counter counts),
or one meter's billable usage."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from metering.clickhouse.schema import migrate
from metering.quota_db import QuotaStore
from metering.quota_db import migrate as migrate_quota_db
from streams.backfill import Backfill
from streams.sink import EVENT_COLUMNS

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def row(  # type: ignore[no-untyped-def]
    i: int,
    tenant: str,
    meter: str,
    qty: float,
    *,
    decision: str = "",
    days_ago: int = 0,
    dimensions: dict[str, str] | None = None,
):
    t = NOW - dt.timedelta(days=days_ago)
    billable = 0 if decision == "rejected" else 1
    typ = "metering.ratelimit" if decision else "metering.usage"
    dims = dimensions or {}
    return [f"e{i}", typ, "urn:t", tenant, meter, decision, billable, t, qty, dims, "t", 0, i]


def test_backfill_upserts_billable_request_totals_of_open_days_and_repeats_idempotently(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    rows = [row(i, tenant, "requests", 2, decision="allowed") for i in range(10)]  # 20
    rows += [row(10 + i, tenant, "requests", 5, decision="rejected") for i in range(3)]  # never
    rows += [row(20, tenant, "tokens", 1000)]  # another meter
    rows += [row(21, tenant, "requests", 7, days_ago=3)]  # a closed day
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows, column_names=EVENT_COLUMNS)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    backfill = Backfill(
        clickhouse_client, clickhouse_db, store, meter="requests", lateness_seconds=3600
    )

    assert backfill.run_once(NOW) == 1  # only today is still open
    assert backfill.run_once(NOW) == 0  # unchanged: not written again
    assert backfill.run_once(NOW + backfill.rewrite_every) == 1  # a full round writes it again
    assert store.daily_usage(tenant, NOW.date()) == 20
    assert store.daily_usage(tenant, (NOW - dt.timedelta(days=3)).date()) == 0


def _day_end(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def test_an_event_accepted_as_its_day_closes_still_reaches_the_quota_db(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    """The sink accepts an event at 23:59:59 until the lateness has passed; it is inserted a
    batch later, and the round after that reads its day though the lateness ran out."""
    migrate(clickhouse_client, clickhouse_db)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    lateness = 3600.0
    day = (NOW - dt.timedelta(days=5)).date()
    late = row(1, tenant, "requests", 7, decision="allowed")
    late[EVENT_COLUMNS.index("time")] = _day_end(day) - dt.timedelta(seconds=1)
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", [late], column_names=EVENT_COLUMNS)
    backfill = Backfill(
        clickhouse_client, clickhouse_db, store, meter="requests", lateness_seconds=lateness
    )
    # Accepted at the last second of its lateness, inserted and read 5 s later.
    now = _day_end(day) + dt.timedelta(seconds=lateness + 5)
    assert backfill.run_once(now) == 1
    assert store.daily_usage(tenant, day) == 7
    # Once the margin has passed too, the day is no longer read.
    later = now + backfill.margin
    assert backfill.run_once(later) == 0


class FailingOnce:
    """The real quota store, whose next upsert fails (the database unreachable for a round)."""

    def __init__(self, store: QuotaStore) -> None:
        self.store = store
        self.fail = True

    def upsert_daily_usage(self, rows, measure=None, **kw):  # type: ignore[no-untyped-def]
        if self.fail:
            self.fail = False
            raise ConnectionError("quota DB unreachable")
        return self.store.upsert_daily_usage(rows, measure, **kw)


def test_a_day_whose_last_round_failed_is_read_by_the_next_round(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    migrate(clickhouse_client, clickhouse_db)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    day = (NOW - dt.timedelta(days=5)).date()
    event = row(1, tenant, "requests", 9, decision="allowed")
    event[EVENT_COLUMNS.index("time")] = _day_end(day) - dt.timedelta(minutes=1)
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", [event], column_names=EVENT_COLUMNS)
    failing = FailingOnce(store)
    backfill = Backfill(
        clickhouse_client, clickhouse_db, failing, meter="requests", lateness_seconds=3600
    )
    closes = _day_end(day) + backfill.lateness + backfill.margin
    with pytest.raises(ConnectionError):
        backfill.run_once(closes - dt.timedelta(seconds=1))  # the day's last round fails
    assert store.daily_usage(tenant, day) == 0
    # The next round, after the day closed, still reads it (alone, it would not).
    assert backfill.open_since(closes + dt.timedelta(seconds=4)) > day
    assert backfill.run_once(closes + dt.timedelta(seconds=4)) == 1
    assert store.daily_usage(tenant, day) == 9
    assert backfill.run_once(closes + dt.timedelta(seconds=9)) == 0


def test_a_round_writes_only_the_totals_that_changed_and_a_full_round_puts_edits_right(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    """The scale audit's case: every round rewrote every open tenant-day (60,000 rows every
    5 s, in the thread the sink inserts from). Now a round writes the totals that changed; every
    ``rewrite_seconds`` a round writes them all, which puts a quota DB restored or edited
    meanwhile right again."""
    migrate(clickhouse_client, clickhouse_db)
    tenants = [f"{tenant}-{i}" for i in range(5)]
    insert = f"{clickhouse_db}.usage_events"
    rows = [row(i, t, "requests", 1, decision="allowed") for i, t in enumerate(tenants)]
    clickhouse_client.insert(insert, rows, column_names=EVENT_COLUMNS)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    backfill = Backfill(
        clickhouse_client,
        clickhouse_db,
        store,
        meter="requests",
        lateness_seconds=3600,
        rewrite_seconds=60,
    )
    assert backfill.run_once(NOW) == 5
    assert backfill.run_once(NOW + dt.timedelta(seconds=5)) == 0
    more = [row(10, tenants[2], "requests", 4, decision="allowed")]
    clickhouse_client.insert(insert, more, column_names=EVENT_COLUMNS)
    assert backfill.run_once(NOW + dt.timedelta(seconds=10)) == 1  # the one that grew
    assert store.daily_usage(tenants[2], NOW.date()) == 5

    # A quota DB put back to an older state (a restore): the next full round rewrites it.
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM tenant_daily_usage WHERE tenant = ?", (tenants[0],))
    assert backfill.run_once(NOW + dt.timedelta(seconds=15)) == 0
    assert store.daily_usage(tenants[0], NOW.date()) == 0
    assert backfill.run_once(NOW + dt.timedelta(seconds=60)) == 5
    assert [store.daily_usage(t, NOW.date()) for t in tenants] == [1, 1, 5, 1, 1]


def test_a_total_is_what_the_daily_counter_counts_allowed_decisions_of_every_meter(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    """The audits' case: with routes sent to other meters (RATE_LIMIT_ROUTE_METERS), the backfill
    summed one meter and a lost counter was re-seeded too low; a tenant's own usage events on
    meter ``requests`` were added to the seed. The daily counter counts the cost of every allowed
    decision made by Redis, whatever its meter, and nothing else."""
    migrate(clickhouse_client, clickhouse_db)
    degraded = {"degraded": "true", "reason": "redis_down"}
    rows = [
        row(1, tenant, "requests", 3, decision="allowed"),
        row(2, tenant, "queries", 5, decision="allowed"),  # another route's meter: counted
        row(3, tenant, "queries", 2, decision="allowed", dimensions={"shadow": "true"}),
        row(4, tenant, "requests", 40, decision="rejected"),  # changed no counter
        row(5, tenant, "requests", 11, decision="allowed", dimensions=degraded),  # no Redis
        row(6, tenant, "requests", 500),  # the tenant's own usage event: billed, not limited
        row(7, tenant, "requests", 4, decision="allowed", days_ago=1),  # yesterday
    ]
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows, column_names=EVENT_COLUMNS)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    backfill = Backfill(clickhouse_client, clickhouse_db, store, lateness_seconds=3 * 86400)
    assert backfill.measure == "decisions"
    assert backfill.run_once(NOW) == 2
    assert store.daily_usage(tenant, NOW.date()) == 3 + 5 + 2
    assert store.daily_usage(tenant, (NOW - dt.timedelta(days=1)).date()) == 4


def test_the_meter_measure_keeps_one_meters_billable_usage(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    """WORKER_BACKFILL_MEASURE=meter: services that meter with usage events of their own."""
    migrate(clickhouse_client, clickhouse_db)
    rows = [
        row(1, tenant, "requests", 3, decision="allowed"),
        row(2, tenant, "queries", 5, decision="allowed"),  # another meter: not counted
        row(3, tenant, "requests", 40, decision="rejected"),  # never billable
        row(4, tenant, "requests", 500),  # a usage event of the meter: counted
    ]
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows, column_names=EVENT_COLUMNS)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    backfill = Backfill(
        clickhouse_client,
        clickhouse_db,
        store,
        meter="requests",
        measure="meter",
        lateness_seconds=3600,
    )
    assert backfill.run_once(NOW) == 1
    assert store.daily_usage(tenant, NOW.date()) == 503


def test_totals_of_another_measure_are_replaced_not_only_ever_raised(
    clickhouse_client, clickhouse_db: str, tenant: str, tmp_path: Path
) -> None:
    """The review's case: the release before wrote meter ``requests``' billable usage (a
    tenant's own usage events included), and the quota DB only ever raised a total, so after the
    upgrade the larger old totals stayed: a lost counter was re-seeded with them, and reconcile
    reported drift on every day before. A worker's first round now replaces the totals of
    another measure, up to ``catch_up_days`` back; then totals only grow again."""
    migrate(clickhouse_client, clickhouse_db)
    closed = (NOW - dt.timedelta(days=3)).date()
    rows = [row(1, tenant, "requests", 10, decision="allowed")]
    rows += [row(2, tenant, "requests", 45, decision="allowed", days_ago=3)]
    clickhouse_client.insert(f"{clickhouse_db}.usage_events", rows, column_names=EVENT_COLUMNS)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    migrate_quota_db(url)
    store = QuotaStore(url)
    # As the release before left them: no measure recorded, and larger. The second review's
    # case: a tenant whose day had only its own usage events has no decisions total at all, and
    # its old total stayed (the seed of its lost counter: 500).
    only_usage = f"{tenant}-u"
    store.upsert_daily_usage(
        [(tenant, NOW.date(), 510), (tenant, closed, 205), (only_usage, NOW.date(), 500)]
    )
    backfill = Backfill(clickhouse_client, clickhouse_db, store, lateness_seconds=3600)
    assert backfill.run_once(NOW) == 2
    assert store.daily_usage(tenant, NOW.date()) == 10
    assert store.daily_usage(tenant, closed) == 45
    assert store.daily_usage(only_usage, NOW.date()) == 0
    assert store.earliest_day_of_another_measure("decisions", closed) is None
    # Of the same measure, a smaller total (a slower worker's round) never moves it back.
    store.upsert_daily_usage([(tenant, NOW.date(), 4)], measure="decisions")
    assert store.daily_usage(tenant, NOW.date()) == 10
    # WORKER_BACKFILL_MEASURE changed: the next worker replaces them again.
    metered = Backfill(
        clickhouse_client,
        clickhouse_db,
        store,
        meter="requests",
        measure="meter",
        lateness_seconds=3600,
    )
    assert metered.measure_key == "meter:requests"
    assert metered.run_once(NOW) == 2
    assert store.earliest_day_of_another_measure("meter:requests", closed) is None

"""The quota DB on SQLite and on a real PostgreSQL (each test runs on both, on an empty DB)."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from metering.ids import InvalidIdentifier
from metering.plans import QuotaError, plan_limits
from metering.quota_db import QuotaStore, make_engine, migrate
from tests.conftest import fresh_postgres_database

DAY = dt.date(2026, 11, 28)


@pytest.fixture
def store(quota_db_url: str) -> QuotaStore:
    migrate(quota_db_url)
    s = QuotaStore(quota_db_url)
    yield s
    s.close()


def test_migrations_build_both_tables_from_empty_and_run_again_harmlessly(
    quota_db_url: str,
) -> None:
    assert migrate(quota_db_url) == "0002"
    assert migrate(quota_db_url) == "0002"
    engine = make_engine(quota_db_url)
    try:
        insp = inspect(engine)
        assert {"tenants", "tenant_daily_usage", "alembic_version"} <= set(insp.get_table_names())
        assert {c["name"] for c in insp.get_columns("tenants")} == {
            "id", "plan", "rate_per_sec", "burst", "daily_limit", "window_limit",
            "window_seconds", "version", "created_at", "updated_at",
        }  # fmt: skip
        assert insp.get_pk_constraint("tenant_daily_usage")["constrained_columns"] == [
            "tenant",
            "day",
        ]
    finally:
        engine.dispose()


def test_a_tenant_is_created_read_listed_changed_and_deleted(store: QuotaStore) -> None:
    created = store.set_quota(
        "acme", rate_per_sec=2.5, burst=5, daily_limit=1000, window_limit=100, window_seconds=60
    )
    assert (created.plan, created.version) == ("custom", 1)
    got = store.get_tenant("acme")
    assert got is not None
    assert (got.limits.rate_per_sec, got.limits.burst, got.limits.daily_limit) == (2.5, 5, 1000)
    assert (got.limits.window_limit, got.limits.window_seconds) == (100, 60)
    assert got.created_at is not None and got.created_at.tzinfo is not None

    changed = store.set_quota("acme", burst=8)
    assert changed.version == 2
    assert (changed.limits.burst, changed.limits.daily_limit) == (8, 1000)  # the rest is kept
    assert changed.updated_at >= changed.created_at  # type: ignore[operator]

    store.set_quota("beta", plan="pro")
    assert [r.tenant for r in store.list_tenants()] == ["acme", "beta"]

    assert store.delete_tenant("acme") is True
    assert store.get_tenant("acme") is None
    assert store.delete_tenant("acme") is False


def test_naming_a_plan_takes_its_defaults_and_explicit_limits_override_them(
    store: QuotaStore,
) -> None:
    rec = store.set_quota("acme", plan="enterprise", daily_limit=42)
    ent = plan_limits("enterprise")
    assert rec.plan == "enterprise"
    assert (rec.limits.rate_per_sec, rec.limits.burst) == (ent.rate_per_sec, ent.burst)
    assert rec.limits.daily_limit == 42
    assert rec.limits.window_limit == ent.window_limit
    cleared = store.set_quota("acme", window_limit=None, window_seconds=None)
    assert (cleared.limits.window_limit, cleared.limits.window_seconds) == (None, None)
    assert cleared.plan == "enterprise"


def test_daily_usage_upserts_absolute_totals_idempotently(store: QuotaStore) -> None:
    assert store.daily_usage("acme", DAY) == 0
    rows = [("acme", DAY, 900), ("acme", DAY + dt.timedelta(days=1), 5), ("beta", DAY, 1.5)]
    assert store.upsert_daily_usage(rows) == 3
    assert store.upsert_daily_usage(rows) == 3  # a replayed batch changes nothing
    assert store.daily_usage("acme", DAY) == 900
    assert store.daily_usage("beta", DAY) == 2  # fractions round up: never under-seed a day
    store.upsert_daily_usage([("acme", DAY, 950)])  # a later total replaces the earlier one
    assert store.daily_usage("acme", DAY) == 950
    assert store.upsert_daily_usage([]) == 0


def test_a_total_of_another_measure_is_replaced_and_then_only_raised(store: QuotaStore) -> None:
    """An upgrade (or WORKER_BACKFILL_MEASURE changed) totals something else: the old totals
    must not stay because they are larger; within one measure a total still only grows."""
    later = DAY + dt.timedelta(days=2)
    store.upsert_daily_usage([("acme", DAY, 510), ("acme", later, 7)])  # measure not recorded
    assert store.earliest_day_of_another_measure("decisions", DAY) == DAY
    store.upsert_daily_usage([("acme", DAY, 10)], measure="decisions")
    assert store.daily_usage("acme", DAY) == 10
    assert store.earliest_day_of_another_measure("decisions", DAY) == later
    store.upsert_daily_usage([("acme", DAY, 4)], measure="decisions")
    assert store.daily_usage("acme", DAY) == 10
    store.upsert_daily_usage([("acme", DAY, 3)])  # without a measure: as before, only raises
    assert store.daily_usage("acme", DAY) == 10
    store.upsert_daily_usage([("acme", DAY, 8)], measure="meter:requests")
    assert store.daily_usage("acme", DAY) == 8
    assert store.earliest_day_of_another_measure("meter:requests", later) == later


def test_a_smaller_total_from_an_older_round_never_moves_a_day_back(store: QuotaStore) -> None:
    """Two workers back-fill every tenant. Worker A reads a day's total of 10; 5 more arrive;
    worker B reads 15 and writes it; then A's write of 10 lands. The stored total used to drop
    to 10 (what a lost Redis day counter would then be seeded from) until the next round."""
    store.upsert_daily_usage([("acme", DAY, 15)])  # B
    store.upsert_daily_usage([("acme", DAY, 10), ("beta", DAY, 3)])  # A, late
    assert store.daily_usage("acme", DAY) == 15
    assert store.daily_usage("beta", DAY) == 3
    store.upsert_daily_usage([("acme", DAY, 16.5)])
    assert store.daily_usage("acme", DAY) == 17


def test_a_total_written_again_unchanged_keeps_its_row_as_it_was(store: QuotaStore) -> None:
    """``updated_at`` says when a day's total last grew; an unchanged or smaller total is not
    written (on PostgreSQL, no dead row version per tenant-day and round)."""

    def stored() -> tuple[float, dt.datetime]:
        with store.engine.connect() as conn:
            used, at = conn.execute(
                text("SELECT used, updated_at FROM tenant_daily_usage WHERE tenant = 'acme'")
            ).one()
        return float(used), at

    store.upsert_daily_usage([("acme", DAY, 7)])
    first = stored()
    store.upsert_daily_usage([("acme", DAY, 7)])
    store.upsert_daily_usage([("acme", DAY, 6)])
    assert stored() == first
    store.upsert_daily_usage([("acme", DAY, 9)])
    assert stored()[0] == 9


@pytest.mark.parametrize(
    ("tenant", "changes", "error", "message"),
    [
        ("acme", {"plan": "gold"}, QuotaError, "unknown plan 'gold'"),
        ("acme", {"rate_per_sec": -1, "burst": 5, "daily_limit": 10}, QuotaError, "rate_per_sec"),
        ("acme", {"rate_per_sec": 1, "burst": 5, "daily_limit": -10}, QuotaError, "daily_limit"),
        ("acme", {"rate_per_sec": 1}, QuotaError, "burst, daily_limit required"),
        ("a" * 65, {"plan": "pro"}, InvalidIdentifier, "invalid tenant id"),
        ("bad id", {"plan": "pro"}, InvalidIdentifier, "invalid tenant id"),
    ],
)
def test_bad_input_is_refused_with_the_reason_and_nothing_is_stored(
    store: QuotaStore, tenant: str, changes: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        store.set_quota(tenant, **changes)
    assert store.list_tenants() == []


def test_bad_usage_rows_are_refused_before_any_is_written(store: QuotaStore) -> None:
    with pytest.raises(QuotaError, match="used must be finite and >= 0"):
        store.upsert_daily_usage([("acme", DAY, 1), ("beta", DAY, -5)])
    with pytest.raises(InvalidIdentifier):
        store.upsert_daily_usage([("no spaces", DAY, 1)])
    assert store.daily_usage("acme", DAY) == 0


def test_the_schema_itself_refuses_a_negative_limit_written_around_the_code(
    store: QuotaStore,
) -> None:
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tenants (id, plan, rate_per_sec, burst, daily_limit, version, "
                "created_at, updated_at) VALUES ('x', 'custom', 1, 1, -5, 1, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )


def test_a_plain_postgresql_url_uses_the_installed_psycopg_driver(postgres_url: str) -> None:
    for url in fresh_postgres_database(postgres_url):
        plain = "postgresql://" + url.split("://", 1)[1]
        assert migrate(plain) == "0002"
        store = QuotaStore(plain)
        assert store.engine.dialect.driver == "psycopg"
        assert store.list_tenants() == []
        store.close()


def test_quota_changes_at_once_run_one_after_the_other_each_whole(store: QuotaStore) -> None:
    """The operators audit, on SQLite (the default): two admins' PUTs at once both read
    version n and both wrote n+1, and the row became a mix of the two (one's rate, the
    other's burst), a quota nobody sent, enforced as such. Each change must get its own
    version, and the stored row must be the newest change whole."""
    import threading

    store.set_quota("acme", rate_per_sec=50, burst=100, daily_limit=1000)
    changes = [(float(1 + i), 10 + i, 100 + i) for i in range(8)]
    barrier = threading.Barrier(len(changes))
    results: list[tuple[int, float, int, int]] = []
    errors: list[BaseException] = []

    def change(rate: float, burst: int, daily: int) -> None:
        try:
            barrier.wait()
            rec = store.set_quota("acme", rate_per_sec=rate, burst=burst, daily_limit=daily)
            results.append((rec.version, rec.limits.rate_per_sec, rec.limits.burst, daily))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=change, args=c) for c in changes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    versions = sorted(v for v, *_ in results)
    assert versions == list(range(2, 2 + len(changes))), versions
    newest = max(results)
    stored = store.get_tenant("acme")
    assert stored is not None and stored.version == newest[0]
    assert (stored.limits.rate_per_sec, stored.limits.burst, stored.limits.daily_limit) == (
        newest[1],
        newest[2],
        newest[3],
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_run_at_once_on_a_fresh_db_both_succeed(
    backend: str, tmp_path, services
) -> None:
    """The operators audit: two `metering db migrate` (or two workers starting, which migrate)
    at once on a fresh PostgreSQL database: one failed in 3 of 9 runs ("duplicate key value
    violates unique constraint pg_type_typname_nsp_index"). Four at once, five fresh DBs."""
    import threading

    for round_ in range(5):
        if backend == "sqlite":
            urls = iter([f"sqlite:///{tmp_path / f'quota-{round_}.db'}"])
        else:
            urls = fresh_postgres_database(services.postgres_url())
        url = next(urls)
        barrier = threading.Barrier(4)
        reached: list[str | None] = []
        errors: list[BaseException] = []

        def run(
            url: str = url,
            barrier: threading.Barrier = barrier,
            reached: list[str | None] = reached,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                barrier.wait()
                reached.append(migrate(url))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        next(urls, None)  # drops the PostgreSQL database
        assert not errors, (round_, errors)
        assert reached == ["0002"] * 4

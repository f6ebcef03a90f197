"""The quota database: tenants with their limits, and each tenant's backfilled daily usage.

SQLite (the default ``QUOTA_DB_URL``) and PostgreSQL run the same models and the same Alembic
migrations (:func:`migrate`). Invariants:

- every tenant id is validated (:func:`metering.ids.validate_tenant_id`) and every set of limits
  checked (:func:`metering.plans.check_limits`) before it reaches SQL;
- ``tenants.version`` grows by one on every change, so caches can refuse an older answer that
  arrives after a newer one;
- ``tenant_daily_usage`` holds absolute totals written by the worker: the upsert on
  (tenant, day) is idempotent, and replaying a batch changes nothing.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    Engine,
    Integer,
    String,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from metering.ids import TENANT_ID_MAX, validate_tenant_id
from metering.plans import Limits, QuotaError, check_limits, get_plan
from metering.settings import SettingsError

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
#: Seconds a PostgreSQL connect or statement may take: a slow database fails fast, and callers
#: (the quota cache) serve the last known answer instead of waiting.
PG_TIMEOUT_SECONDS: Final = 3


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("rate_per_sec > 0", name="ck_tenants_rate_positive"),
        CheckConstraint("burst >= 1", name="ck_tenants_burst_positive"),
        CheckConstraint("daily_limit >= 1", name="ck_tenants_daily_positive"),
        CheckConstraint(
            "(window_limit IS NULL) = (window_seconds IS NULL)", name="ck_tenants_window_pair"
        ),
    )

    id: Mapped[str] = mapped_column(String(TENANT_ID_MAX), primary_key=True)
    plan: Mapped[str] = mapped_column(String(32), nullable=False)
    rate_per_sec: Mapped[float] = mapped_column(Double, nullable=False)
    burst: Mapped[int] = mapped_column(BigInteger, nullable=False)
    daily_limit: Mapped[int] = mapped_column(BigInteger, nullable=False)
    window_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    window_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class DailyUsageRow(Base):
    __tablename__ = "tenant_daily_usage"

    tenant: Mapped[str] = mapped_column(String(TENANT_ID_MAX), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    used: Mapped[float] = mapped_column(Double, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    #: what ``used`` counts (:func:`metering.clickhouse.totals.measure_key`); NULL: written
    #: before revision 0002, by a release that totalled WORKER_BACKFILL_METER's billable usage
    measure: Mapped[str | None] = mapped_column(String(80), nullable=True)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """A tenant's row as the rest of the product sees it."""

    tenant: str
    plan: str
    limits: Limits
    version: int
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "plan": self.plan,
            "rate_per_sec": self.limits.rate_per_sec,
            "burst": self.limits.burst,
            "daily_limit": self.limits.daily_limit,
            "window_limit": self.limits.window_limit,
            "window_seconds": self.limits.window_seconds,
            "version": self.version,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def _record(row: TenantRow) -> TenantRecord:
    def aware(t: dt.datetime) -> dt.datetime:  # SQLite returns naive datetimes
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)

    return TenantRecord(
        tenant=row.id,
        plan=row.plan,
        limits=Limits(
            row.rate_per_sec, row.burst, row.daily_limit, row.window_limit, row.window_seconds
        ),
        version=row.version,
        created_at=aware(row.created_at),
        updated_at=aware(row.updated_at),
    )


# --- engines -------------------------------------------------------------------------------------
def normalize_url(url: str | URL) -> URL:
    """``postgresql://`` means psycopg 3 here (the driver the project installs)."""
    u = make_url(url)
    if u.drivername in {"postgresql", "postgres"}:
        u = u.set(drivername="postgresql+psycopg")
    if u.drivername.split("+", 1)[0] not in {"sqlite", "postgresql"}:
        raise QuotaError(f"quota DB URL must be sqlite:/// or postgresql://, not {u.drivername}://")
    return u


def make_engine(url: str | URL, *, timeouts: bool = True) -> Engine:
    """An engine for the quota DB; with ``timeouts``, PostgreSQL calls are bounded in time."""
    u = normalize_url(url)
    if u.drivername.startswith("sqlite"):
        if u.database in (None, "", ":memory:"):
            return create_engine(u, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        folder = Path(u.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            shown = url if isinstance(url, str) else u.render_as_string(hide_password=True)
            why = "not a folder" if isinstance(exc, FileExistsError) else exc.strerror or exc
            raise SettingsError(
                f"invalid setting(s): QUOTA_DB_URL={shown!r}: cannot make the folder of the"
                f" SQLite file, {folder} ({why})"
            ) from None
        engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 5})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=5000")
            # Readers never wait for the worker's upserts. The switch to WAL of a file just
            # made does not wait on SQLite's busy handler: with several processes starting on
            # a fresh file at once (migrations), it failed "database is locked" at once.
            deadline = time.monotonic() + 5
            while True:
                try:
                    cur.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            cur.close()

        return engine
    connect_args: dict[str, Any] = {}
    if timeouts:
        connect_args = {
            "connect_timeout": PG_TIMEOUT_SECONDS,
            "options": f"-c statement_timeout={PG_TIMEOUT_SECONDS * 1000}",
        }
    return create_engine(u, connect_args=connect_args, pool_pre_ping=True)


class NewerRevisionError(RuntimeError):
    """The quota DB is at a revision this release does not ship: a newer release migrated it
    (a deploy rolled back). Alembic cannot migrate from it, and the models may not match it."""

    def __init__(self, found: str, known: str) -> None:
        self.found = f"revision {found}"
        self.known = known
        super().__init__(
            f"the quota DB is at {self.found}, newer than this release knows ({self.known}): "
            "deploy the newer release"
        )


def transactional_ddl(engine: Engine) -> Engine:
    """Make ``engine``'s transactions cover DDL on SQLite (SQLAlchemy's pysqlite recipe).

    Python's sqlite3 runs ``CREATE TABLE`` outside any transaction, so a migration killed
    half-way would leave tables no later run can create again. Here the driver's own BEGIN is
    off and each transaction starts with ``BEGIN IMMEDIATE``: a killed migration rolls back
    whole, and a concurrent one waits for the write lock (``busy_timeout``), then finds the
    work done. PostgreSQL's DDL is transactional already: its engine is returned unchanged.
    """
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _refuse_unknown_revision(conn: Any, script: Any) -> None:
    """Raise :class:`NewerRevisionError` when the DB is at a revision ``script`` lacks."""
    from alembic.runtime.migration import MigrationContext

    known = {rev.revision for rev in script.walk_revisions()}
    for current in MigrationContext.configure(conn).get_current_heads():
        if current not in known:
            raise NewerRevisionError(current, ", ".join(script.get_heads()) or "none")


def _script_directory() -> Any:
    """The Alembic scripts shipped in the package, without an ``alembic.ini``."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg)


def check_revision(url: str | URL) -> None:
    """Raise :class:`NewerRevisionError` if the quota DB at ``url`` is at a revision this release
    does not ship. Reads ``alembic_version`` only: a DB not migrated has no revision to refuse,
    and an SQLite file not made yet is left unmade."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and not (u.database and Path(u.database).is_file()):
        return
    engine = make_engine(u)
    try:
        with engine.connect() as conn:
            _refuse_unknown_revision(conn, _script_directory())
    finally:
        engine.dispose()


#: The PostgreSQL advisory lock ``migrate`` holds (any constant of its own: "metering" in ASCII).
_MIGRATE_LOCK_KEY = 0x6D65746572696E67


def migrate(url: str | URL, revision: str = "head") -> str | None:
    """Bring the quota DB at ``url`` to ``revision`` (idempotent); return the revision reached.

    Needs no ``alembic.ini``: the configuration is built here and the scripts ship inside the
    package (``metering/migrations``). One transaction, DDL included
    (:func:`transactional_ddl`). A DB at a revision this release does not ship raises
    :class:`NewerRevisionError`.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    engine = transactional_ddl(make_engine(url, timeouts=False))
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Workers migrate on every start: on a fresh database two at once both created
                # the tables, and one failed on PostgreSQL's catalog (a duplicate type name).
                # The lock, held to this transaction's end, makes the second wait and then
                # find the work done (SQLite: the BEGIN IMMEDIATE of transactional_ddl).
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATE_LOCK_KEY})")
            _refuse_unknown_revision(conn, ScriptDirectory.from_config(cfg))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


_KEEP: Any = object()


class QuotaStore:
    """Tenants and daily usage in the quota DB. Thread-safe (one engine, a session per call)."""

    def __init__(self, url: str | URL | None = None, *, engine: Engine | None = None) -> None:
        if engine is None:
            if url is None:
                raise ValueError("QuotaStore needs a URL or an engine")
            engine = make_engine(url)
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # A quota change reads the row, then writes it. PostgreSQL locks the row for that
        # (SELECT ... FOR UPDATE); SQLite ignores FOR UPDATE and its driver begins the
        # transaction only at the first write, so two changes at once both read version n,
        # both wrote n+1, and the row became a column-by-column mix of the two (the operators
        # audit: 37 of 40 races). On an SQLite file, changes go through a second engine whose
        # transactions begin with BEGIN IMMEDIATE (the write lock, waited for up to the
        # busy_timeout), so they run one after the other; reads keep the shared engine.
        self._writer: Engine | None = None
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            self._writer = transactional_ddl(make_engine(engine.url))
        self._write_sessions = (
            sessionmaker(self._writer, expire_on_commit=False)
            if self._writer is not None
            else self._sessions
        )

    @classmethod
    def from_settings(cls, settings: Any) -> QuotaStore:
        return cls(settings.quota_db_url)

    def close(self) -> None:
        self.engine.dispose()
        if self._writer is not None:
            self._writer.dispose()

    @contextmanager
    def _session(self, *, writes: bool = False) -> Iterator[Session]:
        """A transaction; ``writes``: one that reads rows to change them (serialised on
        SQLite, see ``__init__``)."""
        sessions = self._write_sessions if writes else self._sessions
        with sessions() as session, session.begin():
            yield session

    # --- tenants ---------------------------------------------------------------------------------
    def get_tenant(self, tenant: str) -> TenantRecord | None:
        validate_tenant_id(tenant)
        with self._session() as s:
            row = s.get(TenantRow, tenant)
            return _record(row) if row else None

    def list_tenants(self) -> list[TenantRecord]:
        with self._session() as s:
            return [_record(r) for r in s.scalars(select(TenantRow).order_by(TenantRow.id))]

    def set_quota(
        self,
        tenant: str,
        *,
        plan: str | None = None,
        rate_per_sec: float | None = None,
        burst: int | None = None,
        daily_limit: int | None = None,
        window_limit: int | None = _KEEP,
        window_seconds: int | None = _KEEP,
    ) -> TenantRecord:
        """Create or change a tenant; return the stored record (version bumped on change).

        Limits not given keep their value: from ``plan``'s defaults when a plan is named, else
        from the tenant's row, else they are required. ``window_limit=None`` (with
        ``window_seconds=None``) removes the rolling window. Raises :class:`QuotaError` for an
        unknown plan or a bad limit, :class:`metering.ids.InvalidIdentifier` for a bad id.
        """
        validate_tenant_id(tenant)
        if plan is not None:
            get_plan(plan)
        for attempt in range(2):  # a concurrent first insert of the same tenant: retry as update
            try:
                with self._session(writes=True) as s:
                    row = s.get(TenantRow, tenant, with_for_update=True)
                    chosen = plan or (row.plan if row else "custom")
                    defaults = get_plan(chosen).limits if plan else None
                    if defaults is None and row is not None:
                        defaults = _record(row).limits
                    limits = _merge(
                        defaults,
                        rate_per_sec,
                        burst,
                        daily_limit,
                        window_limit,
                        window_seconds,
                    )
                    now = _utcnow()
                    if row is None:
                        row = TenantRow(id=tenant, version=1, created_at=now)
                        s.add(row)
                    else:
                        row.version += 1
                    row.plan = chosen
                    row.rate_per_sec = limits.rate_per_sec
                    row.burst = limits.burst
                    row.daily_limit = limits.daily_limit
                    row.window_limit = limits.window_limit
                    row.window_seconds = limits.window_seconds
                    row.updated_at = now
                    s.flush()
                    return _record(row)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def delete_tenant(self, tenant: str) -> bool:
        """Remove a tenant's row (its usage stays); True if there was one."""
        validate_tenant_id(tenant)
        with self._session(writes=True) as s:
            row = s.get(TenantRow, tenant)
            if row is None:
                return False
            s.delete(row)
            return True

    # --- daily usage -----------------------------------------------------------------------------
    def daily_usage(self, tenant: str, day: dt.date) -> int:
        """The tenant's backfilled usage for UTC ``day``, rounded up (0 when none recorded)."""
        validate_tenant_id(tenant)
        with self._session() as s:
            used = s.scalar(
                select(DailyUsageRow.used).where(
                    DailyUsageRow.tenant == tenant, DailyUsageRow.day == day
                )
            )
        return math.ceil(used) if used else 0

    def daily_usage_for_day(self, day: dt.date) -> dict[str, int]:
        """Every tenant's backfilled usage for UTC ``day`` (rounded up), for reconciliation."""
        with self._session() as s:
            rows = s.execute(
                select(DailyUsageRow.tenant, DailyUsageRow.used).where(DailyUsageRow.day == day)
            ).all()
        return {tenant: math.ceil(used) for tenant, used in rows}

    def earliest_day_of_another_measure(self, measure: str, since: dt.date) -> dt.date | None:
        """The earliest day from ``since`` on holding a total of another measure than
        ``measure`` (or of none recorded: written before revision 0002); None if there is none."""
        with self.engine.connect() as conn:
            earliest = conn.scalar(
                select(func.min(DailyUsageRow.day)).where(
                    DailyUsageRow.day >= since,
                    DailyUsageRow.measure.is_distinct_from(measure),
                )
            )
        return earliest if isinstance(earliest, dt.date) else None

    def latest_daily_usage_day(self) -> dt.date | None:
        """The latest day ``tenant_daily_usage`` holds a total for (None: it holds none)."""
        with self.engine.connect() as conn:
            latest = conn.scalar(select(func.max(DailyUsageRow.day)))
        return latest if isinstance(latest, dt.date) else None

    def upsert_daily_usage(
        self,
        rows: Iterable[tuple[str, dt.date, int | float]],
        measure: str | None = None,
        *,
        covering: tuple[dt.date, dt.date | None] | None = None,
        replace: bool = False,
    ) -> int:
        """Store absolute totals per (tenant, day); idempotent. Returns the number of rows.

        A total replaces a smaller stored one (the worker's tables hold the truth), so a
        replayed batch writes the same values again and changes nothing. A smaller total never
        replaces a larger one: a day's usage only grows (the events are an append-only log),
        and each worker's backfill writes every tenant, so two workers' rounds can interleave
        (A reads 10, B reads and writes 15, A writes 10): the stored total must not move back,
        since it is what a lost Redis day counter is seeded from.

        With ``measure`` (what the totals count: ``metering.clickhouse.totals.measure_key``) a
        total also replaces one of another measure, larger or not, and records its measure: a
        release or a setting that changed what is totalled does not leave the old totals in
        place (they could only ever be raised). Without it the stored measure is left as is.

        ``covering=(since, until)`` (``until`` None: open-ended) says ``rows`` are every
        total of those days: a stored total of another measure that they leave out (a tenant
        with none of this measure's usage that day) is set to 0 of ``measure``, in the same
        transaction; ``replace`` sets every stored total of those days to what ``rows`` say
        (0 where they say nothing), smaller or not (``metering db backfill --replace``: totals
        an old release's worker raised beside a new one). Both need ``measure``.
        """
        if (covering is not None or replace) and measure is None:
            raise ValueError("covering and replace need the measure the totals count")
        if replace and covering is None:
            raise ValueError("replace needs the days the totals cover")
        now = _utcnow()
        values: dict[tuple[str, dt.date], float] = {}
        for tenant, day, used in rows:
            validate_tenant_id(tenant)
            if not isinstance(day, dt.date) or isinstance(day, dt.datetime):
                raise QuotaError(f"day must be a date, not {day!r}")
            if isinstance(used, bool) or not isinstance(used, int | float):
                raise QuotaError(f"used must be a number, not {used!r}")
            if not math.isfinite(used) or used < 0:
                raise QuotaError(f"used must be finite and >= 0, got {used!r}")
            values[(tenant, day)] = float(used)
        if not values and covering is None:
            return 0
        payload = [
            {"tenant": t, "day": d, "used": u, "updated_at": now} for (t, d), u in values.items()
        ]
        if measure is not None:
            for row in payload:
                row["measure"] = measure
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        stmt = insert(DailyUsageRow)
        # A row is written only when its total grew (or its measure changed): ``updated_at``
        # says when it last did, and on PostgreSQL an unchanged total leaves no dead row behind.
        changes: dict[str, Any] = {
            "used": stmt.excluded.used,
            "updated_at": stmt.excluded.updated_at,
        }
        grew: Any = stmt.excluded.used > DailyUsageRow.used
        if measure is not None:
            changes["measure"] = stmt.excluded.measure
            grew = or_(grew, DailyUsageRow.measure.is_distinct_from(stmt.excluded.measure))
        stmt = stmt.on_conflict_do_update(
            index_elements=[DailyUsageRow.tenant, DailyUsageRow.day], set_=changes, where=grew
        )
        with self._session() as s:
            if covering is not None:
                # First to 0 of this measure, then raised to the totals given: the days' rows
                # left out end at 0, in one transaction (readers never see the zeros alone).
                since, until = covering
                cleared = update(DailyUsageRow).where(DailyUsageRow.day >= since)
                if until is not None:
                    cleared = cleared.where(DailyUsageRow.day < until)
                if not replace:
                    cleared = cleared.where(DailyUsageRow.measure.is_distinct_from(measure))
                s.execute(cleared.values(used=0.0, measure=measure, updated_at=now))
            if payload:
                s.execute(stmt, payload)
        return len(payload)


def _merge(
    base: Limits | None,
    rate_per_sec: float | None,
    burst: int | None,
    daily_limit: int | None,
    window_limit: int | None,
    window_seconds: int | None,
) -> Limits:
    missing = [
        name
        for name, value, fallback in (
            ("rate_per_sec", rate_per_sec, base and base.rate_per_sec),
            ("burst", burst, base and base.burst),
            ("daily_limit", daily_limit, base and base.daily_limit),
        )
        if value is None and fallback is None
    ]
    if missing:
        raise QuotaError(
            f"{', '.join(missing)} required: a new tenant on the custom plan has no defaults"
        )
    if window_limit is _KEEP:
        window_limit = base.window_limit if base else None
    if window_seconds is _KEEP:
        window_seconds = base.window_seconds if base else None
    return check_limits(
        rate_per_sec if rate_per_sec is not None else base.rate_per_sec,  # type: ignore[union-attr]
        burst if burst is not None else base.burst,  # type: ignore[union-attr]
        daily_limit if daily_limit is not None else base.daily_limit,  # type: ignore[union-attr]
        window_limit,
        window_seconds,
    )


__all__ = [
    "MIGRATIONS_DIR",
    "Base",
    "DailyUsageRow",
    "NewerRevisionError",
    "QuotaError",
    "QuotaStore",
    "TenantRecord",
    "TenantRow",
    "make_engine",
    "migrate",
    "normalize_url",
    "transactional_ddl",
]

"""Alembic environment for the quota DB, configured from code (no alembic.ini).

:func:`metering.quota_db.migrate` passes an open connection in ``config.attributes``; without
one, the URL comes from the ``sqlalchemy.url`` option or, failing that, ``QUOTA_DB_URL``, and
the migration runs in one transaction, DDL included, as there
(:func:`metering.quota_db.transactional_ddl`).
"""

from __future__ import annotations

from typing import Any

from alembic import context

from metering.quota_db import Base, make_engine, transactional_ddl

config = context.config
target_metadata = Base.metadata


def _run(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by table copy
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from metering.settings import get_settings

        url = get_settings().quota_db_url
    engine = transactional_ddl(make_engine(url, timeouts=False))
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `metering db migrate`")
run_migrations_online()

"""Shared fixtures. Services are session-scoped: one suite run starts each service once.

Tests under ``tests/integration`` are marked ``integration`` automatically; ``tests/unit`` holds
the fast ones. ``pytest -m "not integration"`` runs only the fast ones.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from metering.localstack import LocalStack
from tests.services import ServiceProvider


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


#: A test that would start this close before 00:00 UTC waits until the day has turned first.
#: Daily quotas, the limiter's day counters and the events' days all roll over at midnight, so a
#: test straddling it would see its counts split across two days. Longer tests that work out
#: "today" after the fact date their events from one instant instead (``one_event_time``).
MIDNIGHT_GUARD_SECONDS = 20.0


def seconds_to_utc_midnight(now: float | None = None) -> float:
    now = time.time() if now is None else now
    return 86400.0 - now % 86400.0


@pytest.fixture(autouse=True)
def _not_across_midnight() -> None:
    wait = seconds_to_utc_midnight()
    if wait < MIDNIGHT_GUARD_SECONDS:
        time.sleep(wait + 0.5)


#: Where api_settings records the Kafka topics it made; imported by the API tests only.
API_SUPPORT = "tests.integration.api_support"


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceProvider]:
    provider = ServiceProvider()
    yield provider
    provider.close()


@pytest.fixture(scope="session")
def redis_url(services: ServiceProvider) -> str:
    return services.redis_url()


@pytest.fixture(scope="session")
def kafka_bootstrap(services: ServiceProvider) -> Iterator[str]:
    yield services.kafka_bootstrap()
    # The topics the API tests made, deleted in one request while Kafka still runs.
    support = sys.modules.get(API_SUPPORT)
    if support is not None:
        support.drop_made_topics()


@pytest.fixture(scope="session")
def postgres_url(services: ServiceProvider) -> str:
    return services.postgres_url()


@pytest.fixture(scope="session")
def redis_cluster_nodes(services: ServiceProvider) -> str:
    return services.redis_cluster_nodes()


@pytest.fixture(scope="session")
def redis_sentinels(services: ServiceProvider) -> tuple[str, str]:
    return services.redis_sentinels()


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ClickHouse for the session: ``TEST_CLICKHOUSE_URL`` or the embedded engine in a
    session folder (chdb allows one data folder per process; tests isolate by database)."""
    if url := os.environ.get("TEST_CLICKHOUSE_URL"):
        return url
    return f"chdb://{tmp_path_factory.mktemp('clickhouse')}"


@pytest.fixture(scope="session")
def clickhouse_client(clickhouse_url: str):  # type: ignore[no-untyped-def]
    import clickhouse_connect

    return clickhouse_connect.get_client(dsn=clickhouse_url)


@pytest.fixture
def clickhouse_db(clickhouse_client) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh ClickHouse database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    clickhouse_client.command(f"CREATE DATABASE {name}")
    yield name
    clickhouse_client.command(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def tenant() -> str:
    """A tenant id no other test uses, so tests sharing one Redis never collide."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def dedicated_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A private local stack for tests that kill or stop servers; fully stopped afterwards."""
    stack = LocalStack(tmp_path_factory.mktemp("stack"))
    yield stack
    stack.down()


def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """Create a uniquely named database on the PostgreSQL at ``server_url``; yield its URL;
    drop it afterwards (connections still open are terminated)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def quota_db_url(
    request: pytest.FixtureRequest, tmp_path: Path, services: ServiceProvider
) -> Iterator[str]:
    """An empty quota DB for one test: a SQLite file, or a fresh database on the PostgreSQL
    server. Tests using it run on both."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'quota.db'}"
    else:
        yield from fresh_postgres_database(services.postgres_url())

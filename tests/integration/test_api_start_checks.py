"""``metering api`` refuses to start against stores a newer release migrated (a deploy rolled
back), with the one line ``metering worker`` and ``metering db migrate`` give; stores not
migrated yet are served as before, and the check makes no schema."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from metering.clickhouse.schema import migrations
from tests.integration.test_api_server import api_environ, start_api, stop_api, wait_until_serving

#: Migrates the embedded ClickHouse folder argv[1] (database argv[2]), then records a version
#: newer than this release ships, as a newer release would. In a process of its own: chdb opens
#: one data folder per process, and the tests' session folder may be open in this one.
BUMP_CLICKHOUSE = """
import sys
from metering.clickhouse.client import clickhouse_client
from metering.clickhouse.schema import migrate, migrations

client = clickhouse_client(sys.argv[1])
migrate(client, sys.argv[2])
client.insert(
    f"{sys.argv[2]}.schema_migrations",
    [[migrations()[-1].version + 1, "from_a_newer_release"]],
    column_names=["version", "name"],
)
client.close()
"""


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """A ``metering api`` of its own data folder: an embedded ClickHouse, an SQLite quota DB,
    and Kafka not needed (events would wait in the spool)."""
    return {
        "METERING_DATA_DIR": str(tmp_path),
        "RATE_LIMIT_REDIS_URL": redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "QUOTA_DB_URL": f"sqlite:///{tmp_path / 'quota.db'}",
        "CLICKHOUSE_URL": f"chdb://{tmp_path / 'clickhouse'}",
        "CLICKHOUSE_DATABASE": "metering",
    }


def migrate(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "metering.cli", "db", "migrate"],
        env=api_environ(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def refused(env: dict[str, str]) -> str:
    """The last line ``metering api`` writes, once it has exited 1; it fails as soon as the
    API serves instead."""
    proc, url = start_api(env, output=subprocess.PIPE)
    try:
        with pytest.raises(AssertionError, match="exited with 1"):
            wait_until_serving(url, proc)
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return out.strip().splitlines()[-1]


def test_a_quota_db_a_newer_release_migrated_is_refused_in_one_line(env: dict[str, str]) -> None:
    migrate(env)
    path = env["QUOTA_DB_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    assert refused(env) == (
        f"metering: the quota DB (QUOTA_DB_URL={env['QUOTA_DB_URL']}) is at revision 0099, "
        "newer than this release knows (0002): deploy the newer release"
    )


def test_a_clickhouse_schema_a_newer_release_migrated_is_refused_in_one_line(
    env: dict[str, str],
) -> None:
    migrate(env)
    bump = subprocess.run(
        [sys.executable, "-c", BUMP_CLICKHOUSE, env["CLICKHOUSE_URL"], env["CLICKHOUSE_DATABASE"]],
        env=api_environ(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bump.returncode == 0, bump.stderr
    newest = migrations()[-1].version
    assert refused(env) == (
        f"metering: ClickHouse (CLICKHOUSE_URL={env['CLICKHOUSE_URL']}) is at schema version "
        f"{newest + 1}, newer than this release knows ({newest}): deploy the newer release"
    )


@pytest.mark.parametrize("migrated", [False, True])
def test_stores_of_this_release_or_not_migrated_yet_are_served(
    env: dict[str, str], tmp_path: Path, migrated: bool
) -> None:
    """As before the check: the API serves; an embedded folder it checked is closed again (a
    worker may take it), and a store not migrated is left as it was."""
    from metering.commands.store_errors import embedded_folder_in_use

    if migrated:
        migrate(env)
    proc, url = start_api(env, output=subprocess.PIPE)
    try:
        wait_until_serving(url, proc)
        assert not embedded_folder_in_use(env["CLICKHOUSE_URL"])
        if not migrated:  # only the note of who serves there (record_holder), no engine
            made = [p.name for p in (tmp_path / "clickhouse").iterdir()]
            assert all(name.startswith("metering-holder-") for name in made), made
    finally:
        out = stop_api(proc)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "schema version not checked" not in out  # nothing failed to answer

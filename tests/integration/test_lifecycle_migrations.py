"""The deployment lifecycle around the migrations: a quota-DB migration killed half-way (or run
twice at once) on SQLite, stores a newer release migrated (a deploy rolled back), and
`metering reconcile` beside a running `metering up`, whose process title Faust rewrites."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from metering.quota_db import migrate as migrate_quota_db

#: settings that would name services or stores other than the test's own
NAMED = (
    "RATE_LIMIT_REDIS_CLUSTER_NODES",
    "RATE_LIMIT_REDIS_SENTINELS",
    "QUOTA_DB_URL",
    "CLICKHOUSE_URL",
    "CLICKHOUSE_DATABASE",
    "JWT_SECRET",
    "JWT_PUBLIC_KEY",
)
REDIS_DB = 13  # a Redis database of its own: reconcile reports the tenants it holds

# A `metering db migrate --only quota` (by :func:`metering.quota_db.migrate`) with a hook on its
# engine: after the statement starting with argv[2], "crash" dies at once (SIGKILL, OOM, power),
# "pause" says so and waits for a line on stdin. A statement starting with argv[3] (if given) is
# announced on stdout before it runs.
HOOKED_MIGRATION = """
import os, sys
from sqlalchemy import event
import metering.quota_db as q

url, action, after, announce = sys.argv[1], sys.argv[2], sys.argv[3].upper(), sys.argv[4].upper()
real = q.make_engine

def make_engine(*args, **kwargs):
    engine = real(*args, **kwargs)

    @event.listens_for(engine, "before_cursor_execute")
    def before(conn, cursor, statement, *rest):
        if announce and statement.lstrip().upper().startswith(announce):
            print("announce", flush=True)

    @event.listens_for(engine, "after_cursor_execute")
    def after_statement(conn, cursor, statement, *rest):
        if after and statement.lstrip().upper().startswith(after):
            if action == "crash":
                os._exit(137)
            print("paused", flush=True)
            sys.stdin.readline()

    return engine

q.make_engine = make_engine
print("revision", q.migrate(url), flush=True)
"""


def hooked_migration(
    url: str, action: str, after: str, announce: str = ""
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOOKED_MIGRATION, url, action, after, announce],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_quota_migration_killed_half_way_leaves_a_database_the_next_run_migrates(
    tmp_path: Path,
) -> None:
    path = tmp_path / "quota.db"
    url = f"sqlite:///{path}"
    proc = hooked_migration(url, "crash", "CREATE TABLE tenants")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 137, err
    # It used to keep `tenants` (sqlite3 runs DDL outside a transaction): every later run
    # then failed with "table tenants already exists".
    assert "tenants" not in tables(path)
    assert migrate_quota_db(url) == "0002"
    assert {"tenants", "tenant_daily_usage", "alembic_version"} <= tables(path)


def test_two_quota_migrations_at_once_on_a_fresh_file_both_succeed(tmp_path: Path) -> None:
    """The first is held half-way (its `tenants` made) until the second is about to begin its
    transaction, or has finished: the second must wait for the first, then find it done."""
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    first = hooked_migration(url, "pause", "CREATE TABLE tenants")
    second = None
    try:
        assert first.stdout is not None and first.stdin is not None
        assert first.stdout.readline() == "paused\n"
        second = hooked_migration(url, "", "", announce="BEGIN")
        assert second.stdout is not None
        # "announce" as it begins; "" when it ended without (the old code never began one).
        assert second.stdout.readline() in ("announce\n", "")
        first.stdin.write("\n")
        first.stdin.flush()
        out_first, err_first = first.communicate(timeout=120)
        out_second, err_second = second.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
    assert first.returncode == 0, err_first
    assert second.returncode == 0, err_second  # it said "table tenants already exists"
    assert out_first.endswith("revision 0002\n")
    assert out_second.endswith("revision 0002\n")


def test_a_quota_db_a_newer_release_migrated_is_one_line_naming_both_revisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from metering.cli import main

    path = tmp_path / "quota.db"
    migrate_quota_db(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    monkeypatch.setenv("QUOTA_DB_URL", f"sqlite:///{path}")
    assert main(["db", "migrate", "--only", "quota"]) == 1
    # It was alembic's traceback: "Can't locate revision identified by '0099'".
    assert capsys.readouterr().err == (
        f"metering: the quota DB (QUOTA_DB_URL=sqlite:///{path}) is at revision 0099, newer "
        "than this release knows (0002): deploy the newer release\n"
    )


def test_a_clickhouse_schema_a_newer_release_migrated_is_refused_naming_both_versions(
    clickhouse_client: Any,
    clickhouse_url: str,
    clickhouse_db: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from metering.cli import main
    from metering.clickhouse.client import adopt_embedded_client
    from metering.clickhouse.schema import migrate, migrations

    adopt_embedded_client(clickhouse_url, clickhouse_client)
    migrate(clickhouse_client, clickhouse_db)
    newest = migrations()[-1].version
    clickhouse_client.insert(
        f"{clickhouse_db}.schema_migrations",
        [[newest + 1, "from_a_newer_release"]],
        column_names=["version", "name"],
    )
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_url)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", clickhouse_db)
    assert main(["db", "migrate", "--only", "clickhouse"]) == 1  # it said "nothing new", 0
    assert capsys.readouterr().err == (
        f"metering: ClickHouse (CLICKHOUSE_URL={clickhouse_url}) is at schema version "
        f"{newest + 1}, newer than this release knows ({newest}): deploy the newer release\n"
    )


def _until(check: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()  # type: ignore[operator]
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout:.0f}s")


def test_reconcile_beside_a_running_up_asks_its_api(
    redis_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Faust rewrites the title of `metering up` ("[Faust:Worker] ..."), so its cmdline no
    longer says what it is: reconcile said the holder "serves no API"."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = uuid.uuid4().hex[:10]
    env = {k: v for k, v in os.environ.items() if k not in NAMED}
    env |= {
        "METERING_DATA_DIR": str(tmp_path),
        "RATE_LIMIT_REDIS_URL": urlsplit(redis_url)._replace(path=f"/{REDIS_DB}").geturl(),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "USAGE_EVENTS_TOPIC": f"life-{run}.events",
        "USAGE_EVENTS_DLQ_TOPIC": f"life-{run}.dlq",
        "WORKER_GROUP": f"life-{run}",
    }
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "metering.cli", "up", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _until(lambda: b"worker consuming" in log.read_bytes() or up.poll() is not None, 120, "up")
        assert up.poll() is None, log.read_text(errors="replace")[-3000:]
        cmdline = Path(f"/proc/{up.pid}/cmdline").read_bytes()
        assert b"metering" not in cmdline  # what the holder's command was read from
        day = (dt.datetime.now(dt.UTC) - dt.timedelta(days=30)).date().isoformat()
        proc = subprocess.run(  # a day without usage: nothing to disagree about
            [sys.executable, "-m", "metering.cli", "reconcile", "--json", "--day", day],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=90)
    assert proc.stderr == (
        f"metering reconcile: the embedded ClickHouse is in use by `metering up` (pid {up.pid}); "
        f"asking it at http://127.0.0.1:{port}\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tenants"] == []
    assert code == 0, log.read_text(errors="replace")[-3000:]
    assert not list((tmp_path / "clickhouse").glob("metering-holder-*"))  # removed as it stops

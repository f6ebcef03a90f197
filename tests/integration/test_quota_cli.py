"""``metering tenants ...`` and ``metering db migrate`` as an operator runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from limiter.quotas import quota_cache_key
from metering.cli import main


@pytest.fixture
def env(
    quota_db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, tenant: str
) -> Iterator[str]:
    monkeypatch.setenv("QUOTA_DB_URL", quota_db_url)
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", redis_url)
    for var in ("RATE_LIMIT_REDIS_CLUSTER_NODES", "RATE_LIMIT_REDIS_SENTINELS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["db", "migrate", "--only", "quota"]) == 0
    yield quota_db_url
    redis.Redis.from_url(redis_url).delete(quota_cache_key(tenant))


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses bad arguments this way
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_set_show_and_list_a_tenant(
    env: str, tenant: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    code, out, _ = run(["tenants", "set", tenant, "--plan", "pro", "--daily", "5000"], capsys)
    assert code == 0
    assert tenant in out and "5000" in out

    code, out, _ = run(
        ["tenants", "set", tenant, "--burst", "7", "--window-limit", "50", "--window-seconds", "60",
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    stored = json.loads(out)
    assert (stored["plan"], stored["burst"], stored["daily_limit"]) == ("pro", 7, 5000)
    assert (stored["window_limit"], stored["window_seconds"], stored["version"]) == (50, 60, 2)
    cached = json.loads(redis.Redis.from_url(redis_url).get(quota_cache_key(tenant)))
    assert (cached["burst"], cached["version"]) == (7, 2)  # every process sees it at once

    code, out, _ = run(["tenants", "show", tenant, "--json"], capsys)
    assert code == 0 and json.loads(out)["burst"] == 7

    code, out, _ = run(["tenants", "list", "--json"], capsys)
    assert code == 0 and [t["tenant"] for t in json.loads(out)] == [tenant]


def test_showing_an_unknown_tenant_says_what_it_would_get(
    env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    capsys.readouterr()
    code, _, err = run(["tenants", "show", "nobody"], capsys)
    assert code == 1
    assert "not in the quota DB; it gets plan 'free'" in err
    monkeypatch.setenv("QUOTA_UNKNOWN_TENANT", "reject")
    code, _, err = run(["tenants", "show", "nobody"], capsys)
    assert "rejected" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plan", "gold"], "invalid choice: 'gold'"),
        (["--rate", "-5", "--burst", "1", "--daily", "1"], "--rate: must be > 0"),
        (["--plan", "pro", "--daily", "-1"], "--daily: must be > 0"),
        (["--plan", "pro", "--burst", "2.5"], "'2.5' is not an integer"),
        (["--rate", "5"], "burst, daily_limit required"),
        (["--plan", "pro", "--window-limit", "5"], "window_limit and window_seconds"),
        (["--plan", "pro", "--no-window", "--window-limit", "5"], "--no-window cannot"),
    ],
)
def test_bad_input_exits_2_with_the_reason_and_stores_nothing(
    env: str, tenant: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    code, _, err = run(["tenants", "set", tenant, *args], capsys)
    assert code == 2
    assert message in err
    code, out, _ = run(["tenants", "list", "--json"], capsys)
    assert json.loads(out) == []


@pytest.mark.parametrize("bad", ["a" * 65, "no spaces", "{slot}"])
def test_a_malformed_tenant_id_exits_2(
    env: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    code, _, err = run(["tenants", "set", bad, "--plan", "pro"], capsys)
    assert code == 2
    assert "invalid tenant id" in err


def test_db_migrate_brings_up_the_quota_db_and_clickhouse(tmp_path: Path) -> None:
    # A process of its own: the embedded ClickHouse allows one data folder per process.
    environ = {
        **os.environ,
        "QUOTA_DB_URL": f"sqlite:///{tmp_path / 'quota.db'}",
        "CLICKHOUSE_URL": f"chdb://{tmp_path / 'clickhouse'}",
    }
    cmd = [sys.executable, "-m", "metering.cli", "db", "migrate"]
    first = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "quota DB: at revision 0002" in first.stdout
    assert "ClickHouse: applied 001_" in first.stdout
    again = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "ClickHouse: applied nothing new" in again.stdout


def test_a_change_is_stored_even_when_redis_cannot_be_told(
    env: str, tenant: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    capsys.readouterr()
    code, _, err = run(["tenants", "set", tenant, "--plan", "free"], capsys)
    assert code == 0
    assert "stored, but Redis could not be told; processes apply the change within 35s" in err
    code, out, _ = run(["tenants", "show", tenant, "--json"], capsys)
    assert json.loads(out)["plan"] == "free"


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "args",
    [["tenants", "list"], ["tenants", "show", "x"], ["tenants", "set", "x", "--plan", "pro"]],
)
def test_an_unmigrated_quota_db_is_one_line_naming_it_and_the_fix(
    args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = f"sqlite:///{tmp_path / 'quota.db'}"
    monkeypatch.setenv("QUOTA_DB_URL", db)
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", f"redis://127.0.0.1:{dead_port()}/0")
    code, _, err = run(args, capsys)
    assert code == 1
    assert err == (
        f"metering: the quota DB (QUOTA_DB_URL={db}): no such table: tenants; "
        "run `metering db migrate`\n"
    )


@pytest.mark.parametrize("args", [["tenants", "list"], ["db", "migrate", "--only", "quota"]])
def test_an_unreachable_quota_db_is_one_line_naming_it_without_its_password(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = dead_port()
    monkeypatch.setenv("QUOTA_DB_URL", f"postgresql://app:dbpass@127.0.0.1:{port}/quota")
    code, _, err = run(args, capsys)
    assert code == 1
    assert err.startswith(
        f"metering: the quota DB (QUOTA_DB_URL=postgresql://app:***@127.0.0.1:{port}/quota): "
    )
    assert "Connection refused" in err
    assert "dbpass" not in err and err.count("\n") == 1


def test_an_unreachable_clickhouse_server_is_one_line_naming_it_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = dead_port()
    monkeypatch.setenv("CLICKHOUSE_URL", f"http://metering:chpass@127.0.0.1:{port}")
    code, _, err = run(["db", "migrate", "--only", "clickhouse"], capsys)
    assert code == 1
    line = err.splitlines()[-1]  # urllib3 and clickhouse-connect log their retry first
    assert line.startswith(
        f"metering: ClickHouse (CLICKHOUSE_URL=http://metering:***@127.0.0.1:{port}): "
    )
    assert "Connection refused" in line and "chpass" not in err


def test_db_migrate_while_another_process_holds_the_embedded_clickhouse_says_so(
    clickhouse_url: str, clickhouse_client: object, tmp_path: Path
) -> None:
    if not clickhouse_url.startswith("chdb:"):
        pytest.skip("needs the embedded engine")
    # This process runs the engine on the session's folder: a second process cannot open it.
    environ = {
        **os.environ,
        "QUOTA_DB_URL": f"sqlite:///{tmp_path / 'quota.db'}",
        "CLICKHOUSE_URL": clickhouse_url,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "db", "migrate", "--only", "clickhouse"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"metering: ClickHouse (CLICKHOUSE_URL={clickhouse_url}): cannot open the embedded "
        "engine: the folder is in use by another process (a running `metering up` or worker)"
    )


def test_a_change_is_stored_even_when_the_redis_cluster_is_down_at_start(
    env: str,
    tenant: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Cluster client asks the nodes for the slot map as it is made: none answers here.
    nodes = f"127.0.0.1:{dead_port()}"
    monkeypatch.setenv("RATE_LIMIT_REDIS_CLUSTER_NODES", nodes)
    capsys.readouterr()
    code, _, err = run(["tenants", "set", tenant, "--plan", "free"], capsys)
    assert code == 0
    assert "stored, but Redis could not be told; processes apply the change within 35s" in err
    assert f"Redis (RATE_LIMIT_REDIS_CLUSTER_NODES={nodes}) cannot be reached" in caplog.text
    code, out, _ = run(["tenants", "show", tenant, "--json"], capsys)
    assert json.loads(out)["plan"] == "free"

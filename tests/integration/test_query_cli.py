"""``metering usage`` and ``metering billing`` against the session's embedded engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from metering.cli import main
from metering.clickhouse.client import adopt_embedded_client
from tests.integration.query_schema import at, insert_events, scratch_database


@pytest.fixture(scope="module")
def cli_db(clickhouse_client: Any, clickhouse_url: str) -> Iterator[str]:
    adopt_embedded_client(clickhouse_url, clickhouse_client)
    with scratch_database(clickhouse_client) as db:
        insert_events(
            clickhouse_client,
            db,
            [
                {
                    "tenant": "acme",
                    "meter": "requests",
                    "time": at("2026-03-29T09:00:00Z"),
                    "quantity": 3,
                    "dimensions": {"route": "/a"},
                },
                {
                    "tenant": "acme",
                    "meter": "requests",
                    "time": at("2026-03-30T09:00:00Z"),
                    "quantity": 4,
                    "dimensions": {"route": "/b"},
                },
            ],
        )
        yield db


@pytest.fixture
def env(cli_db: str, clickhouse_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_url)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", cli_db)
    return cli_db


QUERY = [
    "usage",
    "query",
    "--tenant",
    "acme",
    "--meter",
    "requests",
    "--from",
    "2026-03-29T00:00:00+01:00",
    "--to",
    "2026-03-31T00:00:00+02:00",
    "--window",
    "DAY",
    "--tz",
    "Europe/Berlin",
]


def test_usage_query_prints_a_table(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(QUERY) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["window_start", "window_end", "sum"]
    assert lines[2].split() == ["2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", "3"]
    assert lines[3].split() == ["2026-03-30T00:00:00+02:00", "2026-03-31T00:00:00+02:00", "4"]


def test_usage_query_as_json_with_group_by(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUERY, "--group-by", "route", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [(d["group"], d["value"]) for d in body["data"]] == [
        ({"route": "/a"}, 3.0),
        ({"route": "/b"}, 4.0),
    ]


def test_billing_prints_json_and_csv(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["billing", "acme", "2026-03", "--tz", "Europe/Berlin", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["lines"] == [{"meter": "requests", "quantity": 7, "events": 2}]
    assert main(["billing", "acme", "2026-03", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith(",requests,7,2")


def test_bad_input_exits_2_naming_the_parameter(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*QUERY[:-2], "--tz", "Nowhere/Land"]) == 2
    assert "tz:" in capsys.readouterr().err
    assert main(["billing", "acme", "2026-13"]) == 2
    assert "month:" in capsys.readouterr().err


def test_usage_on_an_unmigrated_database_is_one_line_saying_to_migrate(
    cli_db: str,
    clickhouse_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_url)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", "never_migrated")
    assert main(["usage", "top", "--meter", "requests"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"metering: ClickHouse (CLICKHOUSE_URL={clickhouse_url}): Code: 81.")
    assert err.endswith("(UNKNOWN_DATABASE); run `metering db migrate`\n")
    assert err.count("\n") == 1


def test_usage_while_another_process_holds_the_embedded_engine_points_at_the_api(
    clickhouse_url: str, clickhouse_client: Any
) -> None:
    if not clickhouse_url.startswith("chdb:"):
        pytest.skip("needs the embedded engine")
    # This process runs the engine on the session's folder: a second process cannot open it.
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "usage", "top", "--meter", "requests"],
        env={**os.environ, "CLICKHOUSE_URL": clickhouse_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"metering: the embedded ClickHouse ({clickhouse_url}) is in use by another process "
        f"(pid {os.getpid()}); stop it, or ask a `metering up` or `metering api` that owns the "
        "folder\n"
    )  # named, and nothing of the engine's own error (it is not opened)

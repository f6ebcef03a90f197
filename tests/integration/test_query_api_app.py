"""The usage routes inside the real app (JWT auth, rate limiting, problem handlers) on the real
services: a signed tenant reads its local-day usage and its CSV statement; bad input is a 422
problem."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.api_support import api_client, api_settings, auth, problem
from tests.integration.query_schema import at, insert_events, scratch_database


@pytest.fixture(scope="module")
def usage_db(clickhouse_client: Any) -> Iterator[str]:
    with scratch_database(clickhouse_client) as db:
        insert_events(
            clickhouse_client,
            db,
            [
                {
                    "tenant": "app-acme",
                    "meter": "requests",
                    "time": at("2026-03-28T22:30:00Z"),
                    "quantity": 2,
                },
                {
                    "tenant": "app-acme",
                    "meter": "requests",
                    "time": at("2026-03-29T22:30:00Z"),
                    "quantity": 5,
                },
            ],
        )
        yield db


async def test_usage_and_statement_through_the_whole_app(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str, usage_db: str, clickhouse_client: Any
) -> None:
    settings = api_settings(tmp_path, redis_url, kafka_bootstrap, clickhouse_database=usage_db)
    params = {
        "meter": "requests",
        "from": "2026-03-28T00:00:00+01:00",
        "to": "2026-03-31T00:00:00+02:00",
        "window": "DAY",
        "tz": "Europe/Berlin",
    }
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        usage = await client.get("/v1/usage", params=params, headers=auth("app-acme"))
        statement = await client.get(
            "/v1/billing/app-acme/2026-03",
            params={"tz": "Europe/Berlin"},
            headers={**auth("app-acme"), "Accept": "text/csv"},
        )
        bad = await client.get(
            "/v1/usage", params={**params, "tz": "Europe/Berlin' --"}, headers=auth("app-acme")
        )
    assert usage.status_code == 200, usage.text
    # 22:30Z on the 28th is 23:30 in Berlin (+01:00); 22:30Z on the 29th is 00:30 on the 30th.
    assert [(d["window_start"], d["value"]) for d in usage.json()["data"]] == [
        ("2026-03-28T00:00:00+01:00", 2.0),
        ("2026-03-30T00:00:00+02:00", 5.0),
    ]
    assert statement.status_code == 200
    rows = list(csv.DictReader(io.StringIO(statement.text)))
    assert [(r["meter"], r["quantity"], r["events"]) for r in rows] == [("requests", "7", "2")]
    assert bad.status_code == 422
    assert "tz" in problem(bad)["detail"]

"""The usage and billing routes over the real engine: tenant isolation, content negotiation,
and refusals. Every injection attempt gets a 4xx problem and runs no SQL at all.

The app here is the router alone behind a small middleware that sets ``request.state.principal``
the way the JWT middleware does (headers ``x-test-tenant`` / ``x-test-scopes``)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from metering.api import routes_usage
from metering.api.auth import Principal
from metering.api.context import ApiContext
from metering.api.problems import install_problem_handlers
from metering.settings import load_settings
from tests.integration.query_schema import RecordingClient, at, insert_events, scratch_database

ADMIN = {"x-test-tenant": "ops", "x-test-scopes": "metering:admin"}
ACME = {"x-test-tenant": "acme"}
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def usage_app(client: Any, database: str) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(routes_usage.router)
    app.state.context = ApiContext(
        settings=load_settings(clickhouse_database=database),
        limiter=None,
        emitter=None,
        quota_store=None,
        quota_admin=None,
        quotas=None,
        redis=None,
        clickhouse=client,
    )

    @app.middleware("http")
    async def test_principal(request: Request, call_next: Any) -> Any:
        if tenant := request.headers.get("x-test-tenant"):
            scopes = frozenset(request.headers.get("x-test-scopes", "").split())
            request.state.principal = Principal(tenant, scopes, {})
        return await call_next(request)

    return app


@pytest.fixture(scope="module")
def api(clickhouse_client: Any) -> Iterator[tuple[TestClient, RecordingClient, str]]:
    """acme: requests 1 (/a) + 2 (/b) on 2026-03-29 in Berlin, 4 on 2026-03-30; storage 10.
    rival: requests 1000. Recent: acme 7 and rival 70 five minutes ago."""
    with scratch_database(clickhouse_client) as db:
        recent = NOW - dt.timedelta(minutes=5)
        insert_events(
            clickhouse_client,
            db,
            [
                {
                    "tenant": "acme",
                    "meter": "requests",
                    "time": at("2026-03-29T09:00:00Z"),
                    "quantity": 1,
                    "dimensions": {"route": "/a"},
                },
                {
                    "tenant": "acme",
                    "meter": "requests",
                    "time": at("2026-03-29T10:00:00Z"),
                    "quantity": 2,
                    "dimensions": {"route": "/b"},
                },
                {
                    "tenant": "acme",
                    "meter": "requests",
                    "time": at("2026-03-30T10:00:00Z"),
                    "quantity": 4,
                },
                {
                    "tenant": "acme",
                    "meter": "storage",
                    "time": at("2026-03-15T10:00:00Z"),
                    "quantity": 10.5,
                },
                {
                    "tenant": "rival",
                    "meter": "requests",
                    "time": at("2026-03-29T10:00:00Z"),
                    "quantity": 1000,
                },
                {"tenant": "acme", "meter": "requests", "time": recent, "quantity": 7},
                {"tenant": "rival", "meter": "requests", "time": recent, "quantity": 70},
            ],
        )
        recording = RecordingClient(clickhouse_client)
        with TestClient(usage_app(recording, db)) as http:
            yield http, recording, db


@pytest.fixture
def http(api: tuple[TestClient, RecordingClient, str]) -> TestClient:
    return api[0]


MARCH_END = {
    "meter": "requests",
    "from": "2026-03-29T00:00:00+01:00",
    "to": "2026-03-31T00:00:00+02:00",
    "window": "DAY",
    "tz": "Europe/Berlin",
}


def test_a_tenant_reads_its_own_usage_by_local_day(http: TestClient) -> None:
    r = http.get("/v1/usage", params=MARCH_END, headers=ACME)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant"] == "acme" and body["window"] == "DAY" and body["tz"] == "Europe/Berlin"
    assert body["from"] == "2026-03-29T00:00:00+01:00"
    assert body["data"] == [
        {
            "window_start": "2026-03-29T00:00:00+01:00",
            "window_end": "2026-03-30T00:00:00+02:00",
            "value": 3.0,
            "group": {},
        },
        {
            "window_start": "2026-03-30T00:00:00+02:00",
            "window_end": "2026-03-31T00:00:00+02:00",
            "value": 4.0,
            "group": {},
        },
    ]


def test_group_by_and_filter_through_the_api(http: TestClient) -> None:
    params = {**MARCH_END, "group_by": "route", "filter": ["route=/a", "route=/b"]}
    r = http.get("/v1/usage", params=params, headers=ACME)
    assert r.status_code == 200, r.text
    assert [(d["group"], d["value"]) for d in r.json()["data"]] == [
        ({"route": "/a"}, 1.0),
        ({"route": "/b"}, 2.0),
    ]


def test_a_tenant_cannot_read_another_tenants_usage(
    api: tuple[TestClient, RecordingClient, str],
) -> None:
    http, recording, _ = api
    before = len(recording.queries)
    r = http.get("/v1/usage", params={**MARCH_END, "tenant": "rival"}, headers=ACME)
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/problem+json"
    assert len(recording.queries) == before


def test_an_admin_names_the_tenant_it_reads(http: TestClient) -> None:
    r = http.get("/v1/usage", params={**MARCH_END, "tenant": "rival"}, headers=ADMIN)
    assert r.status_code == 200
    assert [d["value"] for d in r.json()["data"]] == [1000.0]


def test_without_credentials_the_answer_is_401(http: TestClient) -> None:
    r = http.get("/v1/usage", params=MARCH_END)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"


def test_sliding_sum_over_the_last_hour(http: TestClient) -> None:
    r = http.get("/v1/usage/sliding", params={"meter": "requests", "minutes": 60}, headers=ACME)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["minutes"] == 60 and [p["value"] for p in body["data"]] == [7.0]
    start, end = at(body["data"][0]["window_start"]), at(body["data"][0]["window_end"])
    assert end - start == dt.timedelta(hours=1) and start <= NOW - dt.timedelta(minutes=5) < end


def test_top_tenants_is_for_admins(http: TestClient) -> None:
    assert http.get("/v1/usage/top", params={"meter": "requests"}, headers=ACME).status_code == 403
    r = http.get("/v1/usage/top", params={"meter": "requests", "limit": 5}, headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["data"] == [
        {"tenant": "rival", "value": 70.0},
        {"tenant": "acme", "value": 7.0},
    ]


def test_billing_statement_as_json(http: TestClient) -> None:
    r = http.get("/v1/billing/acme/2026-03", params={"tz": "Europe/Berlin"}, headers=ACME)
    assert r.status_code == 200
    assert r.json() == {
        "tenant": "acme",
        "month": "2026-03",
        "tz": "Europe/Berlin",
        "period_start": "2026-03-01T00:00:00+01:00",
        "period_end": "2026-04-01T00:00:00+02:00",
        "lines": [
            {"meter": "requests", "quantity": 7, "events": 3},
            {"meter": "storage", "quantity": 10.5, "events": 1},
        ],
    }


def test_billing_statement_as_csv_when_accepted(http: TestClient) -> None:
    r = http.get("/v1/billing/acme/2026-03", headers={**ACME, "Accept": "text/csv"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(row["meter"], row["quantity"], row["events"]) for row in rows] == [
        ("requests", "7", "3"),
        ("storage", "10.5", "1"),
    ]
    assert rows[0]["period_start"] == "2026-03-01T00:00:00+00:00"


def test_json_is_preferred_unless_csv_ranks_higher(http: TestClient) -> None:
    accept = "text/csv;q=0.5, application/json"
    r = http.get("/v1/billing/acme/2026-03", headers={**ACME, "Accept": accept})
    assert r.headers["content-type"] == "application/json"


def test_billing_is_tenant_isolated(http: TestClient) -> None:
    assert http.get("/v1/billing/rival/2026-03", headers=ACME).status_code == 403
    r = http.get("/v1/billing/rival/2026-03", headers=ADMIN)
    assert r.json()["lines"] == [{"meter": "requests", "quantity": 1000, "events": 1}]


# --- refusals: quotes, comments, unknown names, absurd ranges ------------------------------------

Q = "requests'; DROP TABLE usage_events; --"
BAD_REQUESTS: list[tuple[str, dict[str, Any], dict[str, str], int]] = [
    ("/v1/usage", {**MARCH_END, "meter": Q}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "meter": "requests/*"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "from": "2026-03-29T00:00:00Z' OR 1=1 --"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "from": "2026-03-29"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "to": "2026-03-31T00:00:00"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "window": "DAY; DROP TABLE usage_events"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "tz": "Europe/Berlin'); DROP TABLE usage_events; --"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "tz": "../../etc/passwd"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "tz": "Mars/Olympus_Mons"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "group_by": "route'] --"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "group_by": "a b"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "group_by": "x" * 65}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "group_by": "a,b,c,d,e,f"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "group_by": "route,route"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "aggregation": "SUM) FROM system.tables --"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "filter": "route'='x"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "filter": "no-equals-sign"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "filter": "route=" + "x" * 300}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "decision": "1=1"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "tenant": "acme' OR '1'='1"}, ADMIN, 422),
    ("/v1/usage", {**MARCH_END, "from": "0001-01-01T00:00:00Z"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "to": "9999-12-31T00:00:00Z"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "to": "2026-03-01T00:00:00Z"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "from": "2016-01-01T00:00:00Z", "window": "MINUTE"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "from": "2026-03-29T00:00:00.0000001Z"}, ACME, 422),
    ("/v1/usage", {**MARCH_END, "from": "2026-03-29T00:00:00+00:60"}, ACME, 422),
    ("/v1/usage/sliding", {"meter": "requests", "minutes": -1}, ACME, 422),
    ("/v1/usage/sliding", {"meter": "requests", "minutes": 10**9}, ACME, 422),
    ("/v1/usage/sliding", {"meter": "requests", "points": 0}, ACME, 422),
    ("/v1/usage/sliding", {"meter": "requests", "aggregation": "LATEST"}, ACME, 422),
    ("/v1/usage/sliding", {"meter": Q}, ACME, 422),
    ("/v1/usage/sliding", {"meter": "requests", "tenant": "rival"}, ACME, 403),
    ("/v1/usage/top", {"meter": "requests", "limit": 0}, ADMIN, 422),
    ("/v1/usage/top", {"meter": Q}, ADMIN, 422),
    ("/v1/usage/top", {"meter": "requests"}, ACME, 403),
    ("/v1/billing/acme/2026-13", {}, ACME, 422),
    ("/v1/billing/acme/2026-03'--", {}, ACME, 422),
    ("/v1/billing/acme/2026-03", {"tz": "UTC' --"}, ACME, 422),
    ("/v1/billing/acme%27--/2026-03", {}, ADMIN, 422),
    ("/v1/billing/rival/2026-03", {}, ACME, 403),
]


@pytest.mark.parametrize(
    ("path", "params", "headers", "status"),
    BAD_REQUESTS,
    ids=[f"{p}-{i}" for i, (p, *_rest) in enumerate(BAD_REQUESTS)],
)
def test_bad_parameters_are_refused_before_any_sql_runs(
    api: tuple[TestClient, RecordingClient, str],
    path: str,
    params: dict[str, Any],
    headers: dict[str, str],
    status: int,
) -> None:
    http, recording, db = api
    before = len(recording.queries)
    r = http.get(path, params=params, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status and r.json()["detail"]
    assert recording.queries[before:] == []
    tables = recording.query(
        "SELECT name FROM system.tables WHERE database = {db:String} ORDER BY name",
        parameters={"db": db},
    ).result_rows
    assert ("usage_events",) in tables and ("usage_day",) in tables
    count = recording.query(f"SELECT count() FROM {db}.usage_events").result_rows[0][0]
    assert count == 7


@pytest.mark.parametrize(
    ("path", "params", "headers", "location"),
    [
        ("/v1/billing/acme/2026-13", {}, ACME, "path.month"),  # the month is in the path
        ("/v1/billing/acme/2026-03'--", {}, ACME, "path.month"),
        ("/v1/billing/acme/1970-01", {"tz": "Asia/Tokyo"}, ACME, "path.month"),
        ("/v1/billing/acme/2026-03", {"tz": "Mars/Olympus_Mons"}, ACME, "query.tz"),
        ("/v1/usage", {**MARCH_END, "from": "2026-03-29"}, ACME, "query.from"),
        ("/v1/usage", {**MARCH_END, "tz": "Mars/Olympus_Mons"}, ACME, "query.tz"),
        ("/v1/usage/top", {"meter": "requests/*"}, ADMIN, "query.meter"),
    ],
)
def test_a_refused_parameter_is_located_where_the_client_sent_it(
    http: TestClient, path: str, params: dict[str, Any], headers: dict[str, str], location: str
) -> None:
    r = http.get(path, params=params, headers=headers)
    assert r.status_code == 422, r.text
    assert [e["location"] for e in r.json()["errors"]] == [location]

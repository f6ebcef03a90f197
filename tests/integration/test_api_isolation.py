"""Tenant isolation through the whole app (JWT, limiter, routes): tenant A can neither read nor
write tenant B's quota, limits, events or usage, on every endpoint; an admin can; and A's own
answers never contain B's data."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.api_support import (
    admin,
    api_client,
    api_settings,
    auth,
    problem,
    read_events,
)
from tests.integration.query_schema import insert_events, scratch_database

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
FROM = (NOW - dt.timedelta(hours=1)).isoformat().replace("+00:00", "Z")
TO = (NOW + dt.timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
MONTH = f"{NOW:%Y-%m}"


@pytest.fixture(scope="module")
def usage_db(clickhouse_client: Any) -> Iterator[str]:
    with scratch_database(clickhouse_client) as db:
        yield db


@pytest.fixture
def pair(clickhouse_client: Any, usage_db: str) -> tuple[str, str]:
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    at = NOW - dt.timedelta(minutes=5)
    insert_events(
        clickhouse_client,
        usage_db,
        [
            {"tenant": a, "meter": "tokens", "time": at, "quantity": 7},
            {"tenant": b, "meter": "tokens", "time": at, "quantity": 1000},
        ],
    )
    return a, b


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, kafka_bootstrap: str, usage_db: str):  # type: ignore[no-untyped-def]
    return api_settings(
        tmp_path, redis_url, kafka_bootstrap, topics=True, clickhouse_database=usage_db
    )


def usage_event(tenant: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "urn:test",
        "type": "metering.usage",
        "subject": tenant,
        "time": NOW.isoformat(),
        "data": {"meter": "tokens", "quantity": 1},
    }


def requests_on(b: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every endpoint, aimed at tenant ``b``: (method, url, httpx keyword arguments)."""
    quota = {"rate_per_sec": 1e6, "burst": 10**6, "daily_limit": 10**12}
    return [
        ("GET", f"/v1/tenants/{b}/quota", {}),
        ("PUT", f"/v1/tenants/{b}/quota", {"json": quota}),
        ("GET", f"/v1/limits/{b}", {}),
        ("POST", "/v1/events", {"json": [usage_event(b)]}),
        ("GET", "/v1/usage", {"params": {"meter": "tokens", "from": FROM, "to": TO, "tenant": b}}),
        ("GET", "/v1/usage/sliding", {"params": {"meter": "tokens", "tenant": b}}),
        ("GET", f"/v1/billing/{b}/{MONTH}", {}),
        ("GET", "/v1/usage/top", {"params": {"meter": "tokens"}}),
    ]


async def send(
    client: httpx.AsyncClient, call: tuple[str, str, dict[str, Any]], headers: dict[str, str]
) -> httpx.Response:
    method, url, kwargs = call
    return await client.request(method, url, headers=headers, **kwargs)


async def test_tenant_a_is_refused_on_every_endpoint_aimed_at_b(
    settings, clickhouse_client: Any, pair: tuple[str, str]
) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        for call in requests_on(b):
            r = await send(client, call, auth(a))
            assert r.status_code == 403, (call[:2], r.status_code, r.text[:300])
            problem(r)
        # Nothing was written for B: no quota row, nothing counted against B.
        quota = (await client.get(f"/v1/tenants/{b}/quota", headers=admin())).json()
        live = (await client.get(f"/v1/limits/{b}", headers=admin())).json()
    assert quota["is_default"] is True
    assert live["daily"]["used"] == 0


async def test_a_tenant_on_an_admin_endpoint_is_told_it_needs_the_scope_before_its_mistakes(
    settings, clickhouse_client: Any, pair: tuple[str, str]
) -> None:  # type: ignore[no-untyped-def]
    """The operators audit's case: a non-admin's quota change with a bad field got a 422 naming
    the body's fields, not the 403. The scope is now checked first on every admin endpoint; an
    admin with the same mistakes gets the 422."""
    a, _ = pair
    mistaken = [
        ("PUT", f"/v1/tenants/{a}/quota", {"json": {"burst": "many"}}),
        ("GET", "/v1/admin/reconcile", {"params": {"day": "yesterday"}}),
        ("GET", "/v1/usage/top", {"params": {"meter": "tokens", "minutes": 0}}),
    ]
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        for call in mistaken:
            r = await send(client, call, auth(a))
            assert r.status_code == 403, (call[:2], r.status_code, r.text[:300])
            assert problem(r)["detail"] == "this needs the 'metering:admin' scope"
            r = await send(client, call, admin())
            assert r.status_code == 422, (call[:2], r.status_code, r.text[:300])


async def test_an_admin_may_act_on_any_tenant(
    settings, clickhouse_client: Any, pair: tuple[str, str]
) -> None:  # type: ignore[no-untyped-def]
    """Every endpoint aimed at B answers an admin with B's data, not the admin's own: B's quota
    before and after the admin changes it, B's live limits and usage, and the event the admin
    sends is emitted as B's."""
    _, b = pair
    answers: dict[tuple[str, str], Any] = {}
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        for call in requests_on(b):
            r = await send(client, call, admin())
            assert r.status_code in (200, 202), (call[:2], r.status_code, r.text[:300])
            answers[call[0], call[1].replace(b, "{b}")] = r.json()
        quota_after = (await client.get(f"/v1/tenants/{b}/quota", headers=admin())).json()

    before = answers["GET", "/v1/tenants/{b}/quota"]
    assert (before["tenant"], before["is_default"]) == (b, True)
    changed = answers["PUT", "/v1/tenants/{b}/quota"]
    assert (changed["tenant"], changed["burst"], changed["version"]) == (b, 10**6, 1)
    assert (quota_after["tenant"], quota_after["burst"], quota_after["is_default"]) == (
        b,
        10**6,
        False,
    )
    live = answers["GET", "/v1/limits/{b}"]
    assert (live["tenant"], live["bucket"]["capacity"], live["daily"]["limit"]) == (
        b,
        10**6,
        10**12,
    )
    for route in ("/v1/usage", "/v1/usage/sliding"):
        usage = answers["GET", route]
        assert usage["tenant"] == b, route
        assert [row["value"] for row in usage["data"]] == [1000.0], (route, usage)
    bill = answers["GET", "/v1/billing/{b}/" + MONTH]
    assert bill["tenant"] == b
    assert [(line["quantity"], line["events"]) for line in bill["lines"]] == [(1000, 1)]
    top = {row["tenant"]: row["value"] for row in answers["GET", "/v1/usage/top"]["data"]}
    assert top[b] == 1000.0
    (event_id,) = answers["POST", "/v1/events"]["ids"]
    # B's only event on the topic (the admin's calls were decided, and emitted, as its own).
    assert [(e.id, e.type) for e in read_events(settings, 1, subject=b)] == [
        (event_id, "metering.usage")
    ]


async def test_a_tenants_own_answers_hold_only_its_data(
    settings, clickhouse_client: Any, pair: tuple[str, str]
) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    async with api_client(settings, clickhouse=clickhouse_client) as client:
        usage = await client.get(
            "/v1/usage", params={"meter": "tokens", "from": FROM, "to": TO}, headers=auth(a)
        )
        bill = await client.get(f"/v1/billing/{a}/{MONTH}", headers=auth(a))
        quota = await client.get(f"/v1/tenants/{a}/quota", headers=auth(a))
        # A tenant header naming B changes nothing.
        usage_again = await client.get(
            "/v1/usage",
            params={"meter": "tokens", "from": FROM, "to": TO},
            headers={**auth(a), "X-Tenant-Id": b},
        )
    assert usage.status_code == 200, usage.text
    assert [row["value"] for row in usage.json()["data"]] == [7.0]
    assert bill.status_code == 200
    assert b not in bill.text and "1000" not in bill.text
    assert quota.json()["tenant"] == a
    assert usage_again.status_code == 200
    assert [row["value"] for row in usage_again.json()["data"]] == [7.0]

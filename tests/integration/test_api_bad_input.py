"""Bad input on every endpoint gets a 4xx ``application/problem+json`` that says what is wrong,
never a 500: a table of known-bad requests, then schemathesis generating valid and invalid
requests from the app's own OpenAPI schema against the app served by uvicorn."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.integration.api_support import (
    ADMIN_SCOPE,
    AUDIENCE,
    SECRET,
    api_settings,
    auth,
    problem,
    put_quota_sync,
    running_server,
)
from tests.integration.query_schema import scratch_database

UNLIMITED = {"rate_per_sec": 1e6, "burst": 10**9, "daily_limit": 10**12}
EXAMPLES_PER_OPERATION = 12


@pytest.fixture(scope="module")
def usage_db(clickhouse_client: Any) -> Iterator[str]:
    with scratch_database(clickhouse_client) as db:
        yield db


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    kafka_bootstrap: str,
    clickhouse_client: Any,
    usage_db: str,
) -> Iterator[str]:
    s = api_settings(
        tmp_path_factory.mktemp("api"),
        redis_url,
        kafka_bootstrap,
        topics=True,
        clickhouse_database=usage_db,
        api_max_body_bytes=64 * 1024,
    )
    with running_server(s, clickhouse=clickhouse_client) as url:
        yield url


@pytest.fixture(scope="module")
def caller(server: str) -> dict[str, str]:
    """An admin whose own limits never get in the way of the inputs under test."""
    tenant = f"fuzz-{uuid.uuid4().hex[:8]}"
    put_quota_sync(server, tenant, **UNLIMITED)
    return auth(tenant, ADMIN_SCOPE)


BAD_REQUESTS = [
    # (method, path, keyword arguments, expected status, words in the detail)
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {"json": {"rate_per_sec": "fast", "burst": 1}},
        422,
        "rate_per_sec",
    ),
    ("PUT", "/v1/tenants/{t}/quota", {"json": {"burst": 5, "daily_limit": 5}}, 422, "rate_per_sec"),
    # rate_per_sec is strict like the other limits: no boolean or string coerced to a number
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {"json": {**UNLIMITED, "rate_per_sec": True}},
        422,
        "rate_per_sec: Input should be a valid number",
    ),
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {"json": {**UNLIMITED, "rate_per_sec": "2"}},
        422,
        "rate_per_sec: Input should be a valid number",
    ),
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {"json": {**UNLIMITED, "rate_per_sec": "  3 "}},
        422,
        "rate_per_sec: Input should be a valid number",
    ),
    ("PUT", "/v1/tenants/{t}/quota", {"json": {**UNLIMITED, "burst": -1}}, 422, "burst"),
    ("PUT", "/v1/tenants/{t}/quota", {"json": {**UNLIMITED, "burst": 1.5}}, 422, "burst"),
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {"json": {"rate_per_sec": 1e-308, "burst": 100, "daily_limit": 1000}},
        422,
        "too low for burst",
    ),
    ("PUT", "/v1/tenants/{t}/quota", {"json": {**UNLIMITED, "window_limit": 5}}, 422, "window"),
    ("PUT", "/v1/tenants/{t}/quota", {"json": {**UNLIMITED, "plan": "gold"}}, 422, "unknown plan"),
    ("PUT", "/v1/tenants/{t}/quota", {"json": {**UNLIMITED, "extra": 1}}, 422, "extra"),
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {"content": b"{oops", "headers": {"content-type": "application/json"}},
        422,
        "JSON",
    ),
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {
            "content": b'{"rate_per_sec": 1, "burst": 1, "daily_limit": 1, "plan": "\xff"}',
            "headers": {"content-type": "application/json"},
        },
        400,
        "body is not UTF-8 JSON",
    ),
    (
        "PUT",
        "/v1/tenants/{t}/quota",
        {"content": b"[" * 70_000, "headers": {"content-type": "application/json"}},
        413,
        "larger than",
    ),
    ("GET", "/v1/tenants/a%7Bb%7D/quota", {}, 422, "tenant"),
    ("GET", "/v1/limits/" + "x" * 65, {}, 422, "tenant"),
    ("GET", "/v1/usage", {"params": {"meter": "requests"}}, 422, "from"),
    (
        "GET",
        "/v1/usage",
        {"params": {"meter": "requests", "from": "yesterday", "to": "now"}},
        422,
        "from",
    ),
    (
        "GET",
        "/v1/usage/sliding",
        {"params": {"meter": "requests", "minutes": "-3"}},
        422,
        "minutes",
    ),
    (
        "GET",
        "/v1/usage",
        {
            "params": {
                "meter": "requests",
                "from": "0001-01-01T00:00:00+01:00",
                "to": "2026-01-01T00:00:00Z",
            }
        },
        422,
        "from",
    ),
    ("GET", "/v1/billing/{t}/2026-13", {}, 422, "month"),
    ("GET", "/v1/billing/{t}/\uff12\uff10\uff12\uff16-\uff10\uff13", {}, 422, "month"),
    (
        "GET",
        "/v1/billing/{t}/\uff12\uff10\uff12\uff16-\uff10\uff13",
        {"headers": {"accept": "text/csv"}},
        422,
        "month",
    ),
    ("POST", "/v1/events", {"json": {"not": "a batch"}}, 422, "JSON array"),
    ("GET", "/v1/nothing-here", {}, 404, "Not Found"),
    ("DELETE", "/v1/events", {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "words"), BAD_REQUESTS)
def test_known_bad_requests_get_a_clear_4xx(
    server: str,
    caller: dict[str, str],
    method: str,
    path: str,
    kwargs: dict,
    status: int,
    words: str,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    headers = {**caller, **kwargs.pop("headers", {})}
    r = httpx.request(method, server + path.format(t=tenant), headers=headers, **kwargs)
    assert r.status_code == status, r.text[:300]
    assert words.lower() in problem(r)["detail"].lower()


def test_405_names_the_allowed_methods(server: str, caller: dict[str, str]) -> None:
    r = httpx.delete(f"{server}/v1/events", headers=caller)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"


def _signed(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with any header and claims, signed with the server's secret."""
    signing_input = ".".join(
        jwt.utils.base64url_encode(json.dumps(part).encode()).decode() for part in (header, claims)
    )
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{jwt.utils.base64url_encode(mac).decode()}"


@pytest.mark.parametrize(
    ("header", "claims", "words"),
    [
        ({"alg": "\u0410"}, {}, "token algorithm '\u0410' is not accepted"),
        ({"alg": "HS256", "crit": ["a\r\nX-Injected: yes"]}, {}, "critical extension"),
        ({"alg": "HS256", "crit": ["a\\"]}, {}, "critical extension"),
        ({"alg": "HS256"}, {"sub": "\u0430bc"}, "token tenant: invalid tenant id"),
        ({"alg": "HS256"}, {"exp": 10**400}, "claim 'exp' is not a time"),
        ({"alg": "HS256"}, {"nbf": -(10**400)}, "claim 'nbf' is not a time"),
    ],
    ids=["alg-cyrillic", "crit-crlf", "crit-backslash", "tenant-cyrillic", "exp-huge", "nbf-huge"],
)
def test_a_hostile_token_gets_a_401_with_a_well_formed_challenge(
    server: str, header: dict[str, Any], claims: dict[str, Any], words: str
) -> None:
    """Through uvicorn: text from the token never reaches the header (a CR/LF made the server
    drop the connection, a non-latin-1 character made a 500), nor does a huge time claim 500."""
    body = {"sub": "t1", "aud": AUDIENCE, "exp": int(time.time()) + 600, **claims}
    r = httpx.get(
        f"{server}/v1/limits/t1", headers={"Authorization": f"Bearer {_signed(header, body)}"}
    )
    assert r.status_code == 401, r.text[:300]
    assert words in problem(r)["detail"]
    assert "x-injected" not in r.headers
    assert re.fullmatch(
        r'Bearer realm="metering", error="invalid_token", '
        r'error_description="[\x20\x21\x23-\x5b\x5d-\x7e]+"',
        r.headers["www-authenticate"],
    )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_get_a_500(
    server: str, caller: dict[str, str], mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every route is in the schema
    strategy = st.one_of(op.as_strategy(generation_mode=mode) for op in operations)
    seen: dict[str, set[int]] = {}

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION * len(operations),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(base_url=server, headers=caller, timeout=10)
        seen.setdefault(case.operation.label, set()).add(response.status_code)
        assert response.status_code < 500, (case.operation.label, response.text[:500])
        if response.status_code >= 400:
            (content_type,) = response.headers["content-type"]  # schemathesis: lists of values
            assert content_type.startswith("application/problem+json"), case.operation.label

    run()
    assert len(seen) >= len(operations) // 2  # the examples reached most operations

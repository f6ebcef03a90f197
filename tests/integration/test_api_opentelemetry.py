"""``API_OPENTELEMETRY``: FastAPI's native OpenTelemetry is the operator's opt-in.

Off (the default), no request asks OpenTelemetry's global providers anything: FastAPI would
otherwise look them up on every request to learn whether anyone configured them (~3.6 us of a
trivial request's ~65). On, FastAPI's own behaviour is kept: it consults them per request."""

from __future__ import annotations

from pathlib import Path

import pytest

from metering.api.app import _FASTAPI_TELEMETRY
from tests.integration.api_support import api_client, api_settings, auth

trace = pytest.importorskip("opentelemetry.trace")  # FastAPI's dependency where it has telemetry


@pytest.mark.parametrize("enabled", [False, True])
async def test_requests_consult_opentelemetry_only_when_the_operator_opts_in(
    tmp_path: Path,
    redis_url: str,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    if enabled and not _FASTAPI_TELEMETRY:
        pytest.skip("this FastAPI has no native OpenTelemetry to opt in to")
    lookups = 0
    real = trace.get_tracer_provider

    def counted() -> object:
        nonlocal lookups
        lookups += 1
        return real()

    monkeypatch.setattr(trace, "get_tracer_provider", counted)
    settings = api_settings(tmp_path, redis_url, kafka_bootstrap, api_opentelemetry=enabled)
    tenant = "otel-probe"
    async with api_client(settings) as client:
        before = lookups
        for _ in range(5):
            r = await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
            assert r.status_code == 200, r.text
        during = lookups - before
    if enabled:
        assert during >= 5  # FastAPI asks on every request
    else:
        assert during == 0

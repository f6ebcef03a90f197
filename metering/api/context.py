"""What the API's routes work with, built once per app by :func:`metering.api.create_app`.

Route modules (ours and the query layer's ``routes_usage``) read it with :func:`api_context`;
no route constructs a client of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from metering.settings import Settings


@dataclass
class ApiContext:
    settings: Settings
    limiter: Any  # limiter.AsyncRateLimiter
    emitter: Any  # metering.emitter.Emitter (emit never blocks)
    quota_store: Any  # metering.quota_db.QuotaStore
    quota_admin: Any  # set_quota(tenant, ...) that also invalidates every quota cache
    quotas: Any  # limiter.quota_provider.QuotaProvider, or None
    redis: Any  # the limiter's async Redis client (live counters, readiness)
    clickhouse: Any = None  # clickhouse-connect client; opened on first use when not given
    ingest_in_flight: int = 0  # POST /v1/events requests being served (API_INGEST_MAX_CONCURRENT)

    def clickhouse_client(self) -> Any:
        """The ClickHouse client (opened on first use: the embedded engine allows one data
        folder per process, so an API that never queries never opens it)."""
        if self.clickhouse is None:
            from metering.clickhouse.client import clickhouse_client

            self.clickhouse = clickhouse_client(
                self.settings.clickhouse_url, timeout=self.settings.clickhouse_query_timeout
            )
        return self.clickhouse


def api_context(request: Request) -> ApiContext:
    return request.app.state.context

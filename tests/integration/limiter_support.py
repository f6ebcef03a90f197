"""Helpers for the limiter tests: clients of each Redis kind, a quota provider, server time."""

from __future__ import annotations

import datetime as dt
from typing import Any

import redis

from limiter import Quota, UnknownTenant
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.settings import Settings, load_settings

KINDS = ("single", "sentinel", "cluster")


def settings_for(
    kind: str,
    *,
    url: str = "",
    sentinels: str = "",
    master: str = "mymaster",
    cluster: str = "",
    **extra: Any,
) -> Settings:
    """Settings that point the limiter at exactly one kind of Redis."""
    base: dict[str, Any] = {
        "rate_limit_redis_cluster_nodes": cluster if kind == "cluster" else "",
        "rate_limit_redis_sentinels": sentinels if kind == "sentinel" else "",
        "rate_limit_redis_sentinel_master": master,
        "rate_limit_redis_socket_timeout": 1.0,
        "rate_limit_redis_connect_timeout": 1.0,
    }
    if url:
        base["rate_limit_redis_url"] = url
    base.update(extra)
    s = load_settings(**base)
    assert s.redis_mode == kind
    return s


class Targets:
    """Where each kind of Redis is for this test session."""

    def __init__(self, url: str, sentinels: tuple[str, str], cluster: str) -> None:
        self.url, (self.sentinels, self.master), self.cluster = url, sentinels, cluster

    def settings(self, kind: str, **extra: Any) -> Settings:
        return settings_for(
            kind,
            url=self.url,
            sentinels=self.sentinels,
            master=self.master,
            cluster=self.cluster,
            **extra,
        )

    def sync_client(self, kind: str) -> Any:
        return redis_from_settings(self.settings(kind))

    def async_client(self, kind: str) -> Any:
        return async_redis_from_settings(self.settings(kind))


class StaticQuotas:
    """A quota provider from a dict (the real one, limiter.quotas, reads the quota DB); records
    the seeds it was asked for."""

    def __init__(
        self, quotas: dict[str, Quota], seeds: dict[tuple[str, dt.date], int] | None = None
    ) -> None:
        self.quotas = quotas
        self.seeds = seeds or {}
        self.seed_calls: list[tuple[str, dt.date]] = []

    def get(self, tenant: str) -> Quota:
        try:
            return self.quotas[tenant]
        except KeyError:
            raise UnknownTenant(tenant) from None

    async def aget(self, tenant: str) -> Quota:
        return self.get(tenant)

    def daily_seed(self, tenant: str, day: dt.date) -> int:
        self.seed_calls.append((tenant, day))
        return self.seeds.get((tenant, day), 0)

    async def adaily_seed(self, tenant: str, day: dt.date) -> int:
        return self.daily_seed(tenant, day)


def server_time(client: Any, key: str = "") -> float:
    """The Redis server's clock, in seconds (on a Cluster: the node that holds ``key``)."""
    if isinstance(client, redis.RedisCluster):
        node = client.get_node_from_key(key or "x")
        sec, usec = client.execute_command("TIME", target_nodes=node)
    else:
        sec, usec = client.time()
    return int(sec) + int(usec) / 1e6


def server_day(client: Any, key: str = "") -> dt.date:
    return dt.datetime.fromtimestamp(server_time(client, key), dt.UTC).date()

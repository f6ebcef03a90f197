"""Helpers for the limiter tests: clients of each Redis kind, a quota provider, server time."""

from __future__ import annotations

import datetime as dt
from typing import Any

import redis
from redis.cluster import key_slot

from limiter import Quota, UnknownTenant
from limiter.keys import token_bucket_key
from limiter.redis_factory import async_redis_from_settings, redis_from_settings
from metering.localstack import LocalStack
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


class ClusterAdmin:
    """Plain connections to each member of a dedicated Cluster."""

    def __init__(self, stack: LocalStack) -> None:
        self.ports: dict[str, int] = dict(stack.status()["redis-cluster"]["ports"])
        self.nodes = {m: redis.Redis(port=p, decode_responses=True) for m, p in self.ports.items()}
        self.ids = {m: str(r.execute_command("CLUSTER", "MYID")) for m, r in self.nodes.items()}

    def owner(self, tenant: str, via: str) -> str:
        """The member that serves ``tenant``'s keys, as member ``via`` sees the slot map."""
        return self.owner_of_slot(key_slot(token_bucket_key(tenant).encode()), via)

    def owner_of_slot(self, slot: int, via: str) -> str:
        """The member that serves ``slot``, as member ``via`` sees the slot map."""
        by_port = {p: m for m, p in self.ports.items()}
        for first, last, master, *_ in self.nodes[via].execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return by_port[int(master[1])]
        raise AssertionError(f"slot {slot} is not covered")

    def tenant_per_master(self, prefix: str) -> dict[str, str]:
        """One tenant on each master: member -> tenant."""
        via = next(iter(self.nodes))
        found: dict[str, str] = {}
        i = 0
        while len(found) < len(self.nodes):
            t = f"{prefix}-{i}"
            found.setdefault(self.owner(t, via), t)
            i += 1
        return found

    def close(self) -> None:
        for r in self.nodes.values():
            r.close()

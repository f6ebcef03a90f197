"""Redis clients for the limiter, from settings: a single URL (``redis://``, ``rediss://``),
a Sentinel group (``RATE_LIMIT_REDIS_SENTINELS`` + ``RATE_LIMIT_REDIS_SENTINEL_MASTER``) or a
Cluster (``RATE_LIMIT_REDIS_CLUSTER_NODES``); the Cluster wins over Sentinel over the URL.

Every client gets the configured socket and connect timeouts and NO retries: a failing call
must come back within the timeout so the circuit breaker can count it, instead of redis-py's
default retries with exponential backoff stretching an outage into every request. A pooled
connection that the server closed is replaced by the pool before use, and a Sentinel-managed
connection asks the sentinels for the current master when it (re)connects, so a failover needs
no retry here either.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

from metering.settings import Settings, get_settings


def _common(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.rate_limit_redis_socket_timeout,
        "socket_connect_timeout": settings.rate_limit_redis_connect_timeout,
        "password": settings.rate_limit_redis_password,
    }


def redis_from_settings(settings: Settings | None = None) -> Any:
    """A sync client: ``redis.Redis`` (single node or Sentinel master) or ``RedisCluster``."""
    s = settings or get_settings()
    common = _common(s)
    if s.redis_mode == "cluster":
        return redis.RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in s.rate_limit_redis_cluster_nodes],
            retry=Retry(NoBackoff(), 0),
            **common,
        )
    if s.redis_mode == "sentinel":
        from redis.sentinel import Sentinel

        sentinel = Sentinel(
            s.rate_limit_redis_sentinels,
            sentinel_kwargs={k: v for k, v in common.items() if k != "password"},
            **common,
        )
        return sentinel.master_for(
            s.rate_limit_redis_sentinel_master, retry=Retry(NoBackoff(), 0), **common
        )
    overrides = {k: v for k, v in common.items() if v is not None}
    return redis.Redis.from_url(s.rate_limit_redis_url, retry=Retry(NoBackoff(), 0), **overrides)


def async_redis_from_settings(settings: Settings | None = None) -> Any:
    """An asyncio client, same choices as :func:`redis_from_settings`."""
    from redis.asyncio.retry import Retry as AsyncRetry

    s = settings or get_settings()
    common = _common(s)
    if s.redis_mode == "cluster":
        return redis.asyncio.RedisCluster(
            startup_nodes=[AsyncClusterNode(h, p) for h, p in s.rate_limit_redis_cluster_nodes],
            retry=AsyncRetry(NoBackoff(), 0),
            **common,
        )
    if s.redis_mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(
            s.rate_limit_redis_sentinels,
            sentinel_kwargs={k: v for k, v in common.items() if k != "password"},
            **common,
        )
        return sentinel.master_for(
            s.rate_limit_redis_sentinel_master, retry=AsyncRetry(NoBackoff(), 0), **common
        )
    overrides = {k: v for k, v in common.items() if v is not None}
    return redis.asyncio.Redis.from_url(
        s.rate_limit_redis_url, retry=AsyncRetry(NoBackoff(), 0), **overrides
    )

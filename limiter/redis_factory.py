"""Redis clients for the limiter, from settings: a single URL (``redis://``, ``rediss://``),
a Sentinel group (``RATE_LIMIT_REDIS_SENTINELS`` + ``RATE_LIMIT_REDIS_SENTINEL_MASTER``) or a
Cluster (``RATE_LIMIT_REDIS_CLUSTER_NODES``); the Cluster wins over Sentinel over the URL.

Every client gets the configured socket and connect timeouts and NO retries: a failing call
must come back within the timeout so the circuit breaker can count it, instead of redis-py's
default retries with exponential backoff stretching an outage into every request. A pooled
connection that the server closed is replaced by the pool before use, and a Sentinel-managed
connection asks the sentinels for the current master when it (re)connects, so a failover needs
no retry here either.

The sync ``RedisCluster`` asks the nodes for the slot map in its constructor; ``lazy=True``
defers that to the first call (:class:`LazyRedisCluster`), so a limiter built while the cluster
is down decides by its fail mode instead of failing at start-up. The asyncio client connects on
first use by itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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


class LazyRedisCluster:
    """A ``redis.RedisCluster`` made on its first use, with the client's attributes.

    While the cluster cannot be reached, every use raises what the constructor raised
    (``RedisClusterUnreachableError``, which the limiter's failure policy answers) and the next
    use tries again. Once made, the client's methods are bound on this object, so a call costs
    what it costs on the client itself."""

    def __init__(self, make: Callable[[], redis.RedisCluster]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._client: redis.RedisCluster | None = None

    @property
    def client(self) -> redis.RedisCluster:
        """The cluster client, made now if it was not yet."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make()
                client = self._client
        return client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # only the client's public attributes (not copy's, pickle's)
            raise AttributeError(name)
        value = getattr(self.client, name)
        if callable(value):
            self.__dict__[name] = value  # a bound method: later lookups skip __getattr__
        return value

    def close(self) -> None:
        """Close the client if it was made (a client never made has nothing to close)."""
        if self._client is not None:
            self._client.close()


def redis_from_settings(settings: Settings | None = None, *, lazy: bool = False) -> Any:
    """A sync client: ``redis.Redis`` (single node or Sentinel master) or ``RedisCluster``
    (``lazy``: a :class:`LazyRedisCluster`, which reaches the cluster on first use)."""
    s = settings or get_settings()
    common = _common(s)
    if s.redis_mode == "cluster":

        def make() -> redis.RedisCluster:  # new node objects each time: a failed try used them
            return redis.RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in s.rate_limit_redis_cluster_nodes],
                retry=Retry(NoBackoff(), 0),
                **common,
            )

        return LazyRedisCluster(make) if lazy else make()
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

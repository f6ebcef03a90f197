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

from metering.settings import Settings, SettingsError, get_settings


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

    @property
    def made(self) -> redis.RedisCluster | None:
        """The cluster client if it was made already, else ``None`` (never makes it)."""
        return self._client

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


def _redis_setting(settings: Settings) -> str:
    """The variable that names the Redis the limiter uses (the Cluster wins over Sentinel over
    the URL, as in :func:`redis_from_settings`)."""
    if settings.redis_mode == "cluster":
        return "RATE_LIMIT_REDIS_CLUSTER_NODES"
    if settings.redis_mode == "sentinel":
        return "RATE_LIMIT_REDIS_SENTINELS"
    return "RATE_LIMIT_REDIS_URL"


def check_redis_setup(settings: Settings | None = None, *, timeout: float = 2.0) -> str | None:
    """Ask the limiter's Redis once, at start-up, whether it takes the configured connection.

    A Redis that answers but refuses the connection's own setup (a database index the server
    does not have, a wrong password or user) is a setting no request can succeed with: raise
    :class:`SettingsError` naming the variable, rather than serve a failure on every request. So
    is a node of a Redis Cluster named by ``RATE_LIMIT_REDIS_URL`` or the Sentinel variables: it
    answers ``MOVED`` for every tenant whose slot another node serves, which only a Cluster
    client (``RATE_LIMIT_REDIS_CLUSTER_NODES``) follows. A Redis that does not answer (down,
    unreachable, busy) is not a setting's fault: the limiter decides by its fail mode until it
    answers, and the warning line to log is returned.

    A Redis that answers is also asked (``INFO memory``; on a Cluster, every primary) whether it
    evicts keys at ``maxmemory``: every limiter key carries a TTL, so ``volatile-*`` policies
    evict them as well as ``allkeys-*``, and an evicted day counter is re-seeded from the quota
    DB's backfill, which lags: the tenant's day restarts and its limits are off. Any
    ``maxmemory-policy`` other than ``noeviction`` (the recommended one) under a ``maxmemory``
    returns that warning line instead. A Redis that refuses ``INFO`` (as managed ones may) gets
    neither the Cluster check nor this one.

    ``None``: Redis answered and nothing is to be warned of. Waits at most ``timeout`` seconds
    per call (or the configured timeouts if shorter).
    """
    from limiter.failure_policy import SETUP_REFUSALS, redis_unavailable

    s = settings or get_settings()
    limit = {
        "rate_limit_redis_socket_timeout": min(timeout, s.rate_limit_redis_socket_timeout),
        "rate_limit_redis_connect_timeout": min(timeout, s.rate_limit_redis_connect_timeout),
    }
    client = redis_from_settings(s.model_copy(update=limit), lazy=True)
    name = _redis_setting(s)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        raise SettingsError(
            f"{name}: Redis refused the limiter's credentials ({exc}); "
            "check RATE_LIMIT_REDIS_PASSWORD or the URL's user and password"
        ) from None
    except redis.ResponseError as exc:
        if redis_unavailable(exc) and not str(exc).startswith(SETUP_REFUSALS):
            # MISCONF, BUSY, OOM, ...: a state that passes
            return f"{name}: Redis refuses commands for now ({exc}); deciding by the fail mode"
        raise SettingsError(f"{name}: Redis refused the limiter's connection: {exc}") from None
    except Exception as exc:  # down or unreachable: the failure policy's case, not a setting's
        return (
            f"{name}: Redis not reachable at start ({type(exc).__name__}: {exc}); "
            "deciding by the fail mode until it is"
        )
    else:
        cluster = s.redis_mode == "cluster"
        if not cluster and any(
            str(info.get("cluster_enabled", 0)) == "1" for info in _info(client, "cluster", False)
        ):
            raise SettingsError(
                f"{name}: the server is a node of a Redis Cluster (cluster_enabled:1), which "
                "answers MOVED for the tenants whose slots other nodes serve; name the cluster's "
                "nodes in RATE_LIMIT_REDIS_CLUSTER_NODES instead"
            )
        return _eviction_warning(name, _info(client, "memory", cluster))
    finally:
        client.close()


def _info(client: Any, section: str, cluster: bool) -> list[dict[str, Any]]:
    """The ``INFO section`` of the server (of each primary of a Cluster); none if refused (a
    managed Redis may rename or deny ``INFO``) or if the server stopped answering meanwhile."""
    try:
        if not cluster:
            return [client.info(section)]
        replies = client.info(section, target_nodes=redis.RedisCluster.PRIMARIES)
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError):
        return []
    if all(isinstance(reply, dict) for reply in replies.values()):  # {node name: INFO}
        return list(replies.values())
    return [replies]  # a single primary: its INFO itself


def _eviction_warning(name: str, infos: list[dict[str, Any]]) -> str | None:
    """The warning line for servers (their ``INFO memory``) that evict keys at maxmemory."""
    evicting = sorted(
        {
            str(info.get("maxmemory_policy"))
            for info in infos
            if str(info.get("maxmemory", 0)) not in ("0", "")
            and info.get("maxmemory_policy", "noeviction") != "noeviction"
        }
    )
    if not evicting:
        return None
    return (
        f"{name}: Redis evicts keys at maxmemory (maxmemory-policy {', '.join(evicting)}); the "
        "limiter's counters all carry a TTL and may be evicted, and an evicted day counter "
        "restarts from the quota DB's backfill, which lags: a tenant's daily usage would be "
        "forgotten. maxmemory-policy noeviction is recommended"
    )

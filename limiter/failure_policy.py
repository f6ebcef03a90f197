"""What the limiter answers when Redis cannot: the failure policy.

``fail_mode="open"`` (the default) allows, within the per-process :class:`LocalLimiter` ceiling;
``"closed"`` denies. Either way the decision says ``degraded=True`` and ``reason`` tells why,
``redis_down_events`` counts it, and a warning is logged (at most one per ``log_every`` seconds,
so an outage does not flood the log). The :class:`CircuitBreaker` decides whether Redis is tried
at all, so while it is open no call waits for a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import redis
import redis.asyncio
from redis import exceptions as rexc
from redis.cluster import key_slot

from limiter import metrics
from limiter.breaker import BreakerState, CircuitBreaker
from limiter.clock import utc_day
from limiter.decision import LOCAL_CEILING, REDIS_DOWN, Decision
from limiter.keys import token_bucket_key
from limiter.local_limiter import LocalLimiter
from limiter.quota import Quota

log = logging.getLogger("limiter")

FailMode = Literal["open", "closed"]

# Errors that mean "Redis is unavailable" (as opposed to a bug: those propagate).
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.ReadOnlyError,
    rexc.MasterDownError,
    rexc.ClusterError,
    rexc.SlotNotCoveredError,
    # A Cluster whose topology refresh reached no node: both cluster clients raise it for the
    # connection errors that follow. A RedisClusterException, not a RedisError; its other
    # RedisClusterExceptions (cross-slot keys, cluster mode off) are bugs and propagate.
    rexc.RedisClusterUnreachableError,
    OSError,
    asyncio.TimeoutError,
    rexc.OutOfMemoryError,  # OOM: maxmemory reached with noeviction, no write is taken
    # MOVED/ASK (MovedError is an AskError) reaching the limiter: a client that is no Cluster
    # client was sent to a Cluster node (one made a Cluster after start, or a URL naming one
    # node of it); the keys live where this client cannot follow. A Cluster client follows
    # these redirections itself and never passes them on.
    rexc.AskError,
)

#: Error replies by which a reachable Redis refuses every write for a while: the limiter cannot
#: count, exactly as when Redis is down (redis-py maps OOM and READONLY to classes of their own;
#: these arrive as plain ResponseError).
REFUSING_WRITES = frozenset({"MISCONF", "BUSY", "NOREPLICAS", "OOM", "READONLY", "MASTERDOWN"})

#: What an ``except`` around a Redis call catches; :func:`redis_unavailable` then tells a
#: refusal (the failure policy answers) from a bug (re-raised).
REDIS_ERRORS: tuple[type[BaseException], ...] = (*REDIS_UNAVAILABLE, rexc.ResponseError)


#: Error replies to a new connection's own setup, which redis-py raises from the command that
#: needed the connection: the server takes no command on this connection at all. Start-up
#: refuses such a setting (:func:`limiter.redis_factory.check_redis_setup`); a server changed
#: under a running process (restarted with fewer ``databases``) is then answered as down.
SETUP_REFUSALS = ("DB index is out of range",)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis cannot serve the limiter now: down, unreachable, refusing
    writes (``MISCONF`` after a failed save, ``BUSY`` running a slow script, ``OOM``,
    ``NOREPLICAS``), refusing the connection's setup (``SETUP_REFUSALS``) or redirecting a
    client that is no Cluster client (``MOVED``, ``ASK``). Not so another error reply (a key of
    the wrong type or value, a script error): that refuses one tenant's call, see
    :meth:`FailurePolicy.call_failed`."""
    if isinstance(exc, REDIS_UNAVAILABLE):
        return True
    if isinstance(exc, rexc.ResponseError):
        code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
        return code in REFUSING_WRITES or str(exc).startswith(SETUP_REFUSALS)
    return False


def wrong_type(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a script because one of its keys holds another type
    (``WRONGTYPE``): something else wrote into the limiter's key space. Redis itself is up."""
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith("WRONGTYPE")


def log_breaker_change(old: BreakerState, new: BreakerState) -> None:
    """The breaker's ``on_change`` hook: every transition is worth a log line."""
    if new == "open":
        log.warning("Redis unavailable: circuit breaker open (was %s)", old)
    else:
        log.warning("Redis reachable again: circuit breaker %s", new)


def log_master_breaker_change(master: str) -> Callable[[BreakerState, BreakerState], None]:
    """The ``on_change`` hook of one Cluster master's breaker: the log line names the master."""

    def changed(old: BreakerState, new: BreakerState) -> None:
        if new == "open":
            log.warning(
                "Redis Cluster master %s unavailable: its circuit breaker open (was %s)",
                master,
                old,
            )
        else:
            log.warning(
                "Redis Cluster master %s reachable again: its circuit breaker %s", master, new
            )

    return changed


def is_cluster_client(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (sync, asyncio, or a lazy sync one)."""
    from limiter.redis_factory import LazyRedisCluster

    return isinstance(client, redis.RedisCluster | redis.asyncio.RedisCluster | LazyRedisCluster)


class MasterBreakers:
    """One circuit breaker per master of a Redis Cluster, so that a master that fails (killed,
    cut off, failing over) sends to the fail mode only the tenants whose slots it serves, while
    the other masters' tenants go on being decided by Redis. With one breaker for the whole
    Cluster, a dead master's failures opened it for every tenant until its replica took over.

    A key's breaker is the one of the master that owns the key's slot in the client's slot map
    as it is now. A replica promoted by a failover is a new master, with a breaker of its own
    (closed), so its tenants come back as soon as the client's map names it (the dead master's
    half-open probes are what make the client read the map again). A key that cannot be placed
    gets ``default``, the breaker of the Cluster as a whole: the client has no slot map yet (a
    Cluster that could not be reached at all opens it), or the slot has no master."""

    def __init__(self, client: Any, default: CircuitBreaker) -> None:
        from limiter.redis_factory import LazyRedisCluster

        self._client = client
        self._lazy = client if isinstance(client, LazyRedisCluster) else None
        self.default = default
        #: ``host:port`` of each master met so far -> its breaker.
        self.by_master: dict[str, CircuitBreaker] = {}

    def for_key(self, key: bytes) -> CircuitBreaker:
        """The breaker of the master that serves ``key`` (see the class)."""
        client = self._client
        if self._lazy is not None:
            client = self._lazy.made  # a lazy client is never made here: that would connect
            if client is None:
                return self.default
        try:
            master: str = client.nodes_manager.get_node_from_slot(key_slot(key)).name
        except Exception:  # no slot map yet, or the slot has no master
            return self.default
        breaker = self.by_master.get(master)
        if breaker is None:
            breaker = self.by_master.setdefault(
                master, self.default.like(on_change=log_master_breaker_change(master))
            )
        return breaker


def shared_breaker(quotas: object, breaker: CircuitBreaker | None) -> CircuitBreaker | None:
    """The breaker of a limiter given ``breaker`` (``None``: the policy's default) and the quota
    provider ``quotas``, shared with the provider when it reads Redis itself (it has
    ``use_breaker``, as :class:`limiter.quotas.QuotaCache`): the quota read before a decision
    then skips Redis while the breaker is open, and its failures count toward opening it.

    A limiter given no breaker takes the provider's, if it has one; a provider without one
    takes the limiter's. A provider that already has another keeps it."""
    use = getattr(quotas, "use_breaker", None)
    if not callable(use):
        return breaker
    if breaker is None:
        own = getattr(quotas, "breaker", None)
        breaker = (
            own if isinstance(own, CircuitBreaker) else CircuitBreaker(on_change=log_breaker_change)
        )
    use(breaker)
    return breaker


def share_master_breakers(quotas: object, policy: FailurePolicy) -> None:
    """On a Cluster, the quota provider that shares ``policy``'s breaker (see
    :func:`shared_breaker`) shares its per-master breakers too: a quota read goes to the master
    of its own key, and counts toward (or is spared by) that master's breaker. A provider that
    already shares another limiter's, around the same breaker, lends them to this one: two
    limiters over one cache keep one breaker per master, as they kept one breaker."""
    use = getattr(quotas, "use_master_breakers", None)
    if (
        policy.masters is not None
        and callable(use)
        and getattr(quotas, "breaker", None) is policy.breaker
    ):
        policy.masters = use(policy.masters)


class FailurePolicy:
    @classmethod
    def from_settings(cls, settings: Any) -> FailurePolicy:
        """From ``RATE_LIMIT_FAIL_MODE``, ``RATE_LIMIT_BREAKER_*`` and
        ``RATE_LIMIT_LOCAL_CEILING_PER_SEC``."""
        return cls(
            settings.rate_limit_fail_mode,
            breaker=CircuitBreaker(
                settings.rate_limit_breaker_failures,
                settings.rate_limit_breaker_reset,
                on_change=log_breaker_change,
            ),
            local_limiter=LocalLimiter(settings.rate_limit_local_ceiling_per_sec),
        )

    @classmethod
    def for_limiter(
        cls,
        fail_mode: FailMode,
        redis_client: Any,
        quotas: object,
        *,
        breaker: CircuitBreaker | None = None,
        local_limiter: LocalLimiter | None = None,
    ) -> FailurePolicy:
        """The policy of a limiter on ``redis_client`` with the quota provider ``quotas``: its
        breaker shared with the provider (:func:`shared_breaker`) and, on a Cluster, one per
        master, shared likewise (:meth:`per_master`, :func:`share_master_breakers`)."""
        policy = cls(
            fail_mode, breaker=shared_breaker(quotas, breaker), local_limiter=local_limiter
        )
        policy.per_master(redis_client)
        share_master_breakers(quotas, policy)
        return policy

    def __init__(
        self,
        fail_mode: FailMode = "open",
        *,
        breaker: CircuitBreaker | None = None,
        local_limiter: LocalLimiter | None = None,
        log_every: float = 5.0,
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', not {fail_mode!r}")
        self.fail_mode = fail_mode
        self.breaker = breaker or CircuitBreaker(on_change=log_breaker_change)
        #: Set by :meth:`per_master` for a Cluster client: a breaker per master.
        self.masters: MasterBreakers | None = None
        self.local = local_limiter or LocalLimiter(100.0)
        self._log_every = log_every
        self._logged_at = -1e18
        self._refused_logged_at = -1e18

    def per_master(self, client: Any) -> None:
        """Give each master of ``client``, when it is a Redis Cluster client, a breaker of its
        own (:class:`MasterBreakers`); ``breaker`` stays the one of anything else."""
        if is_cluster_client(client):
            self.masters = MasterBreakers(client, self.breaker)

    def breaker_of(self, tenant: str) -> CircuitBreaker:
        """The breaker that guards ``tenant``'s calls: ``breaker``, or on a Cluster the one of
        the master serving the tenant's keys (they share the tenant's hash tag)."""
        masters = self.masters
        if masters is None:
            return self.breaker
        return masters.for_key(token_bucket_key(tenant).encode())

    def redis_failed(self, exc: BaseException, breaker: CircuitBreaker | None = None) -> None:
        """A call failed because Redis is unavailable: a failure of ``breaker`` (by default
        ``self.breaker``), and a warning now and then."""
        (breaker or self.breaker).record_failure()
        now = time.monotonic()
        if now - self._logged_at >= self._log_every:
            self._logged_at = now
            log.warning(
                "Redis call failed (%s: %s); deciding fail-%s",
                type(exc).__name__,
                exc,
                self.fail_mode,
            )

    def call_failed(
        self, exc: BaseException, tenant: str, breaker: CircuitBreaker | None = None
    ) -> None:
        """A limiter call for ``tenant`` raised ``exc``; the caller then answers without Redis.

        Redis unavailable: a failure of ``breaker`` (see :meth:`redis_failed`). Any other error
        reply refuses this tenant's call, not Redis: a key under ``rl:{tenant}:`` holding
        another type (``WRONGTYPE``) or a value the limiter did not write (something else wrote
        into its key space), or a script error. It repeats for every call of that tenant until
        the key is deleted (or the script fixed), so the tenant is decided by the fail mode
        instead of every request of it failing, an error is logged (at most every
        ``log_every`` seconds) naming the keys, and the breaker counts a success (Redis
        answered). Anything that is no Redis error is a bug and is raised again."""
        if redis_unavailable(exc):
            self.redis_failed(exc, breaker)
            return
        if not isinstance(exc, rexc.ResponseError):
            raise exc
        (breaker or self.breaker).record_success()
        now = time.monotonic()
        if now - self._refused_logged_at >= self._log_every:
            self._refused_logged_at = now
            what = (
                "holds another type, written by something else: delete it"
                if wrong_type(exc)
                else "may hold a value the limiter did not write (delete it), or Redis refuses"
                " the call itself (an ACL, a script error)"
            )
            log.error(
                "Redis refused the limiter's call for tenant %r (%s): a key under rl:{%s}: %s;"
                " deciding fail-%s for each such call",
                tenant,
                exc,
                tenant,
                what,
                self.fail_mode,
            )

    def decide(
        self,
        tenant: str,
        cost: int,
        quota: Quota,
        day: int,
        started: float | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> Decision:
        """A decision without Redis. ``started`` is the decision's ``time.perf_counter()`` at
        its start: the latency histogram gets the time since, Redis timeouts waited out
        included (without it, 0). ``breaker`` (by default ``self.breaker``) is the one that
        kept Redis out: a refusal's ``retry_after`` is the time until its next probe."""
        seconds = 0.0 if started is None else time.perf_counter() - started
        metrics.redis_down_events.inc()
        date, reset_at = utc_day(day)
        if self.fail_mode == "open":
            allowed, tokens, retry = self.local.try_acquire(tenant, cost)
            reason = REDIS_DOWN if allowed else LOCAL_CEILING
        else:
            retry = max((breaker or self.breaker).retry_in(), 0.001)
            allowed, tokens = False, 0.0
            reason = REDIS_DOWN
        if allowed:
            metrics.decisions.allowed(0, seconds)  # nothing consumed from Redis
        else:
            metrics.decisions.rejected(reason, seconds)
        return Decision(
            allowed=allowed,
            limit=quota.burst,
            # The local ceiling's tokens, reported against the burst: never more than it.
            remaining=min(int(tokens), quota.burst),
            retry_after=retry,
            daily_limit=quota.daily_limit,
            daily_used=0,
            daily_remaining=quota.daily_limit,
            reset_at=reset_at,
            reason=reason,
            tenant=tenant,
            cost=cost,
            day=date,
            degraded=True,
            window_limit=quota.window_limit,
            window_remaining=quota.window_limit,
            quota=quota,
        )

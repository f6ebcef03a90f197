"""The synchronous limiter: one atomic Lua call per decision.

Against a single node or a Sentinel-managed master the call skips redis-py's generic command
path: the EVALSHA is pre-encoded (see :mod:`limiter.scripts`), written on a pooled connection
and its reply read back, which is most of what a decision costs in Python. Against a Cluster
it goes through redis-py's ``execute_command``, which routes by the tenant's hash slot.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from redis.exceptions import NoScriptError

from limiter.breaker import FAILURES_HERE, CircuitBreaker
from limiter.clock import utc_day
from limiter.core import LimiterCore, NoQuota, check_cost, check_tenant, settle_inputs
from limiter.decision import Decision, Settlement
from limiter.failure_policy import (
    REDIS_ERRORS,
    FailMode,
    FailurePolicy,
)
from limiter.local_limiter import LocalLimiter
from limiter.quota import Quota
from limiter.quota_provider import QuotaProvider
from limiter.scripts import (
    DAY_GRACE_SECONDS,
    NEED_SEED,
    SCRIPTS,
)

#: A limiter connection unused for longer than this is polled for EOF before it is written to.
IDLE_CHECK_SECONDS = 0.05


class RateLimiter:
    """Per-tenant token bucket + UTC-day quota (+ optional rolling window) in Redis.

    ``acquire`` is atomic per decision; a rejection changes nothing. When Redis is unavailable
    the failure policy answers (``fail_mode``), with ``Decision.degraded`` set.

    Give it a client from :mod:`limiter.redis_factory` (or one with socket timeouts and no
    retries): redis-py's default retries with backoff would stretch every failing call far past
    the timeout before the breaker can open.
    """

    def __init__(
        self,
        redis_client: Any,
        quotas: QuotaProvider | None = None,
        *,
        fail_mode: FailMode = "open",
        breaker: CircuitBreaker | None = None,
        local_limiter: LocalLimiter | None = None,
        day_grace_seconds: int = DAY_GRACE_SECONDS,
    ) -> None:
        self.redis = redis_client
        # A quota provider that reads Redis (the QuotaCache) shares the breaker: see acquire.
        self.policy = FailurePolicy.for_limiter(
            fail_mode, redis_client, quotas, breaker=breaker, local_limiter=local_limiter
        )
        self._core = LimiterCore(quotas, day_grace_seconds)
        self.clock = self._core.clock  # the estimate of the Redis server's clock
        # A plain client (single node or Sentinel master) gets the direct connection path.
        self._pool = redis_client.connection_pool if isinstance(redis_client, redis.Redis) else None
        self._own_lock = threading.Lock()
        self._own: tuple[int, Any] | None = None  # (pid, connection) kept by this limiter
        self._own_used = float("-inf")  # time.monotonic() of its last use

    @classmethod
    def from_settings(
        cls, settings: Any = None, quotas: QuotaProvider | None = None
    ) -> RateLimiter:
        """A limiter wired from :class:`metering.settings.Settings` (Redis, fail mode, breaker).
        A Cluster client reaches the cluster on first use, so the limiter is built while the
        cluster is down and decides by its fail mode meanwhile."""
        from limiter.redis_factory import redis_from_settings
        from metering.settings import get_settings

        s = settings or get_settings()
        policy = FailurePolicy.from_settings(s)
        return cls(
            redis_from_settings(s, lazy=True),
            quotas,
            fail_mode=policy.fail_mode,
            breaker=policy.breaker,
            local_limiter=policy.local,
        )

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker of the limiter's Redis; on a Cluster, of the calls that cannot be
        placed on a master yet (each master has its own: ``policy.breaker_of(tenant)``)."""
        return self.policy.breaker

    # --- public --------------------------------------------------------------------------------
    def acquire(self, tenant: str, cost: int = 1, quota: Quota | None = None) -> Decision:
        """Decide whether ``tenant`` may spend ``cost`` units now, and if so spend them."""
        started = time.perf_counter()
        core = self._core
        check_tenant(tenant)
        check_cost(cost)
        policy = self.policy
        failed: list[CircuitBreaker] = []  # the breakers that failures of the lookup went to
        if quota is None:
            # A QuotaCache shares the breaker: while it is open, the lookup reads no Redis. A
            # read that failed (Redis unavailable) counts toward opening it, and the decision
            # then makes no call of its own: one timeout waited out per decision, not two (on
            # a Cluster: when the read failed on the master that serves this decision too).
            here = FAILURES_HERE.set(failed)
            try:
                quota = self._quota(tenant)
            finally:
                FAILURES_HERE.reset(here)
        breaker = policy.breaker_of(tenant)
        if breaker in failed or not breaker.allow():
            return policy.decide(tenant, cost, quota, core.clock.today(), started, breaker)
        try:
            day = core.clock.today()
            seed = core.first_seed
            changes = core.server_changes
            if changes and core.reseed_due(tenant):  # the server changed: see LimiterCore
                seed = b"%d" % self._seed(tenant, day)
            for _ in range(5):
                try:
                    if self._pool is not None:
                        reply = self._roundtrip(
                            core.encoder.acquire_packed(tenant, day, cost, quota, seed)
                        )
                    else:
                        args = core.encoder.acquire_args(tenant, day, cost, quota, seed)
                        reply = self.redis.execute_command(*args)
                except NoScriptError:
                    # The server lost the scripts (restarted, restored, failed over): its day
                    # counter may be older than what was counted, so the call goes again
                    # carrying the seed (see LimiterCore.server_changes).
                    self._load_scripts()
                    changes = core.server_changes
                    if changes:
                        seed = b"%d" % self._seed(tenant, day)
                    continue
                status = reply[0]
                if status >= 0:
                    break
                day = reply[6]
                core.clock.observe(reply[7])
                # NEED_SEED: that day's seed. WRONG_DAY: again with the server's day and no seed,
                # as one fetched while midnight passed is the ended day's.
                seed = b"%d" % self._seed(tenant, day) if status == NEED_SEED else core.first_seed
            else:
                raise RuntimeError(f"acquire.lua kept answering status {status}")
        except REDIS_ERRORS as exc:
            policy.call_failed(exc, tenant, breaker)  # a bug is raised again
            return policy.decide(tenant, cost, quota, core.clock.today(), started, breaker)
        breaker.record_success()
        if changes and seed != core.first_seed:
            core.reseeded(tenant, changes)
        return core.decision(reply, tenant, cost, quota, started)

    def settle(
        self,
        tenant: str,
        decision_or_reserved_cost: Decision | int,
        actual_cost: int,
        quota: Quota | None = None,
    ) -> Settlement:
        """Correct an allowed decision's cost to ``actual_cost``: the difference is added to (or
        given back to) the day's counter and the bucket, atomically; no counter goes below 0.

        Given a :class:`Decision`, the correction goes to the day it was counted in. A degraded
        decision reserved nothing in Redis: nothing is settled (``applied=False``)."""
        check_tenant(tenant)
        delta, day = settle_inputs(decision_or_reserved_cost, actual_cost)
        if isinstance(decision_or_reserved_cost, Decision):
            if decision_or_reserved_cost.degraded:
                return self._core.unsettled(tenant, delta)
            quota = quota or decision_or_reserved_cost.quota
        if quota is None:
            quota = self._quota(tenant)
        breaker = self.policy.breaker_of(tenant)
        if not breaker.allow():
            return self._core.unsettled(tenant, delta)
        today = day is None
        core = self._core
        if day is None:
            day = core.clock.today()
        try:
            for _ in range(4):
                reply = self._call(core.encoder.settle_args(tenant, day, delta, quota, today=today))
                if (retry := core.settle_retry_day(reply)) is None:
                    break
                day = retry
            else:
                raise RuntimeError("settle.lua kept answering WRONG_DAY")
        except REDIS_ERRORS as exc:
            self.policy.call_failed(exc, tenant, breaker)  # a bug is raised again
            return self._core.unsettled(tenant, delta)
        breaker.record_success()
        return self._core.settlement(reply, tenant, delta)

    def close(self) -> None:
        """Give the limiter's own connection back to the pool (the client stays open)."""
        with self._own_lock:
            if self._own is not None and self._own[0] == os.getpid() and self._pool is not None:
                self._pool.release(self._own[1])
            self._own = None

    # --- internals -----------------------------------------------------------------------------
    def _quota(self, tenant: str) -> Quota:
        if self._core.quotas is None:
            raise NoQuota(f"no quota given for tenant {tenant!r} and no quota provider set")
        return self._core.quotas.get(tenant)

    def _seed(self, tenant: str, day: int) -> int:
        assert self._core.quotas is not None  # NEED_SEED is only asked for with a provider
        return check_cost(self._core.quotas.daily_seed(tenant, utc_day(day)[0]), "daily seed")

    def _load_scripts(self) -> None:
        for script in SCRIPTS:
            self.redis.script_load(script.source)
        self._core.server_changed()

    def _call(self, args: tuple[Any, ...]) -> Any:
        try:
            return self.redis.execute_command(*args)
        except NoScriptError:
            self._load_scripts()
            return self.redis.execute_command(*args)

    def _roundtrip(self, command: bytes) -> Any:
        """Write one packed command and read its reply.

        The limiter keeps one connection of its own for the uncontended case (one thread at a
        time: no pool bookkeeping per call); a caller that finds it busy takes one from the
        pool. Either way a connection the server closed is replaced before use."""
        if self._own_lock.acquire(blocking=False):
            try:
                pid = os.getpid()
                if self._own is None or self._own[0] != pid:  # first use, or a forked child
                    self._own = (pid, self._pool.get_connection())  # type: ignore[union-attr]
                conn = self._own[1]
                now = time.monotonic()
                if now - self._own_used > IDLE_CHECK_SECONDS:
                    # Idle long enough for Redis to have restarted or closed it: a poll (one
                    # system call) sees EOF or a stray reply, and the call goes out on a fresh
                    # connection instead of failing. A busy connection needs no poll: one that
                    # failed was dropped by _exchange, so the next call reconnects anyway.
                    try:
                        if conn.can_read():
                            conn.disconnect()
                    except (redis.exceptions.ConnectionError, OSError):
                        conn.disconnect()
                self._own_used = now
                return self._exchange(conn, command)
            finally:
                self._own_lock.release()
        pool = self._pool
        assert pool is not None
        conn = pool.get_connection()
        try:
            return self._exchange(conn, command)
        finally:
            pool.release(conn)

    @staticmethod
    def _exchange(conn: Any, command: bytes) -> Any:
        try:
            conn.send_packed_command((command,))
            return conn.read_response()
        except redis.exceptions.ResponseError:
            raise  # a complete error reply: the connection is still in step
        except BaseException:
            conn.disconnect()  # never reuse a connection with a reply half read
            raise

"""The asyncio limiter: the same decisions as :class:`limiter.RateLimiter`, with the calls of
concurrent callers coalesced into pipelined round trips (:mod:`limiter.batching`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError

from limiter.batching import ScriptBatcher
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
from limiter.scripts import DAY_GRACE_SECONDS, NEED_SEED, packed


class AsyncRateLimiter:
    """Async twin of :class:`limiter.RateLimiter` (same names, same decisions, same advice on
    the client: timeouts, no retries). ``max_batch`` bounds one pipelined write,
    ``max_inflight`` the writes awaiting replies, ``answer_chunk`` the size above which the
    callers of a lone write are answered in halves so that their next calls overlap (see
    :mod:`limiter.batching`; the defaults keep Redis and Python busy at once with tens to
    hundreds of callers). Like its redis.asyncio client, one instance belongs to one event
    loop."""

    def __init__(
        self,
        redis_client: Any,
        quotas: QuotaProvider | None = None,
        *,
        fail_mode: FailMode = "open",
        breaker: CircuitBreaker | None = None,
        local_limiter: LocalLimiter | None = None,
        day_grace_seconds: int = DAY_GRACE_SECONDS,
        max_batch: int = 64,
        max_inflight: int = 4,
        answer_chunk: int = 8,
    ) -> None:
        self.redis = redis_client
        # A quota provider that reads Redis (the QuotaCache) shares the breaker: see acquire.
        self.policy = FailurePolicy.for_limiter(
            fail_mode, redis_client, quotas, breaker=breaker, local_limiter=local_limiter
        )
        self._core = LimiterCore(quotas, day_grace_seconds)
        self.clock = self._core.clock  # the estimate of the Redis server's clock
        self._batcher = ScriptBatcher(
            redis_client,
            max_batch=max_batch,
            max_inflight=max_inflight,
            answer_chunk=answer_chunk,
            on_scripts_loaded=self._core.server_changed,
        )

    @classmethod
    def from_settings(
        cls, settings: Any = None, quotas: QuotaProvider | None = None
    ) -> AsyncRateLimiter:
        from limiter.redis_factory import async_redis_from_settings
        from metering.settings import get_settings

        s = settings or get_settings()
        policy = FailurePolicy.from_settings(s)
        return cls(
            async_redis_from_settings(s),
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

    async def acquire(
        self,
        tenant: str,
        cost: int = 1,
        quota: Quota | None = None,
        *,
        on_abandoned: Callable[[Decision], None] | None = None,
    ) -> Decision:
        """Decide whether ``tenant`` may spend ``cost`` units now, and if so spend them.

        A caller cancelled while its call is in flight does not get the decision, but Redis
        makes it all the same once the call is written (its units are spent).
        ``on_abandoned`` then gets that decision when Redis's reply arrives, so that a caller
        that meters decisions (the middleware emits each one) meters this one too. A call not
        written yet when its caller is cancelled is taken back and never runs; one whose
        connection fails has an unknown outcome and ``on_abandoned`` is not called."""
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
                quota = await self._quota(tenant)
            finally:
                FAILURES_HERE.reset(here)
        breaker = policy.breaker_of(tenant)
        if breaker in failed or not breaker.allow():
            return policy.decide(tenant, cost, quota, core.clock.today(), started, breaker)
        batcher = self._batcher
        encoder = core.encoder
        try:
            day = core.clock.today()
            seed = core.first_seed
            changes = core.server_changes
            if changes and core.reseed_due(tenant):  # the server changed: see LimiterCore
                seed = b"%d" % await self._seed(tenant, day)
            for _ in range(5):
                if batcher.packed:
                    call: Any = encoder.acquire_packed(tenant, day, cost, quota, seed)
                else:
                    call = encoder.acquire_args(tenant, day, cost, quota, seed)
                fut = batcher.submit(call)
                try:
                    reply = await fut
                except asyncio.CancelledError:
                    if on_abandoned is not None:
                        batcher.abandon(
                            fut,
                            self._abandoned_reply(
                                tenant, cost, quota, started, seed, changes, on_abandoned
                            ),
                        )
                    raise
                except NoScriptError:
                    # The server lost the scripts (restarted, restored, failed over): its day
                    # counter may be older than what was counted, so the call goes again
                    # carrying the seed (see LimiterCore.server_changes).
                    await batcher.load_scripts()
                    changes = core.server_changes
                    if changes:
                        seed = b"%d" % await self._seed(tenant, day)
                    continue
                status = reply[0]
                if status >= 0:
                    break
                day = reply[6]
                core.clock.observe(reply[7])
                # NEED_SEED: that day's seed. WRONG_DAY: again with the server's day and no seed,
                # as one fetched while midnight passed is the ended day's.
                if status == NEED_SEED:
                    seed = b"%d" % await self._seed(tenant, day)
                else:
                    seed = core.first_seed
            else:
                raise RuntimeError(f"acquire.lua kept answering status {status}")
        except REDIS_ERRORS as exc:
            policy.call_failed(exc, tenant, breaker)  # a bug is raised again
            return policy.decide(tenant, cost, quota, core.clock.today(), started, breaker)
        breaker.record_success()
        if changes and seed != core.first_seed:
            core.reseeded(tenant, changes)
        return core.decision(reply, tenant, cost, quota, started)

    def _abandoned_reply(
        self,
        tenant: str,
        cost: int,
        quota: Quota,
        started: float,
        seed: bytes,
        changes: int,
        on_abandoned: Callable[[Decision], None],
    ) -> Callable[[Any], None]:
        """What to do with the reply of a call whose caller was cancelled: the same as
        :meth:`acquire` does with a decision, which then goes to ``on_abandoned``."""
        core = self._core
        breaker = self.policy.breaker_of(tenant)

        def on_reply(reply: Any) -> None:
            if isinstance(reply, BaseException) or reply[0] < 0:
                return  # an error reply, or no decision yet (a seed asked for): nothing spent
            breaker.record_success()
            if changes and seed != core.first_seed:
                core.reseeded(tenant, changes)
            on_abandoned(core.decision(reply, tenant, cost, quota, started))

        return on_reply

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait, at most ``timeout`` s, for the calls in flight to be answered, so that the
        decisions of callers cancelled meanwhile reach their ``on_abandoned`` (a server's
        shutdown: after cancelling its requests, before closing their emitter). True if none
        was left."""
        return await self._batcher.drain(timeout)

    async def settle(
        self,
        tenant: str,
        decision_or_reserved_cost: Decision | int,
        actual_cost: int,
        quota: Quota | None = None,
    ) -> Settlement:
        """See :meth:`limiter.RateLimiter.settle`."""
        check_tenant(tenant)
        delta, day = settle_inputs(decision_or_reserved_cost, actual_cost)
        if isinstance(decision_or_reserved_cost, Decision):
            if decision_or_reserved_cost.degraded:
                return self._core.unsettled(tenant, delta)
            quota = quota or decision_or_reserved_cost.quota
        if quota is None:
            quota = await self._quota(tenant)
        breaker = self.policy.breaker_of(tenant)
        if not breaker.allow():
            return self._core.unsettled(tenant, delta)
        today = day is None
        core = self._core
        if day is None:
            day = core.clock.today()
        try:
            for _ in range(4):
                args = core.encoder.settle_args(tenant, day, delta, quota, today=today)
                reply = await self._batcher.execute(packed(args) if self._batcher.packed else args)
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

    async def _quota(self, tenant: str) -> Quota:
        if self._core.quotas is None:
            raise NoQuota(f"no quota given for tenant {tenant!r} and no quota provider set")
        return await self._core.quotas.aget(tenant)

    async def _seed(self, tenant: str, day: int) -> int:
        assert self._core.quotas is not None  # NEED_SEED is only asked for with a provider
        seed = await self._core.quotas.adaily_seed(tenant, utc_day(day)[0])
        return check_cost(seed, "daily seed")

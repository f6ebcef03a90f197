"""What the sync and async limiters share: input checks, reply decoding, metrics.

Everything here is pure (no I/O), so both limiters make exactly the same decisions from the
same replies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from limiter import metrics
from limiter.clock import ServerClock, epoch_day, utc_day
from limiter.decision import (
    BUCKET,
    COST_EXCEEDS_BURST,
    COST_EXCEEDS_DAILY,
    COST_EXCEEDS_WINDOW,
    DAILY,
    OK,
    WINDOW,
    Decision,
    Settlement,
)
from limiter.quota import Quota
from limiter.quota_provider import QuotaProvider
from limiter.scripts import ALLOWED, SETTLE_WRONG_DAY, CallEncoder
from metering.ids import validate_tenant_id

REASONS = (OK, BUCKET, DAILY, WINDOW, COST_EXCEEDS_BURST, COST_EXCEEDS_WINDOW, COST_EXCEEDS_DAILY)
MAX_COST = 2**53  # Lua numbers are doubles: larger integers lose precision


class InvalidCost(ValueError):
    """A cost that is not a non-negative integer."""


class NoQuota(LookupError):
    """No quota was given and the limiter has no quota provider to ask."""


def check_cost(cost: object, name: str = "cost") -> int:
    if type(cost) is not int or not 0 <= cost <= MAX_COST:  # bool is refused too
        raise InvalidCost(f"{name} must be a non-negative integer, not {cost!r}")
    return cost


_valid_tenants: set[str] = set()


def check_tenant(tenant: object) -> str:
    """Validate once per tenant id (a bounded set remembers the ones seen)."""
    if isinstance(tenant, str) and tenant in _valid_tenants:
        return tenant
    valid = validate_tenant_id(tenant)
    if len(_valid_tenants) >= 100_000:
        _valid_tenants.clear()
    _valid_tenants.add(valid)
    return valid


_RESEEDED_MAX = 100_000


class LimiterCore:
    def __init__(self, quotas: QuotaProvider | None, day_grace_seconds: int) -> None:
        self.quotas = quotas
        self.encoder = CallEncoder(day_grace_seconds)
        self.clock = ServerClock()
        # Without a provider there is nothing to seed from: a lost day starts at 0 (no 2nd trip).
        self.first_seed = b"0" if quotas is None else b""
        #: Times a Redis server answered without the limiter's scripts (``NOSCRIPT``: restarted,
        #: restored from a snapshot, failed over, ``SCRIPT FLUSH``). Its day counters may have
        #: come back from an older snapshot, lower than what was counted (and backfilled into
        #: the quota DB) since: from then on each tenant's next decision carries its quota DB
        #: seed once, and acquire.lua raises a lower counter to it. Stays 0 without a provider.
        self.server_changes = 0
        self._reseeded: dict[str, int] = {}  # tenant -> server_changes its seed was sent in
        self._metrics = metrics.decisions

    def server_changed(self) -> None:
        """A server answered ``NOSCRIPT``: every tenant's next decision sends its seed."""
        if self.quotas is not None:
            self.server_changes += 1
            self._reseeded.clear()

    def reseed_due(self, tenant: str) -> bool:
        """Whether ``tenant``'s decision should carry its seed (hot path: only asked while
        ``server_changes`` is non-zero)."""
        return self._reseeded.get(tenant) != self.server_changes

    def reseeded(self, tenant: str, changes: int) -> None:
        """``tenant``'s seed reached the server as it was after ``changes`` changes."""
        if len(self._reseeded) >= _RESEEDED_MAX:
            self._reseeded.clear()  # at worst a tenant's seed is sent once more
        self._reseeded[tenant] = changes

    def decision(
        self, reply: Sequence[int], tenant: str, cost: int, quota: Quota, started: float
    ) -> Decision:
        """Decode an ALLOWED/REJECTED reply of acquire.lua and count it in the metrics."""
        status, reason_code, tokens, retry_ms, used, win_used, server_day, now_s = reply
        self.clock.observe(now_s)
        date, reset_at = utc_day(server_day)
        allowed = status == ALLOWED
        reason = REASONS[reason_code]
        daily_limit = quota.daily_limit
        window_limit = quota.window_limit
        decision = Decision(
            allowed,
            quota.burst,
            tokens,
            retry_ms / 1000,
            daily_limit,
            used,
            daily_limit - used if used < daily_limit else 0,
            reset_at,
            reason,
            tenant,
            cost,
            date,
            False,
            window_limit,
            None if window_limit is None else max(0, window_limit - win_used),
            quota,
        )
        if allowed:
            self._metrics.allowed(cost, time.perf_counter() - started)
        else:
            self._metrics.rejected(reason, time.perf_counter() - started, reason == DAILY)
        return decision

    def settle_retry_day(self, reply: Sequence[int]) -> int | None:
        """None if settle.lua applied the call; else (WRONG_DAY: midnight passed, or the clock
        estimate was off) the server's day to settle into, its clock observed."""
        if reply[0] != SETTLE_WRONG_DAY:
            return None
        self.clock.observe(reply[2])
        return int(reply[1])

    def settlement(self, reply: Sequence[int], tenant: str, delta: int) -> Settlement:
        used, tokens, _win_used = reply
        return Settlement(tenant, delta, None if used < 0 else used, tokens)

    def unsettled(self, tenant: str, delta: int) -> Settlement:
        return Settlement(tenant, delta, None, 0, applied=False)


def settle_inputs(
    decision_or_reserved_cost: Decision | int, actual_cost: int
) -> tuple[int, int | None]:
    """(delta, epoch day or None for today) of a settle call; refuses what cannot be settled."""
    check_cost(actual_cost, "actual_cost")
    if isinstance(decision_or_reserved_cost, Decision):
        d = decision_or_reserved_cost
        if not d.allowed:
            raise ValueError("a rejected decision reserved nothing: there is nothing to settle")
        return actual_cost - d.cost, epoch_day(d.day)
    reserved = check_cost(decision_or_reserved_cost, "reserved cost")
    return actual_cost - reserved, None

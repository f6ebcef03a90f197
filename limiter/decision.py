"""What a rate-limit decision says, and what settling a cost changed."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from limiter.quota import Quota

# Why a decision came out as it did.
OK = "ok"
BUCKET = "bucket"  # not enough tokens in the bucket now; retry_after says when
DAILY = "daily"  # the UTC day's quota is used up; retry_after runs to reset_at
WINDOW = "window"  # the rolling window is full
COST_EXCEEDS_BURST = "cost_exceeds_burst"  # can never pass: cost > burst (retry_after 0)
COST_EXCEEDS_WINDOW = "cost_exceeds_window"  # can never pass: cost > window_limit
COST_EXCEEDS_DAILY = "cost_exceeds_daily"  # can never pass: cost > daily_limit (retry_after 0)
REDIS_DOWN = "redis_down"  # decided without Redis (fail mode), see ``degraded``
LOCAL_CEILING = "local_ceiling"  # Redis is down and the per-process ceiling is reached
#: Not the limiter's: the middleware's event for a tenant the quota provider refused (shadow mode)
UNKNOWN_TENANT = "unknown_tenant"


class Decision(NamedTuple):
    """One decision. A rejection changed no counter. ``degraded`` is true when it was made
    without Redis (then the daily fields are the quota's, not live counts). ``day`` is the UTC
    day the cost was counted into (the Redis server's day), which :meth:`settle` corrects."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    daily_limit: int
    daily_used: int
    daily_remaining: int
    reset_at: dt.datetime
    reason: str
    tenant: str
    cost: int
    day: dt.date
    degraded: bool = False
    window_limit: int | None = None
    window_remaining: int | None = None
    quota: Quota | None = None


class Settlement(NamedTuple):
    """The result of settling a decision: ``delta`` = actual - reserved was applied.
    ``daily_used`` is None when the day's counter no longer exists (nothing to correct)."""

    tenant: str
    delta: int
    daily_used: int | None
    remaining: int
    applied: bool = True

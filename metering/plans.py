"""Named plans and the validation of quota limits.

A plan is a named set of default limits. A tenant row names its plan and may override any limit;
an unknown tenant gets ``QUOTA_DEFAULT_PLAN``'s limits when ``QUOTA_UNKNOWN_TENANT=default``.
``custom`` has no defaults: every limit must be given.

:func:`check_limits` is the one place a set of limits is judged; the quota DB, the CLI and the
HTTP API all call it, so the same nonsense gets the same message everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from limiter.quota import check_refill

#: The longest rolling window a tenant may have (one day); the daily limit covers longer spans.
MAX_WINDOW_SECONDS = 86_400
#: A bound that keeps every limit inside a signed 64-bit column and a Lua number.
MAX_LIMIT = 10**15


class QuotaError(ValueError):
    """A quota or plan from outside is not acceptable; the message names the field."""


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits: a token bucket (rate, burst), a UTC-day total, an optional window."""

    rate_per_sec: float
    burst: int
    daily_limit: int
    window_limit: int | None = None
    window_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: Limits | None  # None: "custom", every limit is given explicitly


PLANS: dict[str, Plan] = {
    "free": Plan("free", Limits(rate_per_sec=5.0, burst=10, daily_limit=1_000)),
    "pro": Plan("pro", Limits(rate_per_sec=50.0, burst=100, daily_limit=100_000)),
    "enterprise": Plan(
        "enterprise",
        Limits(
            rate_per_sec=500.0,
            burst=1_000,
            daily_limit=10_000_000,
            window_limit=1_000_000,
            window_seconds=3_600,
        ),
    ),
    "custom": Plan("custom", None),
}


def get_plan(name: object) -> Plan:
    """The plan called ``name``; :class:`QuotaError` naming the known plans otherwise."""
    if not isinstance(name, str) or name not in PLANS:
        raise QuotaError(f"unknown plan {name!r}; choose one of: {', '.join(PLANS)}")
    return PLANS[name]


def plan_limits(name: str) -> Limits:
    """The default limits of plan ``name`` (``custom`` has none and is refused here)."""
    plan = get_plan(name)
    if plan.limits is None:
        raise QuotaError(f"plan {name!r} has no default limits; give rate, burst and daily limit")
    return plan.limits


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_limits(
    rate_per_sec: object,
    burst: object,
    daily_limit: object,
    window_limit: object = None,
    window_seconds: object = None,
) -> Limits:
    """Return the limits as :class:`Limits`, or raise :class:`QuotaError` naming the bad field.

    Rate is positive and finite; burst and daily limit are positive integers (a burst below 1
    could never admit a request); the window limit and its length come together or not at all.
    """
    if isinstance(rate_per_sec, bool) or not isinstance(rate_per_sec, int | float):
        raise QuotaError(f"rate_per_sec must be a number, not {rate_per_sec!r}")
    if not math.isfinite(rate_per_sec) or rate_per_sec <= 0 or rate_per_sec > MAX_LIMIT:
        raise QuotaError(f"rate_per_sec must be > 0 and at most {MAX_LIMIT}, got {rate_per_sec!r}")
    for name, value in (("burst", burst), ("daily_limit", daily_limit)):
        if not _is_int(value) or not 1 <= value <= MAX_LIMIT:  # type: ignore[operator]
            raise QuotaError(f"{name} must be an integer from 1 to {MAX_LIMIT}, got {value!r}")
    if (why := check_refill(rate_per_sec, burst)) is not None:  # type: ignore[arg-type]
        raise QuotaError(why)
    if (window_limit is None) != (window_seconds is None):
        raise QuotaError("window_limit and window_seconds must be given together")
    if window_limit is not None:
        if not _is_int(window_limit) or not 1 <= window_limit <= MAX_LIMIT:  # type: ignore[operator]
            raise QuotaError(
                f"window_limit must be an integer from 1 to {MAX_LIMIT}, got {window_limit!r}"
            )
        if not _is_int(window_seconds) or not 1 <= window_seconds <= MAX_WINDOW_SECONDS:  # type: ignore[operator]
            raise QuotaError(
                f"window_seconds must be an integer from 1 to {MAX_WINDOW_SECONDS}, "
                f"got {window_seconds!r}"
            )
    return Limits(
        float(rate_per_sec),
        burst,  # type: ignore[arg-type]
        daily_limit,  # type: ignore[arg-type]
        window_limit,  # type: ignore[arg-type]
        window_seconds,  # type: ignore[arg-type]
    )


__all__ = [
    "MAX_LIMIT",
    "MAX_WINDOW_SECONDS",
    "PLANS",
    "Limits",
    "Plan",
    "QuotaError",
    "check_limits",
    "get_plan",
    "plan_limits",
]

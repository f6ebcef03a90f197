"""A tenant's limits: token bucket, UTC-day quota and an optional rolling window.

A :class:`Quota` is validated when it is made, so nonsense (a negative rate, a fractional burst,
a window limit without a window length) never reaches a Redis script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class InvalidQuota(ValueError):
    """A quota value that no limiter can enforce; the message names the field."""


MAX_UNITS = 2**53  # Lua numbers are doubles: integers above this lose precision in the script
#: The longest a bucket may take to refill from empty (burst / rate_per_sec): 1e9 s, about 31
#: years (a bucket that in practice never refills, as tests and one-off grants use, fits).
#: acquire.lua gives a bucket's key its expiry (twice the refill time) on the first write only
#: when the refill time is shorter than the time since 1970, so a longer one would never
#: expire; and the rate-limit fields state it in whole seconds. A rate of 1e-308 made both
#: infinite: every request of the tenant failed.
MAX_REFILL_SECONDS = 10**9


def check_refill(rate_per_sec: float, burst: int) -> str | None:
    """Why ``burst`` at ``rate_per_sec`` is not a usable bucket, or None."""
    if burst / rate_per_sec > MAX_REFILL_SECONDS:
        return (
            f"rate_per_sec {rate_per_sec!r} is too low for burst {burst}: the bucket would take "
            f"{burst / rate_per_sec:.3g}s to refill, at most {MAX_REFILL_SECONDS:.0e}s"
        )
    return None


def _whole(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidQuota(f"{name} must be an integer, not {value!r}")
    if not minimum <= value <= MAX_UNITS:
        raise InvalidQuota(f"{name} must be between {minimum} and 2**53, not {value}")
    return value


@dataclass(frozen=True, slots=True)
class Quota:
    """``rate_per_sec`` tokens refill per second up to ``burst``; at most ``daily_limit`` units
    per UTC day; optionally at most ``window_limit`` units in any ``window_seconds`` span."""

    rate_per_sec: float
    burst: int
    daily_limit: int
    window_limit: int | None = None
    window_seconds: int | None = None

    def __post_init__(self) -> None:
        rate = self.rate_per_sec
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise InvalidQuota(f"rate_per_sec must be a number, not {rate!r}")
        if not math.isfinite(rate) or rate <= 0 or rate > MAX_UNITS:
            raise InvalidQuota(f"rate_per_sec must be a number > 0 and <= 2**53, not {rate!r}")
        _whole("burst", self.burst, 1)
        _whole("daily_limit", self.daily_limit, 0)
        if (why := check_refill(rate, self.burst)) is not None:
            raise InvalidQuota(why)
        if (self.window_limit is None) != (self.window_seconds is None):
            raise InvalidQuota("window_limit and window_seconds must be given together")
        if self.window_limit is not None:
            _whole("window_limit", self.window_limit, 1)
            _whole("window_seconds", self.window_seconds, 1)
            if self.window_seconds > 31 * 86400:  # type: ignore[operator]
                raise InvalidQuota("window_seconds must be at most 31 days")

    @property
    def has_window(self) -> bool:
        return self.window_limit is not None

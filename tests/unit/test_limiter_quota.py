"""Quota, cost and tenant checks: nonsense is refused with a message naming it, before any
Redis key is built."""

from __future__ import annotations

import math

import pytest
import redis

from limiter import InvalidCost, InvalidQuota, Quota, RateLimiter
from metering.ids import InvalidIdentifier


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(rate_per_sec=0, burst=1, daily_limit=1), "rate_per_sec"),
        (dict(rate_per_sec=-1.0, burst=1, daily_limit=1), "rate_per_sec"),
        (dict(rate_per_sec=math.inf, burst=1, daily_limit=1), "rate_per_sec"),
        (dict(rate_per_sec=math.nan, burst=1, daily_limit=1), "rate_per_sec"),
        (dict(rate_per_sec="10", burst=1, daily_limit=1), "rate_per_sec"),
        (dict(rate_per_sec=True, burst=1, daily_limit=1), "rate_per_sec"),
        (dict(rate_per_sec=1, burst=0, daily_limit=1), "burst"),
        (dict(rate_per_sec=1, burst=2**60, daily_limit=1), "burst"),
        (dict(rate_per_sec=1e300, burst=1, daily_limit=1), "rate_per_sec"),
        # A bucket refilling in more than 1e9 s: 1e-308 made its expiry and fields infinite.
        (dict(rate_per_sec=1e-308, burst=100, daily_limit=1), "too low for burst 100"),
        (dict(rate_per_sec=1e-9, burst=100, daily_limit=1), "too low for burst 100"),
        (dict(rate_per_sec=1, burst=2.5, daily_limit=1), "burst"),
        (dict(rate_per_sec=1, burst=1, daily_limit=-1), "daily_limit"),
        (dict(rate_per_sec=1, burst=1, daily_limit=1.0), "daily_limit"),
        (dict(rate_per_sec=1, burst=1, daily_limit=1, window_limit=5), "window_seconds"),
        (dict(rate_per_sec=1, burst=1, daily_limit=1, window_seconds=5), "window_limit"),
        (
            dict(rate_per_sec=1, burst=1, daily_limit=1, window_limit=0, window_seconds=5),
            "window_limit",
        ),
        (
            dict(rate_per_sec=1, burst=1, daily_limit=1, window_limit=5, window_seconds=0),
            "window_seconds",
        ),
        (
            dict(rate_per_sec=1, burst=1, daily_limit=1, window_limit=5, window_seconds=40 * 86400),
            "window_seconds",
        ),
    ],
)
def test_a_nonsense_quota_is_refused_naming_the_field(kwargs: dict, names: str) -> None:
    with pytest.raises(InvalidQuota, match=names):
        Quota(**kwargs)


def test_a_sound_quota_is_kept_as_given() -> None:
    q = Quota(rate_per_sec=2.5, burst=10, daily_limit=0, window_limit=5000, window_seconds=3600)
    assert (q.rate_per_sec, q.burst, q.daily_limit, q.window_limit, q.window_seconds) == (
        2.5,
        10,
        0,
        5000,
        3600,
    )
    assert q.has_window and not Quota(1, 1, 1).has_window
    assert q == Quota(2.5, 10, 0, 5000, 3600) and hash(q) == hash(Quota(2.5, 10, 0, 5000, 3600))


# A client that would fail on first use: the checks must come before any Redis call.
LIMITER = RateLimiter(redis.Redis(port=1, socket_connect_timeout=0.1))
QUOTA = Quota(rate_per_sec=1, burst=1, daily_limit=1)


@pytest.mark.parametrize("cost", [-1, 1.5, 1.0, True, "1", None, 2**60])
def test_a_cost_that_is_not_a_non_negative_integer_is_refused(cost: object) -> None:
    with pytest.raises(InvalidCost, match="cost must be a non-negative integer"):
        LIMITER.acquire("tenant-a", cost, QUOTA)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tenant", ["", "a b", "{x}", "x}", "-leading-dash", "t" * 65, "é", None, 42, "a\nb", ["x"]]
)
def test_a_bad_tenant_id_is_refused_before_any_key_is_built(tenant: object) -> None:
    with pytest.raises(InvalidIdentifier):
        LIMITER.acquire(tenant, 1, QUOTA)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifier):
        LIMITER.settle(tenant, 1, 1, QUOTA)  # type: ignore[arg-type]


def test_settle_refuses_a_bad_actual_cost() -> None:
    with pytest.raises(InvalidCost, match="actual_cost"):
        LIMITER.settle("tenant-a", 1, -3, QUOTA)

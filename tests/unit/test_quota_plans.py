"""Plans and the one limit check every boundary uses."""

from __future__ import annotations

import math

import pytest

from metering.plans import PLANS, QuotaError, check_limits, get_plan, plan_limits


def test_every_named_plan_but_custom_has_sane_default_limits() -> None:
    for name, plan in PLANS.items():
        if name == "custom":
            assert plan.limits is None
            continue
        lim = plan_limits(name)
        assert (
            check_limits(
                lim.rate_per_sec, lim.burst, lim.daily_limit, lim.window_limit, lim.window_seconds
            )
            == lim
        )
    assert plan_limits("free").daily_limit < plan_limits("pro").daily_limit


def test_an_unknown_plan_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(QuotaError, match=r"unknown plan 'gold'; choose one of: free, pro"):
        get_plan("gold")
    with pytest.raises(QuotaError, match="no default limits"):
        plan_limits("custom")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 10, 100), "rate_per_sec must be > 0"),
        ((0, 10, 100), "rate_per_sec must be > 0"),
        ((math.inf, 10, 100), "rate_per_sec must be > 0"),
        ((math.nan, 10, 100), "rate_per_sec must be > 0"),
        (("5", 10, 100), "rate_per_sec must be a number"),
        ((True, 10, 100), "rate_per_sec must be a number"),
        ((5, 0, 100), "burst must be an integer from 1"),
        ((5, -3, 100), "burst must be an integer from 1"),
        ((5, 2.5, 100), "burst must be an integer from 1"),
        ((1e-308, 100, 1000), "too low for burst 100"),
        ((5, 10, -1), "daily_limit must be an integer from 1"),
        ((5, 10, 10**16), "daily_limit must be an integer from 1"),
        ((5, 10, 100, 50, None), "must be given together"),
        ((5, 10, 100, None, 60), "must be given together"),
        ((5, 10, 100, 0, 60), "window_limit must be an integer from 1"),
        ((5, 10, 100, 50, 86_401), "window_seconds must be an integer from 1 to 86400"),
    ],
)
def test_nonsense_limits_are_refused_naming_the_field(args: tuple, message: str) -> None:
    with pytest.raises(QuotaError, match=message):
        check_limits(*args)


def test_the_slowest_refill_allowed_is_1e9_seconds() -> None:
    assert check_limits(100 / 10**9, 100, 1000).burst == 100


def test_valid_limits_come_back_normalized() -> None:
    lim = check_limits(2, 5, 1000, 100, 60)
    assert (lim.rate_per_sec, lim.burst, lim.daily_limit) == (2.0, 5, 1000)
    assert isinstance(lim.rate_per_sec, float)
    assert (lim.window_limit, lim.window_seconds) == (100, 60)

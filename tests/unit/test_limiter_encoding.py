"""How calls are encoded: the pre-packed bytes are exactly what redis-py would send, keys carry
the tenant's hash tag, and days map to dates and reset times."""

from __future__ import annotations

import datetime as dt

import pytest
from redis.connection import Connection

from limiter import Quota
from limiter.clock import ServerClock, epoch_day, utc_day
from limiter.keys import daily_counter_key, tenant_keys, token_bucket_key
from limiter.scripts import ACQUIRE, SETTLE, CallEncoder, packed


def redis_py_bytes(*args: object) -> bytes:
    return b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("cost", [0, 1, 7, 1024, 1025, 10**9])
@pytest.mark.parametrize("seed", [b"", b"0", b"1234"])
def test_packed_acquire_equals_what_redis_py_sends(cost: int, seed: bytes) -> None:
    enc = CallEncoder(day_grace_seconds=3600)
    q = Quota(rate_per_sec=2.5, burst=10, daily_limit=1000, window_limit=50, window_seconds=60)
    day = epoch_day(dt.date(2026, 11, 28))
    args = enc.acquire_args("acme", day, cost, q, seed)
    assert enc.acquire_packed("acme", day, cost, q, seed) == redis_py_bytes(*args)
    assert args[:3] == ("EVALSHA", ACQUIRE.sha, 4)
    assert args[3:7] == (
        b"rl:{acme}:tb",
        b"rl:{acme}:day:20261128",
        b"rl:{acme}:win",
        b"rl:{acme}:win:meta",
    )
    assert args[7:] == (b"%d" % cost, b"2.5", b"10", b"1000", b"50", b"60", seed, b"3600")


@pytest.mark.parametrize("seed", [b"", b"7"])
def test_a_quota_without_a_window_declares_only_the_bucket_and_the_day(seed: bytes) -> None:
    """Window keys that never exist would make a Cluster refuse every call of the tenant with
    TRYAGAIN while its slot migrates: they are declared only for a quota with a window."""
    enc = CallEncoder(day_grace_seconds=3600)
    q = Quota(rate_per_sec=2.5, burst=10, daily_limit=1000)
    day = epoch_day(dt.date(2026, 11, 28))
    windowed = Quota(rate_per_sec=2.5, burst=10, daily_limit=1000, window_limit=5, window_seconds=9)
    for _ in range(2):  # a tenant's cached keys serve both kinds of quota
        args = enc.acquire_args("acme", day, 3, q, seed)
        assert enc.acquire_packed("acme", day, 3, q, seed) == redis_py_bytes(*args)
        assert args[2:5] == (2, b"rl:{acme}:tb", b"rl:{acme}:day:20261128")
        assert args[5:] == (b"3", b"2.5", b"10", b"1000", b"0", b"0", seed, b"3600")
        settle = enc.settle_args("acme", day, 1, q)
        assert settle[2:5] == (2, b"rl:{acme}:tb", b"rl:{acme}:day:20261128")
        assert settle[5:] == (b"1", b"2.5", b"10", b"0", b"0", b"")
        four = enc.acquire_args("acme", day, 3, windowed, seed)
        assert four[2] == 4 and len(four) == 3 + 4 + 8
        assert enc.acquire_packed("acme", day, 3, windowed, seed) == redis_py_bytes(*four)


def test_settle_call_names_the_decision_day() -> None:
    enc = CallEncoder()
    q = Quota(rate_per_sec=1, burst=5, daily_limit=10)
    args = enc.settle_args("acme", epoch_day(dt.date(2026, 1, 2)), -3, q)
    assert args[1] == SETTLE.sha and args[4] == b"rl:{acme}:day:20260102"
    assert args[5:] == (b"-3", b"1.0", b"5", b"0", b"0", b"")  # "": the day is not checked
    assert packed(args) == redis_py_bytes(*args)


def test_a_settle_for_today_asks_the_script_to_check_the_day() -> None:
    day = epoch_day(dt.date(2026, 1, 2))
    q = Quota(rate_per_sec=1, burst=5, daily_limit=10)
    args = CallEncoder().settle_args("acme", day, 2, q, today=True)
    assert args[4] == b"rl:{acme}:day:20260102" and args[-1] == b"%d" % day


def test_keys_share_the_tenant_hash_tag() -> None:
    keys = tenant_keys("t-1", dt.date(2026, 2, 3))
    assert all(k.startswith(b"rl:{t-1}:") for k in keys)
    assert token_bucket_key("t-1") == "rl:{t-1}:tb"
    assert daily_counter_key("t-1", dt.date(2026, 2, 3)) == "rl:{t-1}:day:20260203"


@pytest.mark.parametrize("day", [dt.date(1970, 1, 1), dt.date(2024, 2, 29), dt.date(2026, 12, 31)])
def test_epoch_days_map_to_dates_and_next_midnight(day: dt.date) -> None:
    n = epoch_day(day)
    date, reset = utc_day(n)
    assert date == day
    assert reset == dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    assert n == (dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp() // 86400)


def test_server_clock_follows_the_server_second() -> None:
    clock = ServerClock()
    far = int(dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC).timestamp())
    clock.observe(far)
    assert utc_day(clock.today())[0] == dt.date(2030, 1, 1)

"""The limiter exports how far the Redis server's clock is from the host's: decision events carry
the server's time and the workers judge them by theirs, so a Redis clock minutes ahead
dead-letters every decision event, and before this nothing showed it."""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import limiter.clock
import limiter.metrics  # registers the collector
from limiter.clock import ServerClock, observed_offset

GAUGE = "rate_limiter_redis_clock_offset_seconds"
ALERTS = Path(__file__).resolve().parents[2] / "dashboards" / "prometheus" / "alerts.yml"


@pytest.fixture(autouse=True)
def own_clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this test's clocks: another test's limiter may still be alive, its offset set."""
    monkeypatch.setattr(limiter.clock, "_live", weakref.WeakSet())


def test_no_sample_before_a_limiter_exists() -> None:
    assert observed_offset() is None
    assert REGISTRY.get_sample_value(GAUGE) is None


def test_the_offset_a_reply_shows_is_exported_at_scrape() -> None:
    clock = ServerClock()
    clock.observe(int(time.time()) + 400)  # a reply from a Redis 400 s ahead
    value = REGISTRY.get_sample_value(GAUGE)
    assert value is not None and 398 < value < 402
    clock.observe(int(time.time()) - 400)  # its clock set back: the next reply says so
    value = REGISTRY.get_sample_value(GAUGE)
    assert value is not None and -402 < value < -398


def test_the_largest_offset_of_the_live_clocks_is_the_one_shown() -> None:
    near, far = ServerClock(), ServerClock()
    near.observe(int(time.time()) + 5)
    far.observe(int(time.time()) - 7200)
    offset = observed_offset()
    assert offset is not None and -7202 < offset < -7198
    del far
    gc.collect()  # a limiter dropped takes its clock's offset with it
    offset = observed_offset()
    assert offset is not None and abs(offset) < 10


def test_an_alert_fires_on_an_offset_of_more_than_30_seconds_and_says_what_to_do() -> None:
    rules = {
        r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
    }
    (rule,) = [r for r in rules.values() if GAUGE in r["expr"]]
    assert f"abs({GAUGE})" in rule["expr"] and rule["expr"].endswith("> 30")
    assert rule["for"] == "5m"
    description = rule["annotations"]["description"]
    assert "dead-lettered" in description and "NTP" in description

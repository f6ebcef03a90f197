"""Labelled counters whose labels are a fixed set export each label value at 0 from the start.

A labelled child appears at its first increment, already at 1, and Prometheus' increase() and
rate() see no increase from a series' first sample: alerts.yml's ``increase(...) > 0`` on drops
and dead letters would miss the first drop (or burst) of each reason in each process.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

from prometheus_client import REGISTRY

import limiter.core
from limiter.decision import LOCAL_CEILING, OK, REDIS_DOWN
from limiter.metrics import REJECTION_REASONS, DecisionMetrics
from metering import emitter
from streams import metrics as streams_metrics

ROOT = Path(__file__).resolve().parents[2]


def _samples(collector: object, name: str) -> dict[str, float]:
    """``name``'s samples by their ``reason`` label."""
    return {
        s.labels["reason"]: s.value
        for family in collector.collect()  # type: ignore[attr-defined]
        for s in family.samples
        if s.name == name
    }


def _reasons_passed(path: Path, call: str, method: bool) -> set[str]:
    """The string literals ``path`` passes as the reason of each ``call`` (the first argument
    of a method ``.call(...)``, the second of a constructor ``call(...)``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name != call or isinstance(func, ast.Attribute) != method:
            continue
        arg = node.args[0 if method else 1]
        assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), ast.unparse(node)
        found.add(arg.value)
    return found


def test_every_drop_reason_is_exported_at_zero_before_any_drop() -> None:
    assert set(emitter.DROP_REASONS) >= {"queue_full", "closed", "refused", "spool_cut"}
    for reason in emitter.DROP_REASONS:
        # A fresh process has dropped nothing; whatever other tests dropped is >= 0.
        value = REGISTRY.get_sample_value("metering_events_dropped_total", {"reason": reason})
        assert value is not None, reason
    fresh = _samples(emitter.EVENTS_DROPPED, "metering_events_dropped_total")
    assert set(fresh) == set(emitter.DROP_REASONS)


def test_the_drop_reasons_are_every_reason_the_emitter_drops_for() -> None:
    used = _reasons_passed(ROOT / "metering" / "emitter.py", "drop", method=True)
    assert used == set(get_args(emitter.DropReason))


def test_every_dead_letter_reason_is_exported_at_zero_before_any_dead_letter() -> None:
    for reason in streams_metrics.DEAD_LETTER_REASONS:
        value = REGISTRY.get_sample_value("streams_events_dead_lettered_total", {"reason": reason})
        assert value is not None, reason


def test_the_dead_letter_reasons_are_every_reason_the_sink_gives() -> None:
    used = _reasons_passed(ROOT / "streams" / "sink.py", "DeadLetter", method=False)
    assert used == set(streams_metrics.DEAD_LETTER_REASONS)


def test_every_rejection_reason_is_exported_at_zero_before_any_rejection() -> None:
    fresh = DecisionMetrics()
    assert _samples(fresh, "rate_limiter_rejections_total") == dict.fromkeys(REJECTION_REASONS, 0)
    fresh.rejected("bucket", 0.001)
    counts = _samples(fresh, "rate_limiter_rejections_total")
    assert counts["bucket"] == 1 and counts["daily"] == 0
    assert set(counts) == set(REJECTION_REASONS)
    for reason in REJECTION_REASONS:  # the process's collector too
        value = REGISTRY.get_sample_value("rate_limiter_rejections_total", {"reason": reason})
        assert value is not None, reason


def test_an_unknown_rejection_reason_is_still_counted() -> None:
    fresh = DecisionMetrics()
    fresh.rejected("something_new", 0.001)
    assert _samples(fresh, "rate_limiter_rejections_total")["something_new"] == 1


def test_the_rejection_reasons_are_the_limiters_and_the_fail_modes() -> None:
    lua = set(limiter.core.REASONS) - {OK}
    assert set(REJECTION_REASONS) == lua | {REDIS_DOWN, LOCAL_CEILING}
    assert len(REJECTION_REASONS) == len(set(REJECTION_REASONS))

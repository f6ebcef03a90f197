"""Every Prometheus metric of the limiter and the quota lookup, defined once (default registry).

Counters are exported with the ``_total`` suffix (``rate_limiter_rejections_total``, ...). No
metric carries the tenant as a label: that would be unbounded cardinality.

The per-decision metrics (``token_bucket_consumed``, ``rate_limiter_rejections``,
``daily_quota_hits``, ``rate_limiter_decision_seconds``) are counted by :class:`DecisionMetrics`
as plain numbers under one lock and turned into metric families when Prometheus scrapes: the
async limiter's budget is a few microseconds per decision, and prometheus-client's objects cost
about a microsecond per update each.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from limiter.clock import observed_offset
from limiter.decision import (
    BUCKET,
    COST_EXCEEDS_BURST,
    COST_EXCEEDS_DAILY,
    COST_EXCEEDS_WINDOW,
    DAILY,
    LOCAL_CEILING,
    REDIS_DOWN,
    WINDOW,
)

DECISION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

#: The reasons a decision is rejected for: acquire.lua's (``limiter.core.REASONS`` but ``ok``)
#: and the fail mode's (:mod:`limiter.failure_policy`).
REJECTION_REASONS = (
    BUCKET,
    DAILY,
    WINDOW,
    COST_EXCEEDS_BURST,
    COST_EXCEEDS_WINDOW,
    COST_EXCEEDS_DAILY,
    REDIS_DOWN,
    LOCAL_CEILING,
)


class DecisionMetrics:
    """Counts of decisions and their latency; a Prometheus collector."""

    def __init__(self, buckets: tuple[float, ...] = DECISION_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self.consumed = 0
        self.daily_hits = 0
        self.rejections: dict[str, int] = {}

    def allowed(self, cost: int, seconds: float) -> None:
        i = bisect.bisect_left(self._buckets, seconds)
        with self._lock:
            self.consumed += cost
            self._counts[i] += 1
            self._sum += seconds

    def rejected(self, reason: str, seconds: float, daily: bool = False) -> None:
        i = bisect.bisect_left(self._buckets, seconds)
        with self._lock:
            self.rejections[reason] = self.rejections.get(reason, 0) + 1
            if daily:
                self.daily_hits += 1
            self._counts[i] += 1
            self._sum += seconds

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            consumed, daily_hits = self.consumed, self.daily_hits
            rejections = dict(self.rejections)
            counts, total = list(self._counts), self._sum
        yield CounterMetricFamily(
            "token_bucket_consumed",
            "Units consumed by allowed rate-limit decisions.",
            value=consumed,
        )
        rej = CounterMetricFamily(
            "rate_limiter_rejections", "Rejected rate-limit decisions.", labels=["reason"]
        )
        # Every known reason from the first scrape, at 0: increase() sees no increase from a
        # series' first sample, so one that first appeared at 1 would hide that rejection.
        for reason, n in sorted((dict.fromkeys(REJECTION_REASONS, 0) | rejections).items()):
            rej.add_metric([reason], n)
        yield rej
        yield CounterMetricFamily(
            "daily_quota_hits",
            "Decisions rejected because the UTC day's quota was used up.",
            value=daily_hits,
        )
        cumulative, acc = [], 0
        for le, n in zip((*self._buckets, float("inf")), counts, strict=True):
            acc += n
            cumulative.append(("+Inf" if le == float("inf") else repr(le), acc))
        yield HistogramMetricFamily(
            "rate_limiter_decision_seconds",
            "Time to decide, from the call to the answer (Redis round trip included).",
            buckets=cumulative,
            sum_value=total,
        )


class RedisClockOffset:
    """``rate_limiter_redis_clock_offset_seconds``: how far the Redis server's clock is from this
    host's (:func:`limiter.clock.observed_offset`), read at scrape time. Decision events are
    stamped by the server's clock and checked by the workers against theirs: an offset past
    ``EVENT_MAX_FUTURE_SKEW`` (or the lateness) dead-letters them. No sample before a limiter
    exists in the process."""

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "rate_limiter_redis_clock_offset_seconds",
            "Offset of the Redis server's clock from this host's, as the limiter observes it "
            "in its replies (positive: Redis ahead; about a second of its own error).",
        )
        offset = observed_offset()
        if offset is not None:
            gauge.add_metric([], offset)
        yield gauge


decisions = DecisionMetrics()
REGISTRY.register(decisions)
redis_clock_offset = RedisClockOffset()
REGISTRY.register(redis_clock_offset)

redis_down_events = Counter(
    "redis_down_events", "Decisions made without Redis (error, timeout or open breaker)."
)
rate_limiter_batch_size = Histogram(
    "rate_limiter_batch_size",
    "Decisions sent in one pipelined round trip by the async limiter.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
tenant_quota_cache_hits = Counter(
    "tenant_quota_cache_hits", "Quota lookups answered by a cache layer.", ["layer"]
)
tenant_quota_cache_misses = Counter(
    "tenant_quota_cache_misses", "Quota lookups a cache layer could not answer.", ["layer"]
)
tenant_quota_stale_served = Counter(
    "tenant_quota_stale_served", "Quotas served past their TTL because the source was down."
)

__all__ = [
    "REJECTION_REASONS",
    "DecisionMetrics",
    "RedisClockOffset",
    "decisions",
    "rate_limiter_batch_size",
    "redis_clock_offset",
    "redis_down_events",
    "tenant_quota_cache_hits",
    "tenant_quota_cache_misses",
    "tenant_quota_stale_served",
]

"""Every Prometheus metric of the limiter and the quota lookup, defined once (default registry).

Counters are exported with the ``_total`` suffix (``rate_limiter_rejections_total``, ...). No
metric carries the tenant as a label: that would be unbounded cardinality.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

token_bucket_consumed = Counter(
    "token_bucket_consumed", "Units consumed by allowed rate-limit decisions."
)
rate_limiter_rejections = Counter(
    "rate_limiter_rejections", "Rejected rate-limit decisions.", ["reason"]
)
daily_quota_hits = Counter(
    "daily_quota_hits", "Decisions rejected because the UTC day's quota was used up."
)
redis_down_events = Counter(
    "redis_down_events", "Decisions made without Redis (error, timeout or open breaker)."
)
rate_limiter_decision_seconds = Histogram(
    "rate_limiter_decision_seconds",
    "Time to decide, from the call to the answer (Redis round trip included).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
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
    "daily_quota_hits",
    "rate_limiter_batch_size",
    "rate_limiter_decision_seconds",
    "rate_limiter_rejections",
    "redis_down_events",
    "tenant_quota_cache_hits",
    "tenant_quota_cache_misses",
    "tenant_quota_stale_served",
    "token_bucket_consumed",
]

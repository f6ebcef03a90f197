"""Inline enforcement: per-tenant token bucket, UTC-day quota and optional rolling window in one
atomic Redis Lua call, sync (:class:`RateLimiter`) and async (:class:`AsyncRateLimiter`)."""

from limiter.async_limiter import AsyncRateLimiter
from limiter.breaker import CircuitBreaker
from limiter.core import InvalidCost, NoQuota
from limiter.decision import Decision, Settlement
from limiter.failure_policy import FailurePolicy
from limiter.local_limiter import LocalLimiter
from limiter.quota import InvalidQuota, Quota
from limiter.quota_provider import QuotaProvider, UnknownTenant
from limiter.sync import RateLimiter

__all__ = [
    "AsyncRateLimiter",
    "CircuitBreaker",
    "Decision",
    "FailurePolicy",
    "InvalidCost",
    "InvalidQuota",
    "LocalLimiter",
    "NoQuota",
    "Quota",
    "QuotaProvider",
    "RateLimiter",
    "Settlement",
    "UnknownTenant",
]

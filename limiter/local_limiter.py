"""A bounded per-process limiter that keeps a ceiling while Redis is away.

One in-memory token bucket per tenant (rate = burst = the ceiling per second), for at most
``max_tenants`` tenants (least recently used forgotten first), so a Redis outage never means
unlimited traffic from one process and never unbounded memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class LocalLimiter:
    def __init__(
        self,
        ceiling_per_sec: float,
        *,
        max_tenants: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ceiling_per_sec <= 0:
            raise ValueError("ceiling_per_sec must be > 0")
        self.rate = float(ceiling_per_sec)
        self.burst = max(1.0, self.rate)
        self.max_tenants = max_tenants
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def try_acquire(self, tenant: str, cost: int) -> tuple[bool, float, float]:
        """Take ``cost`` tokens if there are enough: (allowed, tokens left, retry after s)."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(tenant, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            allowed = tokens >= cost
            if allowed:
                tokens -= cost
            self._buckets[tenant] = (tokens, now)
            if len(self._buckets) > self.max_tenants:
                self._buckets.popitem(last=False)
        retry = 0.0 if allowed else (min(cost, self.burst) - tokens) / self.rate
        return allowed, tokens, retry

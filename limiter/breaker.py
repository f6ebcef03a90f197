"""A circuit breaker for the Redis calls, so no request waits out a timeout while Redis is known
to be down.

closed --(``failure_threshold`` consecutive failures)--> open --(``reset_after`` s)--> half-open:
one caller probes Redis (the others are answered without Redis meanwhile); its success closes
the breaker, its failure opens it again for another ``reset_after``. While open, the answers of
calls let through before it opened change nothing: a failure keeps it open (from then), a
success does not close it (it is no news of Redis since the failures). A probe that never reports
back (its caller was cancelled) is given up after ``reset_after`` and another caller probes.

Thread-safe; ``allow`` is lock-free while the breaker is closed (the hot path).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]

#: Where :meth:`CircuitBreaker.record_failure` also notes a failure (the breaker that recorded
#: it), when set: a list the limiter sets around one decision's quota lookup, so the decision
#: knows that its own lookup found Redis failing (on a Cluster: which master's breaker). The
#: threads (``asyncio.to_thread``) and tasks the lookup starts copy the context and note into
#: the same list; other decisions, other threads and other tenants have their own context, so a
#: failure of theirs is not this decision's.
FAILURES_HERE: contextvars.ContextVar[list[CircuitBreaker] | None] = contextvars.ContextVar(
    "breaker_failures_here", default=None
)


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        reset_after: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_after <= 0:
            raise ValueError("reset_after must be > 0")
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_until: float | None = None  # None while closed
        self._probe_until: float | None = None  # a half-open probe is out until then

    def like(
        self, on_change: Callable[[BreakerState, BreakerState], None] | None = None
    ) -> CircuitBreaker:
        """A new, closed breaker with this one's threshold, reset time and clock."""
        return CircuitBreaker(
            self.failure_threshold, self.reset_after, clock=self._clock, on_change=on_change
        )

    @property
    def state(self) -> BreakerState:
        if self._opened_until is None:
            return "closed"
        return "open" if self._clock() < self._opened_until else "half_open"

    def retry_in(self) -> float:
        """Seconds until the next probe may go to Redis (0 when closed or half-open)."""
        until = self._opened_until
        return 0.0 if until is None else max(0.0, until - self._clock())

    def allow(self) -> bool:
        """May this call go to Redis? False means: decide without Redis, right away."""
        if self._opened_until is None:
            return True
        now = self._clock()
        with self._lock:
            if self._opened_until is None:
                return True
            if now < self._opened_until:
                return False
            if self._probe_until is not None and now < self._probe_until:
                return False  # another caller is probing
            self._probe_until = now + self.reset_after
            return True

    def record_success(self) -> None:
        if self._opened_until is None:
            if self._failures:
                self._failures = 0
            return
        with self._lock:
            until = self._opened_until
            if until is None:
                return
            if self._clock() < until:
                # Open: no call has gone to Redis since it opened, so this answer is from a
                # call let through before the failures that opened it (its reply may have
                # been read before they happened). It says nothing about Redis now; the
                # probe after ``reset_after`` does. (Closing here let calls wait out Redis's
                # timeouts again, three failures more, before it reopened.)
                return
            old: BreakerState = "half_open"
            self._failures = 0
            self._opened_until = None
            self._probe_until = None
        self._changed(old, "closed")

    def record_failure(self) -> None:
        here = FAILURES_HERE.get()
        if here is not None:
            here.append(self)
        with self._lock:
            self._failures += 1
            until = self._opened_until
            if until is None and self._failures < self.failure_threshold:
                return
            now = self._clock()
            old: BreakerState = (
                "closed" if until is None else "open" if now < until else "half_open"
            )
            self._opened_until = now + self.reset_after
            self._probe_until = None
        if old != "open":  # a failure while open (a call in flight when it opened) keeps it so
            self._changed(old, "open")

    def _changed(self, old: BreakerState, new: BreakerState) -> None:
        if self._on_change is not None:
            self._on_change(old, new)

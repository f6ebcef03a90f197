"""The Redis server's clock is the clock of record; this is the client's estimate of it.

The client only needs the server's UTC day, to name the day counter key before the call. The
script checks that day against ``TIME`` and answers WRONG_DAY with the server's day when it
differs (a skewed client clock, a call at midnight), so an estimate that is off costs one more
round trip, never a count in the wrong day. Every reply carries the server's second, which
keeps the estimate within about a second of the server.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import time
import weakref

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NS_PER_DAY = 86_400 * 1_000_000_000
#: The estimate's own error: the server's second is truncated and the round trip unknown.
_OFFSET_NOISE = 1.0


@functools.lru_cache(maxsize=64)
def utc_day(epoch_day: int) -> tuple[dt.date, dt.datetime]:
    """The date of ``epoch_day`` (days since 1970-01-01) and its reset time (next midnight)."""
    day = dt.date.fromordinal(_EPOCH_ORDINAL + epoch_day)
    reset = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return day, reset


def epoch_day(day: dt.date) -> int:
    return day.toordinal() - _EPOCH_ORDINAL


def time_in_day_ns(t_ns: int, day: dt.date | None) -> int:
    """``t_ns`` (nanoseconds since the epoch), moved into the UTC ``day`` if it falls outside.

    A decision is counted in the Redis server's UTC day; its usage event is stamped afterwards by
    the host's clock, which may be skewed. Near midnight the two can name different days, and
    the pipeline (ClickHouse's days, the Faust daily table, the quota DB's backfill, reconcile)
    would then count the request on a day other than the one whose quota it used. So the event
    keeps to the counted day: its first microsecond, or its last."""
    if day is None:
        return t_ns
    start = (day.toordinal() - _EPOCH_ORDINAL) * _NS_PER_DAY
    if t_ns < start:
        return start
    last = start + _NS_PER_DAY - 1000  # events carry microseconds
    return last if t_ns > last else t_ns


def utc_from_ns(t_ns: int) -> dt.datetime:
    """An aware UTC datetime of ``t_ns``, exact to the microsecond (no float on the way)."""
    return _EPOCH + dt.timedelta(microseconds=t_ns // 1000)


class ServerClock:
    """Offset of the Redis server's clock from this process's wall clock."""

    __slots__ = ("__weakref__", "offset")

    def __init__(self) -> None:
        self.offset = 0.0
        with _live_lock:
            _live.add(self)

    def today(self) -> int:
        """The server's UTC day (days since 1970-01-01), as far as the client knows."""
        return int((time.time() + self.offset) // 86400)

    def skew(self) -> float:
        """The offset when it is larger than the estimate's own error, else 0: a host whose
        clock is known off the server's by more than a second goes by the server's, one in step
        keeps its own (finer) clock."""
        offset = self.offset
        return offset if abs(offset) > _OFFSET_NOISE else 0.0

    def observe(self, server_second: int) -> None:
        # The server's second was truncated: its true time is on average half a second later.
        self.offset = server_second + 0.5 - time.time()


#: Every ServerClock alive in this process, for :func:`observed_offset` (one per limiter).
_live: weakref.WeakSet[ServerClock] = weakref.WeakSet()
_live_lock = threading.Lock()


def observed_offset() -> float | None:
    """The offset of the Redis server's clock from this host's, in seconds (positive: the server
    is ahead), as this process's limiters last observed it; the largest in absolute value when
    there are several. None while no limiter exists.

    Read when it is exported (a Prometheus scrape), not pushed: every decision observes the
    server's second, and this costs the hot path nothing."""
    with _live_lock:
        offsets = [c.offset for c in _live]
    return max(offsets, key=abs) if offsets else None

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
import time

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@functools.lru_cache(maxsize=64)
def utc_day(epoch_day: int) -> tuple[dt.date, dt.datetime]:
    """The date of ``epoch_day`` (days since 1970-01-01) and its reset time (next midnight)."""
    day = dt.date.fromordinal(_EPOCH_ORDINAL + epoch_day)
    reset = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return day, reset


def epoch_day(day: dt.date) -> int:
    return day.toordinal() - _EPOCH_ORDINAL


class ServerClock:
    """Offset of the Redis server's clock from this process's wall clock."""

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset = 0.0

    def today(self) -> int:
        """The server's UTC day (days since 1970-01-01), as far as the client knows."""
        return int((time.time() + self.offset) // 86400)

    def observe(self, server_second: int) -> None:
        # The server's second was truncated: its true time is on average half a second later.
        self.offset = server_second + 0.5 - time.time()

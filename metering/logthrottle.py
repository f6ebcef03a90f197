"""Keep the Kafka clients' repeated lines from flooding the log while Kafka is away.

librdkafka (the emitter's producer) logs every failed connection attempt of every producer the
emitter makes while Kafka is down, and kafka-python's network code does the same: hundreds of
lines a minute that say one thing, which the emitter's own "spooling" / "cannot reach Kafka"
lines already say. :class:`RepeatThrottle`, on the log handlers, lets through the first line of
each logger and level per ``every`` seconds and says how many it held back; other loggers pass
untouched. ``--verbose`` runs without it.
"""

from __future__ import annotations

import logging
import time

#: the loggers whose repeats are throttled: librdkafka's (the emitter's), kafka-python's, aiokafka's
NOISY_KAFKA_LOGGERS = ("metering.emitter.librdkafka", "kafka", "aiokafka")


class RepeatThrottle(logging.Filter):
    """At most one record per (logger, level) per ``every`` seconds from the ``prefixes``'
    loggers; the next one let through tells how many were held back."""

    def __init__(self, prefixes: tuple[str, ...] = NOISY_KAFKA_LOGGERS, every: float = 60.0):
        super().__init__()
        self.prefixes = prefixes
        self.every = every
        self._last: dict[tuple[str, int], float] = {}
        self._held: dict[tuple[str, int], int] = {}

    def _throttled(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._throttled(record.name):
            return True
        key = (record.name, record.levelno)
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = (
                f"{record.getMessage()} ({held} more from {record.name} at this level in the"
                f" last {self.every:g} s not shown)"
            )
            record.args = ()
        return True


def throttle_kafka_repeats(every: float = 60.0) -> RepeatThrottle:
    """Put a :class:`RepeatThrottle` on every handler of the root logger; return it."""
    throttle = RepeatThrottle(every=every)
    for handler in logging.getLogger().handlers:
        handler.addFilter(throttle)
    return throttle


__all__ = ["NOISY_KAFKA_LOGGERS", "RepeatThrottle", "throttle_kafka_repeats"]

"""The Kafka clients' repeated log lines are throttled; everything else passes untouched."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from metering import logthrottle
from metering.logthrottle import RepeatThrottle
from metering.settings import get_settings

#: The client loggers whose level metering.cli.main sets.
CLI_LEVELLED = ("kafka", "aiokafka", "httpx", "alembic")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str = "FAIL [producer-1]: Connection refused", level: int = 40):
    return logging.LogRecord(name, level, __file__, 1, msg, (), None)


def test_a_kafka_outage_logs_one_line_per_logger_and_level_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(logthrottle.time, "monotonic", clock)
    throttle = RepeatThrottle(every=60)
    passed = [throttle.filter(record("metering.emitter.librdkafka")) for _ in range(400)]
    assert passed.count(True) == 1
    assert throttle.filter(record("kafka.conn", level=30))  # another logger: its own first line
    assert not throttle.filter(record("kafka.conn", level=30))

    clock.now += 61
    late = record("metering.emitter.librdkafka")
    assert throttle.filter(late)
    assert late.getMessage().endswith(
        "(399 more from metering.emitter.librdkafka at this level in the last 60 s not shown)"
    )


def test_other_loggers_are_never_held_back() -> None:
    throttle = RepeatThrottle(every=60)
    for name in ("metering.emitter", "limiter", "kafkaesque", "uvicorn.error"):
        assert all(throttle.filter(record(name)) for _ in range(50))


@pytest.fixture
def cli_in_process() -> Iterator[None]:
    """``metering.cli.main`` run in this process sets the client loggers' levels and fills the
    settings cache, both for the whole process: they are put back, so that the rest of the
    session neither logs those clients at DEBUG nor reads this test's settings."""
    levels = {name: logging.getLogger(name).level for name in CLI_LEVELLED}
    get_settings.cache_clear()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    get_settings.cache_clear()


@pytest.mark.usefixtures("cli_in_process")
def test_the_cli_puts_the_throttle_on_the_root_handlers_unless_verbose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from metering import cli

    root = logging.getLogger()
    handler = logging.StreamHandler()
    monkeypatch.setattr(root, "handlers", [handler])  # basicConfig then adds nothing
    assert cli.main(["config"]) == 0
    assert any(isinstance(f, RepeatThrottle) for f in handler.filters)

    handler.filters.clear()
    assert cli.main(["--verbose", "config"]) == 0
    assert not any(isinstance(f, RepeatThrottle) for f in handler.filters)

"""The worker's backfill timer while the quota DB (or ClickHouse) fails: the first failed round
is logged with its traceback, the following ones as one line each (a round runs every 5 s: a
traceback each time flooded the worker's log), and the recovery is said once."""

from __future__ import annotations

import asyncio
import logging

import pytest

import streams.app as sa


class Rounds:
    def __init__(self) -> None:
        self.fail = True

    def run_once(self) -> int:
        if self.fail:
            raise RuntimeError("connection failed: quota DB at 127.0.0.1:5432 refused\nmore")
        return 3


def test_a_failing_backfill_logs_one_traceback_then_one_line_a_round(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rounds = Rounds()
    monkeypatch.setattr(sa, "_state", {"backfill": rounds})
    caplog.set_level(logging.INFO, logger=sa.log.name)

    for _ in range(4):
        asyncio.run(sa.backfill_round())
    failures = [r for r in caplog.records if "backfill round failed" in r.getMessage()]
    assert len(failures) == 4
    assert failures[0].exc_info is not None
    assert all(r.exc_info is None for r in failures[1:])
    assert failures[3].getMessage() == (
        "backfill round failed again (4 in a row, RuntimeError: connection failed: quota DB at"
        " 127.0.0.1:5432 refused)"
    )

    caplog.clear()
    rounds.fail = False
    asyncio.run(sa.backfill_round())
    asyncio.run(sa.backfill_round())
    said = [r.getMessage() for r in caplog.records]
    assert said.count("backfill rounds succeed again") == 1

    caplog.clear()
    rounds.fail = True
    asyncio.run(sa.backfill_round())  # a new outage: its first failure has its traceback again
    assert caplog.records[-1].exc_info is not None

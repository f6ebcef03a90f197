"""At a graceful shutdown the worker runs a last backfill round once its sink has stopped: the
sink's last batches reach the quota DB though the timer's last round ran before them."""

from __future__ import annotations

import asyncio

import pytest

import streams.app as sa


class Sink:
    """The sink consumer: ``stop`` asks it to finish its batch in flight, ``stopped`` is set
    once that batch is written."""

    def __init__(self, said: list[str]) -> None:
        self.said = said
        self.stopped = asyncio.Event()

    def stop(self) -> None:
        self.said.append("sink stop asked")
        asyncio.get_running_loop().call_soon(self._written)

    def _written(self) -> None:
        self.said.append("sink's last batch written")
        self.stopped.set()


class Rounds:
    def __init__(self, said: list[str]) -> None:
        self.said = said

    def run_once(self) -> int:
        self.said.append("backfill round")
        return 1


def test_a_graceful_shutdown_runs_a_backfill_round_after_the_sink_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said: list[str] = []

    async def hand_off() -> int:
        said.append("hand-off")
        return 0

    async def shutdown() -> None:
        monkeypatch.setattr(
            sa, "_state", {"consumer": Sink(said), "storage": object(), "backfill": Rounds(said)}
        )
        monkeypatch.setattr(sa, "hand_off", hand_off)
        await sa._last_aggregates(sa.app, signal=None)

    asyncio.run(shutdown())
    assert said.index("backfill round") > said.index("sink's last batch written")
    assert said.count("backfill round") == 1 and "hand-off" in said

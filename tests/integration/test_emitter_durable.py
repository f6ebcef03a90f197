"""``Emitter.durable_mark`` / ``wait_durable``: when a caller may tell its client the events are
safe (the HTTP ingest's 202), and ``has_room`` refusing while the disk, not the spool's bound,
is what is full. Real Kafka; a Kafka "away" is a loopback port where nothing listens."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import metering.emitter
import metering.spool
from metering.emitter import Emitter, EmitterMode
from metering.events import usage_event
from metering.settings import SettingsError, load_settings
from tests.integration.test_emitter import consume, dead_address, emitters, topic

__all__ = ["emitters", "topic"]  # fixtures, imported to be found

#: the replayer gives up on the dead address at once, so closing takes no 3 s connect attempt
FAST_FAIL = {"bootstrap_timeout_ms": 200}


def wait_until(check: Any, timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(poll(), timeout))


def kafka_away(tmp_path: Path, emitters: list[Emitter], **kwargs: Any) -> Emitter:
    """An emitter whose Kafka does not answer (it spools), closed after the test."""
    em = Emitter(
        dead_address(),
        topic="t.durable",
        spool_dir=tmp_path / "spool",
        producer_overrides=FAST_FAIL,
        **kwargs,
    )
    emitters.append(em)
    return em


def one_spooled(em: Emitter) -> Emitter:
    """``em`` once an event is in its spool (it has left the queue for the disk)."""
    em.emit(usage_event("t-a", "api.calls", 1))
    wait_until(lambda: em.spool.pending_events == 1)
    return em


def test_a_mark_completes_once_every_earlier_event_is_acknowledged(
    kafka_bootstrap: str, topic: str, emitters: list[Emitter], tmp_path: Path
) -> None:
    em = Emitter(kafka_bootstrap, topic=topic, spool_dir=tmp_path / "spool")
    emitters.append(em)
    wait_until(lambda: em.mode is EmitterMode.DIRECT)
    events = [usage_event(f"t-{i % 3}", "api.calls", 1) for i in range(500)]
    for e in events:
        em.emit(e)
    assert em.durable_mark().result(timeout=20) is True
    # Acknowledged means in Kafka: a consumer started only now reads every one of them.
    got = consume(kafka_bootstrap, topic, expected=len(events))
    assert {r.key.decode() for r in got} == {"t-0", "t-1", "t-2"}
    assert len(got) == len(events)


def test_a_mark_completes_once_the_events_are_in_the_spool_while_kafka_is_away(
    emitters: list[Emitter], tmp_path: Path
) -> None:
    em = kafka_away(tmp_path, emitters)
    for i in range(300):
        em.emit(usage_event("t-a", "api.calls", i + 1))
    assert em.durable_mark().result(timeout=20) is True
    assert em.spool.pending_events == 300  # already written when the mark completed


def test_a_mark_says_false_when_events_were_dropped_meanwhile(
    emitters: list[Emitter], tmp_path: Path
) -> None:
    em = kafka_away(tmp_path, emitters, max_queue=4)
    before = em.dropped_total
    for i in range(50):  # faster than the sender takes them: the queue overflows
        em.emit(usage_event("t-a", "api.calls", i + 1))
    assert em.dropped_total > before
    assert em.durable_mark(before).result(timeout=20) is False
    # Nothing dropped since: the next mark is True again.
    before = em.dropped_total
    em.emit(usage_event("t-a", "api.calls", 1))
    assert em.durable_mark(before).result(timeout=20) is True


def test_wait_durable_gives_up_after_its_timeout(emitters: list[Emitter], tmp_path: Path) -> None:
    em = kafka_away(tmp_path, emitters)
    em._stop_sender = True  # a sender that never takes the mark (it exits when idle)
    em._wake_sender.set()
    em._sender.join(5)
    em._stop_sender = False  # let close() run its course

    async def waited() -> bool:
        em.emit(usage_event("t-a", "api.calls", 1))
        return await em.wait_durable(0.2)

    assert asyncio.run(waited()) is False
    em._queue.clear()  # what no sender will take: close() need not wait for it


def test_a_closed_emitter_marks_false_at_once(tmp_path: Path) -> None:
    em = Emitter(
        dead_address(),
        topic="t.durable",
        spool_dir=tmp_path / "spool",
        producer_overrides=FAST_FAIL,
    )
    em.close(timeout=1)
    assert em.durable_mark().result(timeout=1) is False


@pytest.fixture
def failing_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """The spool's writes fail with ENOSPC while ``full[0]`` is True (a full file system:
    this test cannot mount one)."""
    full = [False]
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(metering.spool.os, "pwrite", pwrite)
    yield full


def test_has_room_is_false_while_the_spool_cannot_write(
    emitters: list[Emitter], tmp_path: Path, failing_disk: list[bool]
) -> None:
    """The spool's own bound (256 MiB) is far away, but the disk refuses the write: the events
    would be dropped, so the ingest must not accept them (it answered 202 and dropped 1500 of
    2600 on a full tmpfs)."""
    em = one_spooled(kafka_away(tmp_path, emitters))
    assert em.has_room(10, 2000)
    failing_disk[0] = True
    before = em.dropped_total
    em.emit(usage_event("t-a", "api.calls", 2))
    assert em.durable_mark(before).result(timeout=20) is False  # dropped: spool_full
    assert em.spool.write_failed
    assert not em.has_room(10, 2000)
    failing_disk[0] = False
    em.emit(usage_event("t-a", "api.calls", 3))  # a decision event, say: this write succeeds
    assert em.durable_mark().result(timeout=20) is True
    assert not em.spool.write_failed
    assert em.has_room(10, 2000)


def test_has_room_is_false_when_the_disk_has_less_free_than_the_events_need(
    emitters: list[Emitter], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    em = one_spooled(kafka_away(tmp_path, emitters))
    assert em.has_room(1000, 200_000)
    real = metering.emitter.shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real(path)
        return usage._replace(free=100_000)

    monkeypatch.setattr(metering.emitter.shutil, "disk_usage", nearly_full)
    assert not em.has_room(1000, 200_000)  # ~464 KB needed
    assert em.has_room(10, 2_000)


def test_a_spool_folder_the_data_dir_cannot_hold_names_the_variable(tmp_path: Path) -> None:
    """A read-only or foreign METERING_DATA_DIR stopped `metering api` with a bare
    ``[Errno 30] Read-only file system: '.../spool'``; the message now names the variable.
    (A file where the spool folder goes fails the same way without a read-only mount.)"""
    (tmp_path / "spool").write_text("not a folder")
    settings = load_settings(metering_data_dir=tmp_path, kafka_bootstrap_servers=dead_address())
    with pytest.raises(SettingsError, match=f"METERING_DATA_DIR={tmp_path}: the emitter cannot"):
        Emitter(settings)

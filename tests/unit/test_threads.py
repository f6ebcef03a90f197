"""Our background threads carry their names into the operating system."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from metering.threads import NamedThread

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/task/<tid>/comm"
)


def os_name_of(thread: threading.Thread) -> str:
    return Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()


def os_names_once_set(threads: dict[str, threading.Thread]) -> dict[str, str]:
    """The OS names of ``threads``, once none shows the process's own any more (a thread names
    itself as it starts running), or as they are after 5 s."""
    process = Path("/proc/self/comm").read_text().strip()
    for _ in range(500):
        seen = {key: os_name_of(t) for key, t in threads.items()}
        if process not in seen.values():
            break
        threading.Event().wait(0.01)
    return seen


def test_the_os_sees_the_threads_name_cut_to_the_kernels_15_bytes() -> None:
    release = threading.Event()
    threads = {
        name: NamedThread(target=release.wait, args=(5,), name=name, daemon=True)
        for name in ("emitter-sender", "quota-invalidation")
    }
    for t in threads.values():
        t.start()
    try:
        seen = os_names_once_set(threads)
        assert seen == {"emitter-sender": "emitter-sender", "quota-invalidation": "quota-invalidat"}
    finally:
        release.set()
        for t in threads.values():
            t.join(5)


def test_a_plain_thread_keeps_the_process_name_so_the_difference_is_ours() -> None:
    release = threading.Event()
    plain = threading.Thread(target=release.wait, args=(5,), name="emitter-sender", daemon=True)
    plain.start()
    try:
        assert os_name_of(plain) == Path("/proc/self/comm").read_text().strip()
    finally:
        release.set()
        plain.join(5)


def test_the_target_runs_with_its_arguments_and_the_thread_ends() -> None:
    got: list[int] = []
    t = NamedThread(target=got.append, args=(7,), name="x")
    t.start()
    t.join(5)
    assert got == [7]
    assert not t.is_alive()


def test_the_emitters_threads_are_named(tmp_path: Path) -> None:
    from metering.emitter import Emitter

    # No broker answers on port 1: the replayer backs off, and nothing here needs Kafka.
    emitter = Emitter("127.0.0.1:1", spool_dir=tmp_path, spool_fsync=False)
    try:
        names = set(os_names_once_set({"s": emitter._sender, "r": emitter._replayer}).values())
        assert names == {"emitter-sender", "emitter-replaye"}
    finally:
        # Time for the replayer to give up its connect attempt (3 s) and stop: with 0 it kept
        # trying, and logging, while pytest's interpreter exited after the whole suite.
        emitter.close(timeout=5)
    assert not emitter._replayer.is_alive()

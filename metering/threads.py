"""Background threads that carry their name into the operating system.

A Python thread's ``name`` is Python's alone: ``top -H``, ``ps -L``, ``/proc/<pid>/task``, py-spy
and perf show every thread of the process as ``python``, so an operator cannot tell the emitter's
sender from the event loop, and a benchmark cannot charge CPU time to either. librdkafka names its
own threads (``rdk:main``, ``rdk:broker1``); :class:`NamedThread` does the same for ours, through
``setproctitle.setthreadtitle`` (``prctl(PR_SET_NAME)`` on Linux). The kernel keeps the first
15 bytes of the name.
"""

from __future__ import annotations

import contextlib
import threading

from setproctitle import setthreadtitle


class NamedThread(threading.Thread):
    """A :class:`threading.Thread` whose OS-level name is its ``name``, set as it starts."""

    def run(self) -> None:
        with contextlib.suppress(Exception):  # a name is never worth failing the thread
            setthreadtitle(self.name)
        super().run()


__all__ = ["NamedThread"]

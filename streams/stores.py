"""The worker's table store: Faust's in-memory store, recovering each key by its marks.

Faust recovers a table by replaying its changelog, the last record of a key winning. A worker
evicted from the agent's group (its process stalled past the session timeout) still holds the
table writes it had buffered (``producer_linger``); when it wakes they are sent, after the
writes of the partition's new owner. The new owner's memory is right, but the next recovery
(the rebalance the woken worker's return causes, a restart) loaded the stale value, and the
hand-offs applied since were lost from the tables. A table value carries its marks (the end
of the last range applied per source partition, :func:`streams.handoff.fold`), which only
move forward: a record whose marks are all at or behind the value held is older, and this
store keeps the value held (:func:`streams.handoff.superseded`).

It covers what a recovery reads while both records are in the changelog. Log compaction keeps
a key's last record only: if the stale one is last and the key is not written again before
its segment is compacted, a later recovery reads only that one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import faust.stores
from faust.stores.memory import Store
from faust.types import EventT

from streams import metrics
from streams.handoff import superseded

log = logging.getLogger(__name__)

#: the store URL of the worker's tables (``faust.App(store=...)``)
STORE_URL = "marked://"


class MarkedMemoryStore(Store):
    """Faust's in-memory store; a changelog record older than the value held is skipped."""

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        data = self.data
        deleted: set[Any] = set()
        skipped = 0
        for event in batch:
            key = to_key(event.key)
            self._key_partition[key] = event.message.partition
            if event.message.value is None:  # a tombstone: deleted unless set again after it
                data[key] = None
                deleted.add(key)
                continue
            value = to_value(event.value)
            if superseded(value, data.get(key)):
                skipped += 1
                continue
            data[key] = value
        for key in deleted:
            if data.get(key) is None:
                data.pop(key, None)
                self._key_partition.pop(key, None)
        if skipped:
            metrics.changelog_superseded.inc(skipped)
            log.warning(
                "%s: %d changelog records older than the value already recovered skipped"
                " (written by a worker evicted from the group that flushed them on waking)",
                self.table.name,
                skipped,
            )


faust.stores.STORES.aliases["marked"] = f"{__name__}:MarkedMemoryStore"

__all__ = ["STORE_URL", "MarkedMemoryStore"]
